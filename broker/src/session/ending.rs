//! Owns the end of a session: the goodbye to the client (DISCONNECT with
//! the server's reason), the will (now, delayed in `wills`, or dropped for
//! a revoked user), closing or handing over the router session, keeping a
//! persistent session's subscriptions and QoS 2 state for its next
//! connection, and its expiry. A device's will is armed with delivery
//! when its session opens (`arm_will`) and ended there once published,
//! parked or dropped (`Delivery::will_armed`, `will_done`).

use super::state::{End, SessionState};
use super::wire::Wire;
use super::Session;
use crate::answers::{self, ServerDisconnect};
use crate::auth::Principal;
use crate::gate::Gate;
use crate::identity;
use crate::router::protocol::{Disconnect, DisconnectReasonCode, Packet, Publish, QoS};
use crate::router::RouterError;
use crate::wills::{self, ReadyWill, WillClock};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

/// Ends the session: tells the client and the router, fires the will,
/// and leaves a persistent session to its expiry.
pub(super) async fn finish<S: AsyncRead + AsyncWrite>(
    mut session: Session,
    mut wire: Wire<S>,
    end: End,
) {
    let kind = session.state.who.principal.kind();
    match end {
        End::ClientDisconnect { with_will } => {
            info!(with_will, "client disconnected");
            if with_will {
                fire_will(&mut session).await;
            }
            let _ = session.tx.send(normal_disconnect()).await;
        }
        End::Abnormal(why) => {
            info!(reason = why, "connection lost");
            fire_will(&mut session).await;
            let _ = session.tx.send(normal_disconnect()).await;
        }
        End::Server(why) => {
            info!(reason = why.reason(), "server ends the session");
            session.state.gate.metrics().session_ended(why.reason());
            // A client that stopped reading would not get it anyway.
            if !session.write_stalled {
                if let Some(packet) = answers::server_disconnect(session.state.version(), why) {
                    wire.queue(packet);
                    let _ = wire.output.flush_within(Duration::from_secs(2)).await;
                }
            }
            // A revoked user's will is dropped: it would act for them.
            if why != ServerDisconnect::ShuttingDown && why != ServerDisconnect::Revoked {
                fire_will(&mut session).await;
            }
            // A replaced session must not touch the router again: its
            // successor now owns the client id there.
            if why != ServerDisconnect::TakenOver {
                let _ = session.tx.send(normal_disconnect()).await;
            }
        }
    }
    // A will not fired (a normal DISCONNECT, a revoked user, shutdown)
    // ends its arming here.
    if session.state.will.take().is_some() {
        will_done(&session.state);
    }
    if !session.write_stalled {
        wire.output.shutdown().await;
    }
    // The socket closes when `wire` is dropped here, whatever it held.
    drop(wire);
    session.finished = true;
    let state = &mut session.state;
    let gate = state.gate.clone();
    gate.metrics().connection_closed(kind);
    if !state.who.clean_session {
        // Its subscriptions stay in the router (delivery keeps its row
        // when the state is dropped), and so do its unreleased QoS 2
        // publishes: the next connection takes them back.
        let held = state.flows.take_held();
        gate.sessions().keep_qos2(state.claim.id(), held);
    }
    // A persistent session stays in the router until its expiry (unless
    // a new connection took it over). The claim is released first so the
    // expiry finds the id free.
    if !state.who.clean_session && !state.taken_over() {
        gate.sessions().left_away(&state.claim);
        let (id, serial) = (state.claim.id().to_owned(), state.claim.serial());
        let after = state.session_expiry;
        // The expiry its DISCONNECT may have changed: what delivery keeps
        // of the session (on several nodes, its record) lasts as long.
        gate.delivery().session_expiry(&id, after);
        drop(session);
        expire_session_later(gate, id, serial, after);
    }
}

/// Publishes the will, stamped like any publish of this client, with its
/// MQTT 5 properties: now, or, with a Will Delay Interval and a session
/// that outlives the connection, later (`wills`). A device whose token
/// its user's revocation refuses by now gets no will (checked again
/// when a delayed one falls due).
async fn fire_will(session: &mut Session) {
    let state = &mut session.state;
    let Some(will) = state.will.take() else {
        return;
    };
    let super::state::Will {
        will,
        delay_secs,
        properties: will_properties,
    } = *will;
    let (properties, retain, owner) = match &state.who.principal {
        Principal::Device(device) => {
            if state.gate.is_revoked(device).await {
                info!("the user was revoked: the will is dropped");
                will_done(state);
                return;
            }
            let will_properties = super::tags::strip_forged_from(will_properties);
            let stamped = identity::stamp(will_properties, device, &state.who.client_id);
            (Some(stamped), false, Some(device.clone()))
        }
        // A delivery tag is the gate's own: never a will's.
        Principal::Handler(_) => (
            super::tags::strip_forged_from(will_properties),
            will.retain,
            None,
        ),
    };
    // Only a session that outlives its connection, and so counts
    // against its user's persistent sessions, can park a will.
    let delay = (!state.who.clean_session)
        .then(|| wills::delay(delay_secs, state.session_expiry))
        .flatten();
    if let Some(after) = delay {
        // Published through the gate's own router link: this one closes.
        let publish = Publish::with_qos(will.topic, will.message, retain, will.qos, 0);
        let will = ReadyWill {
            publish,
            properties,
            owner,
        };
        let connection = state.claim.serial();
        let delivery = state.gate.delivery();
        delivery.will_armed(state.claim.id(), connection, &will, WillClock::DueIn(after));
        state
            .gate
            .wills()
            .schedule(state.claim.id(), connection, will, after);
        return;
    }
    will_done(state);
    // The router delivers at each subscription's QoS; a QoS 1/2 will
    // also gets a packet id the router acknowledges to this (closing)
    // link, one that no QoS 2 publish of this client holds.
    let pkid = if will.qos == QoS::AtMostOnce {
        0
    } else {
        state.flows.will_pkid()
    };
    let publish = Publish::with_qos(will.topic, will.message, retain, will.qos, pkid);
    info!("publishing will");
    let gate = state.gate.clone();
    let _ = crate::will_publisher::send_will(&gate, &mut session.tx, publish, properties).await;
}

/// Arms the will of a device session that opens (see the module's doc): as
/// it would be published, due once the connection ends, after its delay if
/// the session outlives the connection.
pub(super) fn arm_will(state: &SessionState) {
    let (Some(will), Principal::Device(device)) = (&state.will, &state.who.principal) else {
        return;
    };
    let stamped = identity::stamp(will.properties.clone(), device, &state.who.client_id);
    let ready = ReadyWill {
        publish: Publish::with_qos(
            will.will.topic.clone(),
            will.will.message.clone(),
            false,
            will.will.qos,
            0,
        ),
        properties: Some(stamped),
        owner: Some(device.clone()),
    };
    let delay = (!state.who.clean_session)
        .then(|| wills::delay(will.delay_secs, state.session_expiry))
        .flatten()
        .unwrap_or_default();
    state.gate.delivery().will_armed(
        state.claim.id(),
        state.claim.serial(),
        &ready,
        WillClock::AfterEnd(delay),
    );
}

/// The will a device connection armed is published or dropped here.
fn will_done(state: &SessionState) {
    if matches!(state.who.principal, Principal::Device(_)) {
        state
            .gate
            .delivery()
            .will_done(state.claim.id(), state.claim.serial());
    }
}

/// Ends the persistent session connection `serial` left behind once `after`
/// has passed, unless its client came back.
fn expire_session_later(gate: Arc<Gate>, id: String, serial: u64, after: Duration) {
    tokio::spawn(async move {
        tokio::select! {
            _ = gate.shutting_down() => return,
            _ = tokio::time::sleep(after) => {}
        }
        let Some(expiring) = gate.sessions().claim_to_expire(&id, serial) else {
            return;
        };
        gate.sessions().release_qos2(&id);
        gate.delivery().expire(&id);
        match forget_router_session(&gate, id).await {
            Ok(()) => debug!(session = expiring.id(), "persistent session expired"),
            Err(e) => warn!(error = %e, "could not expire a persistent session"),
        }
    });
}

/// Makes the router forget the session stored under `id`: it does so when a
/// clean session with that id connects and leaves.
pub(super) async fn forget_router_session(gate: &Gate, id: String) -> Result<(), RouterError> {
    let mut link = gate.open_router_session(id, true, u16::MAX).await?;
    let _ = link.tx.send(normal_disconnect()).await;
    Ok(())
}

pub(super) fn normal_disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}
