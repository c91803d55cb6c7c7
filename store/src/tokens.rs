//! Owns the users' sealed platform tokens (the tokens handler and master-key
//! rotation): the [`PlatformTokens`] domain, its listing pages and the rule
//! for platform names.

use crate::{StoreError, StoreFuture};
use protocol::uid::UserId;

/// One sealed platform token, as [`PlatformTokens::platform_tokens_page`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredToken {
    pub uid: UserId,
    pub platform: String,
    /// The sealed bytes exactly as stored (the store never sees plaintext).
    pub sealed: Vec<u8>,
}

/// A page of [`PlatformTokens::platform_tokens_page`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenPage {
    pub tokens: Vec<StoredToken>,
    /// Pass this back to get the next page; `None` when the listing is done.
    /// A listing may repeat an entry (Redis `SCAN` semantics), never skip one
    /// that existed for the whole listing.
    pub next: Option<String>,
}

/// Longest platform name a store accepts (platform names come from
/// configuration, but the embedded key format needs a bound and no `\x1f`).
pub const MAX_PLATFORM_LEN: usize = 64;

/// Whether `platform` can be a key part: 1-64 characters of
/// `[A-Za-z0-9._-]`. Handlers check their configured names against this.
pub fn valid_platform_name(platform: &str) -> bool {
    !platform.is_empty()
        && platform.len() <= MAX_PLATFORM_LEN
        && platform
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Refuses a platform name that [`valid_platform_name`] rejects.
pub(crate) fn check_platform(platform: &str) -> Result<(), StoreError> {
    if valid_platform_name(platform) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "platform name must be 1-64 characters of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

/// The sealed platform tokens of each user.
pub trait PlatformTokens: Send + Sync + 'static {
    /// Stores the user's sealed token for `platform`, replacing an older one.
    /// `platform` must pass [`valid_platform_name`].
    fn put_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
        sealed: &'a [u8],
    ) -> StoreFuture<'a, ()>;

    /// As [`PlatformTokens::put_platform_token`], unless the user's revocation
    /// refuses a token issued at `iat`, checked atomically with the write
    /// (see [`crate::Keys::put_key_unless_revoked`]). `Ok(false)`: refused,
    /// nothing written.
    fn put_platform_token_unless_revoked<'a>(
        &'a self,
        token: SealedToken<'a>,
        iat: u64,
    ) -> StoreFuture<'a, bool>;

    /// The user's sealed token for `platform`.
    fn platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// The platforms the user holds a token for, sorted.
    fn platforms_with_tokens<'a>(&'a self, uid: &'a UserId) -> StoreFuture<'a, Vec<String>>;

    /// Deletes the user's token for `platform`; `true` if there was one.
    fn delete_platform_token<'a>(
        &'a self,
        uid: &'a UserId,
        platform: &'a str,
    ) -> StoreFuture<'a, bool>;

    /// Replaces the token only if it is still exactly `old.sealed` (for master-key
    /// rotation: a token the user revoked or replaced meanwhile is left alone).
    /// Returns whether it was replaced.
    fn replace_platform_token<'a>(
        &'a self,
        old: SealedToken<'a>,
        new: &'a [u8],
    ) -> StoreFuture<'a, bool>;

    /// One page of every stored platform token of every user, for master-key
    /// rotation. Start with `None` and pass back [`TokenPage::next`].
    fn platform_tokens_page<'a>(&'a self, cursor: Option<&'a str>) -> StoreFuture<'a, TokenPage>;
}

/// A user's sealed token for one platform, as written.
#[derive(Debug, Clone, Copy)]
pub struct SealedToken<'a> {
    pub uid: &'a UserId,
    pub platform: &'a str,
    pub sealed: &'a [u8],
}

impl<'a> SealedToken<'a> {
    pub fn new(uid: &'a UserId, platform: &'a str, sealed: &'a [u8]) -> Self {
        SealedToken {
            uid,
            platform,
            sealed,
        }
    }
}
