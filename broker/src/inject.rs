//! Owns publishing into this node's router from outside any session: what a
//! delivery of several nodes (the `cluster` crate) received from another
//! node and must hand to this node's own subscribers. The local inboxes are
//! the caller's to serve (it holds the [`crate::delivery::LocalDelivery`] it
//! wraps); the router gets what the local decision says it needs, through a
//! router link of its own, as the delayed wills do (`will_publisher`);
//! and ending a session here that a connection on another node took over;
//! and publishing the will of a device whose node died.
//!
//! Nothing here checks or stamps anything: what is injected was decided and
//! stamped by the gate of the node that received it.

use crate::gate::Gate;
use crate::router::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PubRel, PubRelReason, Publish, PublishProperties, QoS,
};
use crate::router::{Audience, LinkClosed, RouterError, RouterEvent, RouterRx, RouterTx};
use std::sync::Arc;
use std::time::Duration;

/// Opens injection links on a running broker (`RunningBroker::injector`).
#[derive(Clone)]
pub struct Injector {
    gate: Arc<Gate>,
}

/// How long the router may take to acknowledge one injected publish before
/// the link is reported closed (the router is stuck or gone).
pub const ROUTER_ACK_TIMEOUT: Duration = Duration::from_secs(10);

impl Injector {
    pub(crate) fn new(gate: Arc<Gate>) -> Self {
        Injector { gate }
    }

    /// A router link named `X:<name>` (clients' sessions are `D:` or `H:`,
    /// so no client can take it) whose publishes reach only `audience`'s
    /// subscriptions (`Audience::everyone()`: all of them): a command read
    /// by one Redis consumer group goes to the one `$share` subscription
    /// (or the plain subscriptions) of that group, not to every group here
    /// (`mqtt_router::Audience`). Each caller keeps its own: the order of
    /// one link's publishes is the order its subscribers see.
    pub async fn link_for(
        &self,
        name: &str,
        audience: Audience,
    ) -> Result<InjectLink, RouterError> {
        let link = self
            .gate
            .open_injection_session(format!("X:{name}"), audience)
            .await?;
        Ok(InjectLink {
            tx: link.tx,
            rx: link.rx,
            next_pkid: 1,
        })
    }

    /// Ends the live session `id` here (DISCONNECT `0x8E`, its will as for
    /// any takeover): a connection of the same session opened on another
    /// node. False when no such session is live here.
    pub fn take_over(&self, id: &str) -> bool {
        self.gate.sessions().end_taken_over(id)
    }

    /// Ends the live session `id` here (as [`Injector::take_over`]) and,
    /// once its connection closed, releases what it kept here (a
    /// persistent session's row, router session and QoS 2 state): it
    /// continues on another node. False when no such session is live here.
    pub fn take_over_and_release(&self, id: &str) -> bool {
        if !self.take_over(id) {
            return false;
        }
        let (gate, id) = (self.gate.clone(), id.to_owned());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while gate.sessions().is_held(&id) {
                if tokio::time::Instant::now() >= deadline {
                    // Still here (it came back, or is slow to end): kept.
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            gate.sessions().release_qos2(&id);
            gate.delivery().expire(&id);
            forget_router_session(&gate, &id).await;
            tracing::info!(
                session = id,
                "a session taken over on another node: released here"
            );
        });
        true
    }

    /// Releases persistent session `id`, kept here while its client is
    /// away, because its client connected on another node: its router
    /// session, kept row and QoS 2 state go as at its expiry, and a will
    /// waiting for its delay is cancelled, or published now when the new
    /// connection asked a clean start. False when it is not kept here.
    pub async fn release(&self, id: &str, clean_start: bool) -> bool {
        let sessions = self.gate.sessions();
        let Some(serial) = sessions.away_serial(id) else {
            return false;
        };
        let Some(_releasing) = sessions.claim_to_expire(id, serial) else {
            return false;
        };
        sessions.release_qos2(id);
        self.gate.delivery().expire(id);
        self.gate.wills().session_reconnected(id, clean_start);
        forget_router_session(&self.gate, id).await;
        true
    }

    /// Publishes the will of device session of `uid` (its token issued at
    /// `issued_at`) that another node armed and can no longer publish (it
    /// died): as a delayed will is, through the gate's will publisher,
    /// which checks the user's revocation first, then routes it through
    /// delivery (`Delivery::route`) and the router.
    pub fn publish_will(
        &self,
        publish: Publish,
        properties: Option<PublishProperties>,
        uid: protocol::UserId,
        issued_at: Option<u64>,
    ) {
        let owner = crate::auth::DeviceIdentity::will_owner(uid, issued_at);
        self.gate.wills().publish_now(crate::wills::ReadyWill {
            publish,
            properties,
            owner: Some(owner),
        });
    }

    /// Whether a device of user `uid` is connected here now: only a
    /// connected client acknowledges what is injected for it (a persistent
    /// session whose client is away does not).
    pub fn device_connected(&self, uid: &str) -> bool {
        protocol::UserId::parse(uid).is_ok_and(|uid| self.gate.sessions().has_live_device(&uid))
    }

    /// The broker's metrics, for what the cross-node delivery counts.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.gate.metrics()
    }

    /// Resolves when the broker shuts down.
    pub async fn shutting_down(&self) {
        self.gate.shutting_down().await;
    }
}

/// Makes the router forget what it stored for session `id`: a clean
/// session of the same id connects and leaves.
async fn forget_router_session(gate: &Gate, id: &str) {
    match gate
        .open_router_session(id.to_owned(), true, u16::MAX)
        .await
    {
        Ok(mut link) => {
            let goodbye = Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = link.tx.send(goodbye).await;
        }
        Err(e) => tracing::warn!(error = %e, "could not release a session's router state"),
    }
}

/// One router link publishing on behalf of other nodes.
pub struct InjectLink {
    tx: RouterTx,
    rx: RouterRx,
    next_pkid: u16,
}

impl InjectLink {
    /// Hands `publish` to the router and returns once the router has it
    /// (its PUBACK, or PUBCOMP for QoS 2): at QoS 1 and 2 the router then
    /// holds it in its logs for its subscribers. QoS 0 returns once queued.
    pub async fn publish(
        &mut self,
        publish: Publish,
        properties: Option<PublishProperties>,
    ) -> Result<(), LinkClosed> {
        let qos = publish.qos();
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            let pkid = self.next_pkid;
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            pkid
        };
        let publish = Publish::with_qos(publish.topic, publish.payload, publish.retain, qos, pkid);
        if qos == QoS::ExactlyOnce {
            // Released at once, as a delayed will is: nobody else would.
            self.tx.queue(Packet::Publish(publish, properties));
            let release = PubRel {
                pkid,
                reason: PubRelReason::Success,
            };
            self.tx.send(Packet::PubRel(release, None)).await?;
        } else {
            self.tx.send(Packet::Publish(publish, properties)).await?;
        }
        if qos == QoS::AtMostOnce {
            return self.drain_ready();
        }
        match tokio::time::timeout(ROUTER_ACK_TIMEOUT, self.acknowledged(pkid)).await {
            Ok(acknowledged) => acknowledged,
            Err(_) => Err(LinkClosed),
        }
    }

    /// Reads the link until the router acknowledges `pkid`.
    async fn acknowledged(&mut self, pkid: u16) -> Result<(), LinkClosed> {
        loop {
            match self.rx.next().await? {
                Some(RouterEvent::Packet(Packet::PubAck(ack, _))) if ack.pkid == pkid => {
                    return Ok(())
                }
                Some(RouterEvent::Packet(Packet::PubComp(comp, _))) if comp.pkid == pkid => {
                    return Ok(())
                }
                Some(RouterEvent::Packet(_)) => {}
                Some(RouterEvent::Paused) | None => self.rx.wake().await?,
            }
        }
    }

    /// Reads what the router has ready (acknowledgements of QoS 0
    /// publishes there are none; a pause is answered), without waiting.
    fn drain_ready(&mut self) -> Result<(), LinkClosed> {
        while let Some(event) = self.rx.try_next()? {
            if let RouterEvent::Paused = event {
                // The wake is small and never blocks for long; a paused link
                // is asked again on the next publish that waits.
                break;
            }
        }
        Ok(())
    }
}
