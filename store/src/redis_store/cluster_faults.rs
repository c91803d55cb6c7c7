//! Owns the Redis Cluster fault tests of the store: a user's slot moved
//! to another master, a coordinated failover, and a master killed (`kill -9`)
//! under a store in use, and the revocation subscription's node killed.
//! The store follows each (MOVED, a refreshed slot map, a subscription on
//! the next node) without losing a write it acknowledged before the fault.

use super::*;
use envelope::AesKey;
use std::sync::Arc;
use testkit::RedisCluster;

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// Runs a blocking fixture call without stalling the runtime.
async fn on_cluster<T: Send + 'static>(
    cluster: &Arc<RedisCluster>,
    call: impl FnOnce(&RedisCluster) -> T + Send + 'static,
) -> T {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || call(&cluster))
        .await
        .unwrap()
}

/// Reads `uid`'s key until it answers (30 s at most): during a failover the
/// store answers `Unavailable`, never a wrong value.
async fn key_when_back(store: &RedisStore, uid: &UserId) -> Option<KeyRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.get_key(uid).await {
            Ok(found) => return found,
            Err(StoreError::Unavailable(error)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the store did not come back: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("not an outage: {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_slot_moves_failovers_and_dead_masters() {
    let cluster = Arc::new(on_cluster_start().await);
    let url = cluster.redis_url();
    let store = RedisStore::connect(&url).await.unwrap();
    let listener = RedisStore::connect(&url).await.unwrap();
    let events = listener.revocation_events();
    // Subscribed (on the first listed node) before any fault.
    let mut events = crate::conformance::exercise_events(&store, events).await;

    let alice = uid("alice");
    let record = KeyRecord {
        key_id: "k1".into(),
        key: AesKey::generate(),
        issued_at: 1,
    };
    store.put_key(&alice, &record).await.unwrap();
    store.put_registration(&alice, 7).await.unwrap();
    let key = format!("{KEY_PREFIX}key:{{alice}}");

    // The user's slot moves to another master, keys with it.
    let from = on_cluster(&cluster, {
        let key = key.clone();
        move |c| c.master_of_key(&key)
    })
    .await;
    let to = on_cluster(&cluster, move |c| {
        c.masters().into_iter().find(|&m| m != from).unwrap()
    })
    .await;
    on_cluster(&cluster, {
        let key = key.clone();
        move |c| c.move_slot_of(&key, to)
    })
    .await;
    assert_eq!(store.get_key(&alice).await.unwrap(), Some(record.clone()));
    assert_eq!(store.registration(&alice).await.unwrap(), Some(7));

    // A coordinated failover of that master: its replica serves the slot.
    on_cluster(&cluster, move |c| c.failover(c.replica_of(to))).await;
    assert_eq!(store.get_key(&alice).await.unwrap(), Some(record.clone()));

    // kill -9 of the master serving the user: after the node timeout its
    // replica is promoted and the store serves the key again.
    let master = on_cluster(&cluster, {
        let key = key.clone();
        move |c| c.master_of_key(&key)
    })
    .await;
    let replica = on_cluster(&cluster, move |c| c.replica_of(master)).await;
    on_cluster(&cluster, move |c| c.kill(master)).await;
    on_cluster(&cluster, move |c| c.wait_master(replica)).await;
    assert_eq!(key_when_back(&store, &alice).await, Some(record.clone()));
    let record2 = KeyRecord {
        key_id: "k2".into(),
        key: AesKey::generate(),
        issued_at: 2,
    };
    store.put_key(&alice, &record2).await.unwrap();
    assert_eq!(store.get_key(&alice).await.unwrap(), Some(record2));

    // The node holding the revocation subscription (the first listed) dies:
    // the subscriber moves to the next node, says it missed announcements
    // (Resync), and hears the next revocation.
    on_cluster(&cluster, |c| {
        if c.is_running(0) {
            let was_master = c.role(0) == Some("master");
            let replica = was_master.then(|| c.replica_of(0));
            c.kill(0);
            if let Some(replica) = replica {
                c.wait_master(replica);
            }
        }
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("a resync within 30 s of losing the subscription's node");
        // Late repeats of the warm-up may come first.
        if got.unwrap() == RevocationEvent::Resync {
            break;
        }
    }
    let bob = uid("bob");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Until the subscription is back: a revocation announced before is
        // covered by the resync (the caller re-reads the store).
        match store.revoke_user(&bob, Revocation::All).await {
            Ok(()) => {}
            Err(StoreError::Unavailable(_)) => {}
            Err(other) => panic!("{other}"),
        }
        match tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
            Ok(Ok(RevocationEvent::Revoked { uid, revocation })) if uid == bob => {
                assert_eq!(revocation, Revocation::All);
                break;
            }
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "no revocation heard after the subscription's node died"
            ),
        }
    }
}

async fn on_cluster_start() -> RedisCluster {
    tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap()
}
