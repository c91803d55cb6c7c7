//! Owns how the service names a sign-up session in the store
//! ([`store::SignUps`]): the SHA-256 of its token, never the token itself,
//! so that a copy of the state does not let anyone act as a client.

use sha2::{Digest, Sha256};

/// The id a session is stored under: hex SHA-256 of its token.
pub fn session_id(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_hide_the_token() {
        let id = session_id("secret-token");
        assert_eq!(id.len(), 64);
        assert!(!id.contains("secret"));
    }
}
