//! Owns user revocations: what a [`Revocation`] refuses, how two merge,
//! its stored form, and the [`Revocations`] domain (record, restore, read,
//! and the live feed of [`RevocationEvent`]s the broker and the SDK watch).

use crate::StoreFuture;
use protocol::uid::UserId;
use tokio::sync::broadcast;

/// How a user is revoked.
///
/// A revocation outlives the deletion of the user's data: deleting an account
/// records [`Revocation::IssuedBefore`] one second after the deletion, so every
/// token issued until then is refused while a token issued after a new
/// registration (its `iat` is later) works again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Revocation {
    /// Tokens whose `iat` is earlier than this Unix second are refused (a
    /// token without `iat` counts as issued at 0, so it is refused too).
    IssuedBefore(u64),
    /// Every token is refused until an operator restores the user.
    All,
}

impl Revocation {
    /// Whether a token issued at `iat` (Unix seconds; `None` = no `iat`
    /// claim, treated as 0) is refused by this revocation.
    pub fn refuses(&self, iat: Option<u64>) -> bool {
        match self {
            Revocation::All => true,
            Revocation::IssuedBefore(cutoff) => iat.unwrap_or(0) < *cutoff,
        }
    }

    /// The revocation an account deletion records at `now` (Unix seconds)
    /// when the deleting credential was issued at `credential_iat`: every
    /// token issued up to this second is refused, and so is the credential
    /// itself even when it was issued within the second of an earlier
    /// deletion (its `iat` is that cut-off, later than `now`); a token issued
    /// afterwards (a new registration, see the identity service's `issue`)
    /// works. The one rule for `/unregister` and `delete_account`.
    pub fn account_deleted(now: u64, credential_iat: Option<u64>) -> Revocation {
        Revocation::IssuedBefore(now.max(credential_iat.unwrap_or(0)).saturating_add(1))
    }

    /// The stronger of two revocations: `All` wins, otherwise the later cut-off.
    /// Recording a revocation never weakens one already in place (an account
    /// deletion must not lift an operator's ban).
    pub fn merge(self, other: Revocation) -> Revocation {
        match (self, other) {
            (Revocation::IssuedBefore(a), Revocation::IssuedBefore(b)) => {
                Revocation::IssuedBefore(a.max(b))
            }
            _ => Revocation::All,
        }
    }

    /// The stored and published text form: `all` or `before:<unix seconds>`.
    pub fn encode(&self) -> String {
        match self {
            Revocation::All => "all".to_owned(),
            Revocation::IssuedBefore(cutoff) => format!("before:{cutoff}"),
        }
    }

    /// Parses [`Revocation::encode`]'s form. Any other value counts as
    /// [`Revocation::All`]: the legacy flag (the Unix second of the
    /// revocation) and an operator's hand-written `SET mqgate:revoked:<uid> 1`
    /// both mean "refuse everything", and a malformed record must fail closed.
    pub fn decode(text: &str) -> Revocation {
        text.strip_prefix("before:")
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(Revocation::All, Revocation::IssuedBefore)
    }
}

/// What the broker hears on [`Revocations::revocation_events`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationEvent {
    /// `uid` was revoked (`revocation` is what was recorded, merged with any
    /// earlier revocation).
    Revoked { uid: UserId, revocation: Revocation },
    /// Events may have been missed (the Redis subscription was re-established
    /// after an outage): re-check every live session now.
    Resync,
}

/// How many revocation events a slow subscriber may fall behind before it is
/// told it lagged (it then re-checks every session).
pub const REVOCATION_EVENTS_CAPACITY: usize = 1024;

/// Recording, restoring and reading revocations, and their live feed.
pub trait Revocations: Send + Sync + 'static {
    /// Legacy flag API: `true` records [`Revocation::All`], `false` restores
    /// the user (same as [`Revocations::revoke_user`] / [`Revocations::restore_user`]).
    fn set_revoked<'a>(&'a self, uid: &'a UserId, revoked: bool) -> StoreFuture<'a, ()> {
        if revoked {
            self.revoke_user(uid, Revocation::All)
        } else {
            self.restore_user(uid)
        }
    }

    /// Whether any revocation is recorded for the user (whatever its kind).
    fn is_revoked<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(self.revocation(uid).await?.is_some()) })
    }

    /// Records `revocation` for the user, merged with any earlier one (see
    /// [`Revocation::merge`]), and announces it on
    /// [`Revocations::revocation_events`] (Redis: `PUBLISH` on the channel
    /// `mqgate:revocations`, so every process sharing the Redis hears it).
    /// Same as [`Revocations::record_revocation`] followed by the announcement.
    fn revoke_user<'a>(&'a self, uid: &'a UserId, revocation: Revocation) -> StoreFuture<'a, ()>;

    /// Records `revocation` for the user, merged like [`Revocations::revoke_user`],
    /// without announcing it: from now on every check against the store
    /// (CONNECT, the handler SDK, the identity service, wills) refuses the
    /// tokens it covers, but live sessions are not cut yet. Returns the
    /// merged revocation now in force.
    ///
    /// Why apart: `delete_account` must make the revocation the first thing
    /// that happens (nothing the user's old sessions send afterwards may be
    /// acted on) while its own answer still has to reach the device; it
    /// announces (with [`Revocations::revoke_user`]) once the answer is out.
    fn record_revocation<'a>(
        &'a self,
        uid: &'a UserId,
        revocation: Revocation,
    ) -> StoreFuture<'a, Revocation>;

    /// Removes every revocation of the user (operators).
    fn restore_user<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, ()>;

    /// The user's revocation, if any.
    fn revocation<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Option<Revocation>>;

    /// The revocations of many users, in their order: what the broker's
    /// periodic sweep reads. Redis answers a batch with one `MGET` (split
    /// per shard on a cluster) instead of one `GET` per user; keep batches
    /// to a few hundred users.
    fn revocations<'a>(&'a self, uids: &'a [UserId]) -> StoreFuture<'a, Vec<Option<Revocation>>> {
        Box::pin(async move {
            let mut found = Vec::with_capacity(uids.len());
            for uid in uids {
                found.push(self.revocation(uid).await?);
            }
            Ok(found)
        })
    }

    /// A live feed of revocations recorded through this store or (Redis) by
    /// any process sharing it. Receivers that lag get
    /// `RecvError::Lagged` and should re-check everything, as on
    /// [`RevocationEvent::Resync`]. Delivery is best-effort (a Redis outage
    /// loses events): keep a periodic poll as the fallback. Must be called
    /// inside a Tokio runtime to get Redis events.
    fn revocation_events(&self) -> broadcast::Receiver<RevocationEvent>;
}
