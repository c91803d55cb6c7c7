//! The listener's pure decisions: which wake-ups a user's subscription
//! delivers, and where a refused subscription is asked again.

use super::confirm::redirect_of;
use super::*;

#[test]
fn only_the_confirmed_connection_delivers_wake_ups() {
    let at = Instant::now();
    // (asked on, confirmed, the wake-up's connection) -> delivered
    let table = [
        (None, false, 0, false),
        (Some(0), false, 0, false),
        (Some(0), true, 0, true),
        // A subscription left on a node that no longer serves the slot
        // (a replica after a failover) hears wake-ups out of turn.
        (Some(1), true, 0, false),
        (Some(1), false, 0, false),
        (Some(1), true, 1, true),
    ];
    for (asked, confirmed, shard, delivered) in table {
        let listening = Listening {
            asked: asked.map(|id| (id, at)),
            confirmed,
            ..Listening::default()
        };
        assert_eq!(
            listening.hears(shard),
            delivered,
            "asked on {asked:?}, confirmed {confirmed}, wake-up on {shard}"
        );
    }
}

#[test]
fn a_refused_subscription_goes_where_the_server_said() {
    let error = |kind, detail: &str| redis::RedisError::from((kind, "refused", detail.to_owned()));
    // (error kind, its detail) -> where to subscribe next
    let table = [
        (
            redis::ErrorKind::Moved,
            "3999 127.0.0.1:6381",
            Some("127.0.0.1:6381"),
        ),
        (
            redis::ErrorKind::Ask,
            "3999 10.0.0.2:7000",
            Some("10.0.0.2:7000"),
        ),
        // Damaged or no redirection: the slot map decides.
        (redis::ErrorKind::Moved, "3999", None),
        (redis::ErrorKind::Moved, "x 127.0.0.1:6381", None),
        (redis::ErrorKind::Moved, "3999 nowhere", None),
        (redis::ErrorKind::IoError, "3999 127.0.0.1:6381", None),
    ];
    for (kind, detail, expected) in table {
        assert_eq!(
            redirect_of(&error(kind, detail)).as_deref(),
            expected,
            "{kind:?} {detail}"
        );
    }
}
