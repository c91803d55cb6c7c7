//! Owns the behaviour checks of the [`Pairings`] domain that every backend
//! must pass (run from `conformance::exercise`): the state machine's atomic
//! steps, single-use codes, racing claims, one session per user, binding
//! to the user, and expiry.

use crate::*;
use protocol::uid::UserId;
use std::sync::Arc;
use std::time::Duration;

const LIFE: Duration = Duration::from_secs(15);
const PAUSE: Duration = Duration::from_secs(120);

fn open_record(uid: &UserId, iat: Option<u64>) -> (PairingRecord, PairingCode) {
    let code = PairingCode::generate(&new_session_id());
    (PairingRecord::open(uid, iat, &code, LIFE, PAUSE), code)
}

fn claim<'a>(code: &'a PairingCode, key: &'a str) -> Claim<'a> {
    Claim {
        code,
        public_key: key,
        now_ms: now_millis(),
    }
}

pub async fn pairings(store: &dyn Store) {
    let alice = UserId::parse("pair-alice").unwrap();
    let mallory = UserId::parse("pair-mallory").unwrap();

    // Open, rotate: the replaced code is dead at once, the new one claims.
    let (record, first) = open_record(&alice, Some(5));
    let session = record.session.clone();
    store
        .open_pairing(&record, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(store.pairing(&session).await.unwrap(), Some(record.clone()));
    let second = PairingCode::generate(&session);
    let rotation = Rotation {
        session: &session,
        code: &second,
        generation: 0,
        code_life: LIFE,
    };
    assert!(store.rotate_pairing_code(rotation).await.unwrap());
    assert!(
        !store.rotate_pairing_code(rotation).await.unwrap(),
        "a stale generation changes nothing"
    );
    assert_eq!(
        store.pairing(&session).await.unwrap().unwrap().generation,
        1
    );
    assert!(store
        .claim_pairing(claim(&first, "pk"))
        .await
        .unwrap()
        .is_none());
    // Nobody may decide before a phone claimed.
    assert!(store
        .decide_pairing(&alice, true, now_millis())
        .await
        .unwrap()
        .is_none());
    let claimed = store
        .claim_pairing(claim(&second, "pk"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.state, PairingState::Paused);
    assert_eq!(claimed.uid, alice);
    assert_eq!(claimed.token_iat, Some(5));
    assert_eq!(claimed.public_key.as_deref(), Some("pk"));
    assert_eq!(claimed.code_hash, None);
    assert!(claimed.deadline_ms >= now_millis() + 100_000);
    // Single use: the same code again, and a rotation, change nothing.
    assert!(store
        .claim_pairing(claim(&second, "pk2"))
        .await
        .unwrap()
        .is_none());
    let third = PairingCode::generate(&session);
    let late = Rotation {
        session: &session,
        code: &third,
        generation: 1,
        code_life: LIFE,
    };
    assert!(!store.rotate_pairing_code(late).await.unwrap());
    // Another user cannot decide alice's session; a late decision cannot either.
    assert!(store
        .decide_pairing(&mallory, true, now_millis())
        .await
        .unwrap()
        .is_none());
    let after = claimed.deadline_ms + 1;
    assert!(store
        .decide_pairing(&alice, true, after)
        .await
        .unwrap()
        .is_none());
    let decided = store
        .decide_pairing(&alice, true, now_millis())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(decided.state, PairingState::Accepted);
    assert_eq!(decided.public_key.as_deref(), Some("pk"));
    assert!(
        store
            .decide_pairing(&alice, false, now_millis())
            .await
            .unwrap()
            .is_none(),
        "once"
    );
    // Finish with the result; transitions apply only from their state.
    let none = PairingOutcome::Nothing;
    assert!(!store
        .transition_pairing(&session, PairingState::Paused, PairingState::TimedOut, none)
        .await
        .unwrap());
    assert!(store
        .transition_pairing(
            &session,
            PairingState::Accepted,
            PairingState::Done,
            PairingOutcome::Result("{\"key_id\":\"k\"}")
        )
        .await
        .unwrap());
    let done = store.pairing(&session).await.unwrap().unwrap();
    assert_eq!(done.state, PairingState::Done);
    assert_eq!(done.result.as_deref(), Some("{\"key_id\":\"k\"}"));
    store.delete_pairing(&session).await.unwrap();
    assert_eq!(store.pairing(&session).await.unwrap(), None);
    assert!(store
        .decide_pairing(&alice, true, now_millis())
        .await
        .unwrap()
        .is_none());

    // A new session of the same user replaces (ends) the previous one.
    let (old, old_code) = open_record(&alice, None);
    store
        .open_pairing(&old, Duration::from_secs(60))
        .await
        .unwrap();
    let (new, new_code) = open_record(&alice, None);
    store
        .open_pairing(&new, Duration::from_secs(60))
        .await
        .unwrap();
    let replaced = store.pairing(&old.session).await.unwrap().unwrap();
    assert_eq!(replaced.state, PairingState::Replaced);
    assert!(store
        .claim_pairing(claim(&old_code, "pk"))
        .await
        .unwrap()
        .is_none());
    // A failure status is kept; declining is the user's too.
    assert!(store
        .claim_pairing(claim(&new_code, "pk"))
        .await
        .unwrap()
        .is_some());
    let declined = store
        .decide_pairing(&alice, false, now_millis())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(declined.state, PairingState::Declined);
    assert!(!store
        .transition_pairing(
            &new.session,
            PairingState::Accepted,
            PairingState::Failed,
            PairingOutcome::Status(401)
        )
        .await
        .unwrap());
    // An expired code cannot be claimed.
    let code = PairingCode::generate(&new_session_id());
    let dead = PairingRecord::open(&mallory, None, &code, Duration::from_millis(1), PAUSE);
    store
        .open_pairing(&dead, Duration::from_secs(60))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store
        .claim_pairing(claim(&code, "pk"))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .transition_pairing(
            &dead.session,
            PairingState::Code,
            PairingState::Expired,
            PairingOutcome::Nothing
        )
        .await
        .unwrap());
    // An unknown session.
    let unknown = PairingCode::generate(&new_session_id());
    assert!(store
        .claim_pairing(claim(&unknown, "pk"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.pairing(&unknown.session).await.unwrap(), None);
    // The record expires by itself.
    let (short, _) = open_record(&mallory, None);
    store
        .open_pairing(&short, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(store.pairing(&short.session).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(store.pairing(&short.session).await.unwrap(), None);
}

/// Sixteen racing claims of one code: exactly one wins.
pub async fn racing_claims(store: Arc<dyn Store>) {
    let uid = UserId::parse("pair-racer").unwrap();
    let (record, code) = open_record(&uid, None);
    store
        .open_pairing(&record, Duration::from_secs(60))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, code) = (store.clone(), code.clone());
            tokio::spawn(async move {
                let key = format!("pk{i}");
                store
                    .claim_pairing(claim(&code, &key))
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1);
}
