//! Owns publishing wills: one will now, through its session's router link
//! (`session::ending`), and the delayed wills (`wills`) through a router
//! link of the gate's own, by one task for the broker's life; each stamped
//! will goes to the sessions the gate serves and to the router, unless its
//! user's revocation refuses it by then. Each arming that ends here is told
//! to delivery (`Delivery::will_done`).

use crate::gate::Gate;
use crate::router::protocol::{Packet, PubRel, PubRelReason, Publish, PublishProperties, QoS};
use crate::wills::{Leaving, ReadyWill, WillQueue};
use std::sync::Arc;
use tracing::{info, warn};

/// The router client id of the link that publishes delayed wills. Clients'
/// sessions are `D:` or `H:` (`sessions`), so no client can take it.
const WILLS_LINK_ID: &str = "W:delayed-wills";

/// Publishes the wills that fall due through a router link of the gate's
/// own, until the broker shuts down; then publishes those still pending.
/// Runs as one task for the broker's life.
pub async fn publish_delayed(gate: Arc<Gate>, queue: WillQueue) {
    let WillQueue(mut queue) = queue;
    let link = match gate
        .open_router_session(WILLS_LINK_ID.to_owned(), true, u16::MAX)
        .await
    {
        Ok(link) => link,
        Err(e) => {
            warn!(error = %e, "no router link for delayed wills: they are published by nobody");
            return;
        }
    };
    let (mut tx, mut rx) = (link.tx, link.rx);
    let mut next_pkid: u16 = 1;
    loop {
        tokio::select! {
            biased;
            _ = gate.shutting_down() => break,
            left = queue.recv() => {
                let will = match left {
                    None => break,
                    Some(Leaving::Forget(armed)) => {
                        gate.delivery().will_done(&armed.session_id, armed.connection);
                        continue;
                    }
                    Some(Leaving::Publish(will, armed)) => {
                        if let Some(armed) = armed {
                            gate.delivery().will_done(&armed.session_id, armed.connection);
                        }
                        *will
                    }
                };
                if publish(&gate, &mut tx, will, &mut next_pkid).await.is_err() {
                    warn!("the router closed the delayed-wills link");
                    return;
                }
            }
            // Only acknowledgements of the wills arrive here: read and let go.
            event = rx.next() => match event {
                Ok(Some(crate::router::RouterEvent::Packet(_))) => {}
                // Paused after a burst (or woken with nothing): ask again.
                Ok(Some(crate::router::RouterEvent::Paused) | None) => {
                    if rx.wake().await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    warn!("the router closed the delayed-wills link");
                    return;
                }
            },
        }
    }
    let wills = gate.wills().flush();
    let remaining: Vec<ReadyWill> = std::iter::from_fn(|| queue.try_recv().ok())
        .filter_map(|left| match left {
            Leaving::Publish(will, _) => Some(*will),
            Leaving::Forget(_) => None,
        })
        .chain(wills)
        .collect();
    if !remaining.is_empty() {
        info!(
            wills = remaining.len(),
            "shutting down: pending wills are published now"
        );
    }
    for will in remaining {
        if publish(&gate, &mut tx, will, &mut next_pkid).await.is_err() {
            break;
        }
    }
}

/// Publishes one will: to the sessions the gate serves, and to the router;
/// unless its owner's token has been revoked since (then it is dropped).
async fn publish(
    gate: &Gate,
    tx: &mut crate::router::RouterTx,
    will: ReadyWill,
    next_pkid: &mut u16,
) -> Result<(), crate::router::LinkClosed> {
    let ReadyWill {
        mut publish,
        properties,
        owner,
    } = will;
    if let Some(owner) = &owner {
        if gate.is_revoked(owner).await {
            info!(uid = %owner.uid(), "the will's user was revoked: the will is dropped");
            return Ok(());
        }
    }
    let qos = publish.qos();
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        let pkid = *next_pkid;
        *next_pkid = next_pkid.wrapping_add(1).max(1);
        pkid
    };
    publish = Publish::with_qos(publish.topic, publish.payload, publish.retain, qos, pkid);
    send_will(gate, tx, publish, properties).await
}

/// Sends a will (its packet id already set) through `tx`: to the sessions
/// the gate serves, and, when delivery says it needs it, to the router,
/// for its own subscribers, a retained will and the acknowledgement. A QoS 2 will is
/// released at once: the router keeps a QoS 2 publish until its PUBREL, and
/// nobody else would send one.
pub async fn send_will(
    gate: &Gate,
    tx: &mut crate::router::RouterTx,
    publish: Publish,
    properties: Option<PublishProperties>,
) -> Result<(), crate::router::LinkClosed> {
    gate.metrics().message_in();
    if let Ok(topic) = std::str::from_utf8(&publish.topic) {
        let routed = gate.delivery().route(topic, &publish, &properties);
        routed.record(gate.metrics(), topic);
        // Served by delivery alone (a command read from its stream by
        // handlers on every node, this one's too), as a client's publish
        // is: through the router as well, its handlers here got it twice.
        if !routed.needs_router {
            return Ok(());
        }
    }
    let pkid = publish.pkid();
    if publish.qos() == QoS::ExactlyOnce {
        tx.queue(Packet::Publish(publish, properties));
        let release = PubRel {
            pkid,
            reason: PubRelReason::Success,
        };
        tx.send(Packet::PubRel(release, None)).await?;
    } else {
        tx.send(Packet::Publish(publish, properties)).await?;
    }
    Ok(())
}
