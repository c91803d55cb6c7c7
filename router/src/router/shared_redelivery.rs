//! patched: owns what a clean session leaves unacknowledged in its shared
//! groups. Upstream gave a `$share` group's in-flight publishes back to the
//! group only when a persistent session went away (it rewinds the group's
//! cursor, `handle_disconnection`); a clean session's were dropped with it,
//! so the commands a handler held when it died never reached the other
//! members of its group.
//!
//! Now, when a clean session that is a member of groups leaves with QoS 1/2
//! deliveries from a group's filter unacknowledged (no PUBACK, or no PUBREC
//! for QoS 2), each of those publishes is appended again to the filter's
//! log for that group's subscription alone (`Audience`), so another member
//! gets it (at least once: a member that had handled it without
//! acknowledging makes a duplicate). A publish is found in the log, or in
//! the group's `held` publishes when the log was emptied under it
//! (`trim_read_by_group`). A group left with no member is kept, holding its
//! filter's log (within the log's usual caps), until a member joins; at most
//! [`MAX_KEPT_GROUPS`] are, beyond which what their last member left is
//! dropped (logged).

use super::*;
use crate::router::shared_subs::Audience;

/// Most groups kept with no member (group names are the handlers' choice).
pub(super) const MAX_KEPT_GROUPS: usize = 1024;

/// Publishes to give back to one group: its key, its subscription path,
/// its filter's log and the publishes (for that subscription alone).
pub(super) struct Unacked {
    key: String,
    path: String,
    filter_idx: FilterIdx,
    publishes: Vec<PublishData>,
}

impl Router {
    /// What clean session `connection` (still a member of its groups) left
    /// unacknowledged in each of its shared subscriptions, copied out of
    /// the logs (or the groups' held publishes). Nothing, without a walk,
    /// when nothing was in flight.
    pub(super) fn unacked_shared(
        &self,
        connection: &Connection,
        outgoing: &Outgoing,
    ) -> Vec<Unacked> {
        let mut found = Vec::new();
        if outgoing.inflight_is_empty() {
            return found;
        }
        for path in &connection.subscriptions {
            let Some((key, filter)) = extract_group(path) else {
                continue;
            };
            let Some(filter_idx) = self.datalog.filter_index(&filter) else {
                continue;
            };
            let group = self.shared_subscriptions.get(&key);
            let mut seen: Vec<Offset> = Vec::new();
            let mut publishes = Vec::new();
            for offset in outgoing.inflight_cursors(filter_idx) {
                if seen.contains(&offset) {
                    continue;
                }
                seen.push(offset);
                let stored = self.datalog.stored_at(filter_idx, offset).or_else(|| {
                    let held = &group?.held;
                    let at = held.binary_search_by(|(_, o)| o.cmp(&offset)).ok()?;
                    held.get(at).map(|(p, _)| p.clone())
                });
                let Some(mut publish) = stored else {
                    continue;
                };
                // Delivered through another subscription of the same log
                // (a plain one, or another group's publish): not this
                // group's to give back.
                if !Audience::admits(publish.origin.as_deref(), Some(path)) {
                    continue;
                }
                publish.origin = Audience::shared_subscription_path(path).origin();
                publishes.push(publish);
            }
            if !publishes.is_empty() {
                found.push(Unacked {
                    key,
                    path: path.clone(),
                    filter_idx,
                    publishes,
                });
            }
        }
        found
    }

    /// Appends `unacked` again for each group's subscription alone (after
    /// the session left its groups): a live member gets it; a group with
    /// none is kept, holding its filter, until one joins.
    pub(super) fn give_back_to_groups(&mut self, unacked: Vec<Unacked>) {
        if unacked.is_empty() {
            return;
        }
        for Unacked {
            key,
            path,
            filter_idx,
            publishes,
        } in unacked
        {
            if !self.shared_subscriptions.contains_key(&key) {
                let kept = self
                    .shared_subscriptions
                    .values()
                    .filter(|g| g.kept)
                    .count();
                if kept >= MAX_KEPT_GROUPS {
                    warn!(
                        group = key,
                        dropped = publishes.len(),
                        "too many shared groups kept without members: what the last member left unacknowledged is dropped"
                    );
                    continue;
                }
                let Some(data) = self.datalog.native.get(filter_idx) else {
                    continue;
                };
                let mut group = SharedGroup::new(
                    data.log.next_offset(),
                    self.config.shared_subscriptions_strategy.clone(),
                );
                group.kept = true;
                self.shared_subscriptions.insert(key.clone(), group);
                self.hold_filter(&path);
            }
            let Some(data) = self.datalog.native.get_mut(filter_idx) else {
                continue;
            };
            info!(
                group = key,
                publishes = publishes.len(),
                "a clean session left its group with unacknowledged publishes: given back to the group"
            );
            for publish in publishes {
                data.append(publish, &mut self.notifications);
            }
        }
        self.wake_notified();
    }

    /// A member joined group `key` (subscription `path`, whose filter the
    /// member already holds): a kept group no longer holds the filter.
    pub(super) fn member_joined(&mut self, key: &str, path: &str) {
        let was_kept = self
            .shared_subscriptions
            .get_mut(key)
            .is_some_and(|group| std::mem::take(&mut group.kept));
        if was_kept {
            self.release_filter(path);
        }
    }
}
