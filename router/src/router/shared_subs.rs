//! Owns `$share` groups (their members, turn and shared cursor) and the
//! audience of a publish (`Audience`: which subscriptions may read it).

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// patched: which subscriptions may read what a link publishes. A client's
/// link publishes to every matching subscription (MQTT); a link the
/// embedding program opens for itself may publish to one audience only: the
/// broker's cluster injects a command read by one Redis consumer group
/// through a link whose publishes reach only that group's shared
/// subscription (or only the plain subscriptions), so that two groups on one
/// node no longer each get the other's copy.
///
/// Kept as the stored publish's origin (`PublishData::origin`, the field No
/// Local compares with client ids): an origin that begins with `$` is an
/// audience, never a client id (the router refuses client ids holding `$`).
/// No memory per connection or per stored publish is added, and nothing a
/// client sends can set it: only `LinkBuilder::audience` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audience(Option<Arc<str>>);

/// The origin of a publish meant for plain subscriptions only.
const PLAIN_ONLY: &str = "$plain";

impl Audience {
    /// Every matching subscription (a client's publish).
    pub fn everyone() -> Self {
        Audience(None)
    }

    /// Only plain (not `$share/...`) subscriptions.
    pub fn plain_subscriptions() -> Self {
        Audience(Some(Arc::from(PLAIN_ONLY)))
    }

    /// Only the shared subscription `$share/<group>/<filter>`.
    pub fn shared_subscription(group: &str, filter: &str) -> Self {
        Audience(Some(Arc::from(format!("$share/{group}/{filter}"))))
    }

    /// Only the shared subscription of path `$share/<group>/<filter>`.
    pub(crate) fn shared_subscription_path(path: &str) -> Self {
        Audience(Some(Arc::from(path)))
    }

    /// The origin that stands for it in stored publishes, if it is not
    /// everyone.
    pub(crate) fn origin(&self) -> Option<Arc<str>> {
        self.0.clone()
    }

    /// Whether a stored publish of `origin` may be read by a subscription:
    /// `shared` is the subscription's `$share/<group>/<filter>` path, `None`
    /// for a plain one.
    #[inline]
    pub(crate) fn admits(origin: Option<&str>, shared: Option<&str>) -> bool {
        match origin {
            Some(audience) if audience.starts_with('$') => match shared {
                Some(path) => audience == path,
                None => audience == PLAIN_ONLY,
            },
            _ => true,
        }
    }
}

pub struct SharedGroup {
    // using Vec over HashSet for maintaining order of iter
    clients: Vec<String>,
    // Index into clients, allows us to skip doing iter everytime
    current_client_index: usize,
    pub cursor: (u64, u64),
    pub strategy: Strategy,
    /// patched: publishes moved out of the group's log when it was emptied
    /// (`Router::trim_read_by_group`) while clean members still had them
    /// unacknowledged, with their offsets (sorted): delivered again to the
    /// group if such a member leaves. At most the members' in-flight
    /// windows; what was acknowledged since goes at the next emptying.
    pub(crate) held: Vec<(super::logs::PublishData, (u64, u64))>,
    /// patched: kept with no member for what its last member left
    /// unacknowledged (`shared_redelivery.rs`): it holds its filter's log
    /// (one reader) until a member joins.
    pub(crate) kept: bool,
}

impl SharedGroup {
    pub fn new(cursor: (u64, u64), strategy: Strategy) -> Self {
        SharedGroup {
            clients: vec![],
            current_client_index: 0,
            cursor,
            strategy,
            held: Vec::new(),
            kept: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// patched: how many (connected) members it has.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// patched: its members' client ids.
    pub fn clients(&self) -> impl Iterator<Item = &str> {
        self.clients.iter().map(String::as_str)
    }

    pub fn current_client(&self) -> Option<&String> {
        self.clients.get(self.current_client_index)
    }

    /// patched: whether `client` is a member (a restored session rejoins
    /// only the groups it is not in yet).
    pub fn contains(&self, client: &str) -> bool {
        self.clients.iter().any(|c| c == client)
    }

    pub fn add_client(&mut self, client: String) {
        self.clients.push(client)
    }

    pub fn remove_client(&mut self, client: &String) {
        // remove client from vec
        self.clients.retain(|c| c != client);

        // if there are no clients left, we have to avoid % by 0
        if !self.clients.is_empty() {
            // Make sure that we are within bounds and that next client is the correct client.
            self.current_client_index %= self.clients.len();
        }
    }

    pub fn update_next_client(&mut self) {
        // patched: an empty group has no next client (upstream divided by
        // zero, or asked for a number in an empty range).
        if self.clients.is_empty() {
            self.current_client_index = 0;
            return;
        }
        match self.strategy {
            Strategy::RoundRobin => {
                self.current_client_index = (self.current_client_index + 1) % self.clients.len();
            }
            Strategy::Random => {
                self.current_client_index = rand::thread_rng().gen_range(0..self.clients.len());
            }
            Strategy::Sticky => {}
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    RoundRobin,
    Random,
    Sticky,
}

#[cfg(test)]
mod tests {
    use crate::router::shared_subs::Strategy;

    use super::SharedGroup;

    #[test]
    fn performs_round_robin() {
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            held: Vec::new(),
            kept: false,
        };
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 2);
        group.update_next_client();
        assert_eq!(group.current_client_index, 0);
        group.add_client("D".into());
        assert_eq!(group.current_client_index, 0);
    }

    #[test]
    fn handles_round_robin_when_start_removed() {
        // [ A, B, C ] => 0
        // we remove A
        // [ B, C ] => Should be the next client (B)
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            held: Vec::new(),
            kept: false,
        };
        group.remove_client(&"A".into());
        assert_eq!(group.current_client_index, 0);
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 0);
    }

    #[test]
    fn handles_round_robin_when_last_removed() {
        // [ A, B, C ] => 2 (C)
        // we remove C
        // [ A, B ] => Should be the next client (A)
        let mut group = SharedGroup {
            clients: vec!["A".into(), "B".into(), "C".into()],
            current_client_index: 0,
            cursor: (0, 0),
            strategy: Strategy::RoundRobin,
            held: Vec::new(),
            kept: false,
        };
        group.update_next_client();
        assert_eq!(group.current_client_index, 1);
        group.update_next_client();
        assert_eq!(group.current_client_index, 2);
        group.remove_client(&"C".into());
        assert_eq!(group.current_client_index, 0);
    }
}
