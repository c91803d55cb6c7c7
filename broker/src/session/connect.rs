//! Owns the start of a session: the CONNECT deadline, the MQTT 5 rules on
//! CONNECT, authentication and admission, the client id, the will's ACL and
//! caps, takeover (claiming the session id), opening the router link, and
//! the CONNACK. Refusals are answered here (`answers`).

use super::ending::{forget_router_session, normal_disconnect};
use super::state::{session_expiry, Accepted, Deadlines, SessionState, Who, Will};
use super::wire::{ConnectReadError, Wire};
use super::Admits;
use crate::acl::{self, Denial};
use crate::answers::{self, ConnectRefusal};
use crate::auth::{Principal, Refusal};
use crate::codec::{Codec, CodecError, Version};
use crate::delivery::{Kind, Opening, Request, Resumed, Served, SessionSubscription};
use crate::gate::Gate;
use crate::inbound::InboundFlows;
use crate::property_caps;
use crate::router::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Packet, RetainForwardRule, Subscribe,
    SubscribeProperties,
};
use crate::router::{RouterEvent, RouterLink};
use crate::sessions::{device_session_id, handler_session_id};
use crate::translate;
use crate::validate;
use crate::wills;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Reads the CONNECT (within the deadline) and decides it: the session and
/// its router link, or `None` (refused and answered, or gone).
pub async fn open_session<S: AsyncRead + AsyncWrite>(
    gate: &Arc<Gate>,
    wire: &mut Wire<S>,
    admits: Admits,
) -> Option<(SessionState, RouterLink)> {
    let max_packet = gate.limits().max_packet_size;
    let first =
        tokio::time::timeout(gate.limits().connect_timeout, wire.read_connect(max_packet)).await;
    let packet = match first {
        Ok(Ok(packet)) => packet,
        Ok(Err(ConnectReadError::Codec(CodecError::UnsupportedProtocol(level)))) => {
            info!(level, "refused: unsupported protocol level");
            gate.metrics().connect_refused("unsupported protocol");
            wire.output.codec = Codec::new(Version::V4, max_packet);
            let refusal =
                answers::connack_refusal(Version::V4, &ConnectRefusal::UnsupportedProtocol);
            let _ = wire.send_now(refusal).await;
            return None;
        }
        Ok(Err(ConnectReadError::Codec(e @ CodecError::ProtocolViolation(_)))) => {
            // Only the MQTT 5 decoder reports these (a property repeated).
            info!(error = %e, "refused: CONNECT breaks a rule of MQTT 5");
            let refusal = ConnectRefusal::ProtocolError("a property appears more than once");
            gate.metrics().connect_refused(refusal.reason());
            wire.output.codec = Codec::new(Version::V5, max_packet);
            let _ = wire
                .send_now(answers::connack_refusal(Version::V5, &refusal))
                .await;
            return None;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "closed before CONNECT");
            gate.metrics().socket_dropped("not_mqtt");
            return None;
        }
        Err(_) => {
            info!("no CONNECT before the deadline");
            gate.metrics().socket_dropped("connect_timeout");
            return None;
        }
    };
    accept(gate, wire, packet, admits).await
}

/// Decides a CONNECT: authentication, client id, will, router session.
/// Answers refusals itself and returns `None` for them.
async fn accept<S: AsyncRead + AsyncWrite>(
    gate: &Arc<Gate>,
    wire: &mut Wire<S>,
    packet: Packet,
    admits: Admits,
) -> Option<(SessionState, RouterLink)> {
    let Packet::Connect(connect, properties, will, will_properties, login) = packet else {
        gate.metrics().socket_dropped("not_mqtt");
        return None;
    };
    let version = wire.output.codec.version;
    let refuse = |refusal: ConnectRefusal| {
        info!(reason = refusal.reason(), "connect refused");
        gate.metrics().connect_refused(refusal.reason());
        answers::connack_refusal(version, &refusal)
    };
    // First: a CONNECT MQTT 5 forbids costs no token verification.
    if let Err(refusal) = validate::connect_properties(properties.as_ref()) {
        let _ = wire.send_now(refuse(refusal)).await;
        return None;
    }
    if let Err(refusal) = crate::sessions::check_client_id(&connect.client_id, gate.limits()) {
        let _ = wire.send_now(refuse(refusal)).await;
        return None;
    }
    let principal = match gate
        .authenticate(
            login.as_ref().map(|l| l.username.as_str()),
            login.as_ref().map(|l| l.password.as_bytes()),
        )
        .await
    {
        Ok(principal) => principal,
        Err(refusal) => {
            let _ = wire.send_now(refuse(ConnectRefusal::Auth(refusal))).await;
            return None;
        }
    };
    let span = tracing::Span::current();
    span.record("kind", principal.kind());
    if matches!(principal, Principal::Handler(_)) {
        wire.output.receiver = translate::Receiver::Handler;
    }
    if let Some(max) = properties.as_ref().and_then(|p| p.max_packet_size) {
        wire.output.client_max_packet = usize::try_from(max).unwrap_or(usize::MAX);
    }
    if let Principal::Device(device) = &principal {
        span.record("uid", device.uid().as_str());
        if admits == Admits::HandlersOnly {
            let refusal = ConnectRefusal::Auth(Refusal::NotAuthorized(
                "devices connect on the public listeners",
            ));
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
        if gate.is_revoked(device).await {
            let refusal = ConnectRefusal::Auth(Refusal::NotAuthorized("user revoked"));
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
    }

    let assigned_client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            let refusal =
                ConnectRefusal::ClientIdNotValid("an empty client id needs a clean session");
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
        Some(format!("auto-{:016x}", rand::thread_rng().gen::<u64>()))
    } else {
        None
    };
    let client_id = assigned_client_id.clone().unwrap_or(connect.client_id);
    span.record("client_id", client_id.as_str());

    if let Some(will) = &will {
        let allowed = std::str::from_utf8(&will.topic)
            .map_err(|_| Denial::Invalid)
            .and_then(|topic| {
                acl::may_publish(&principal, topic, gate.delivery(), &gate.limits().topics)
            });
        if allowed.is_err() {
            let _ = wire.send_now(refuse(ConnectRefusal::WillNotAllowed)).await;
            return None;
        }
        let caps = &gate.limits().device_properties;
        if let Err(refusal) = property_caps::allow_will(&principal, caps, will_properties.as_ref())
        {
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
    }

    // A keep-alive of 0 (none) or beyond the maximum gets the maximum.
    let max_keep_alive = gate.limits().max_keep_alive_secs;
    let granted_keep_alive = match connect.keep_alive {
        0 => max_keep_alive,
        asked => asked.min(max_keep_alive),
    };

    // Before any router state exists: nothing after the router link is
    // opened may fail on the client's input.
    let token_deadline = match &principal {
        // Checked arithmetic, clamped: an enormous `exp` is "never", not a panic.
        Principal::Device(device) => device.session_deadline(gate.leeway_secs()),
        Principal::Handler(_) => None,
    };
    let session_id = match &principal {
        Principal::Device(device) => device_session_id(device.uid(), &client_id),
        Principal::Handler(_) => handler_session_id(&client_id),
    };
    let device = match &principal {
        Principal::Device(device) => Some(device),
        Principal::Handler(_) => None,
    };
    // MQTT 5 separates starting afresh (Clean Start) from outliving the
    // connection (Session Expiry Interval > 0); 3.1.1's Clean Session flag
    // means both. `clean_session` is the gate's sense: nothing of the
    // session outlives the connection. A Clean Start with an expiry starts
    // a new persistent session: whatever was stored goes first.
    let asked_expiry = properties.as_ref().and_then(|p| p.session_expiry_interval);
    let clean_session = match version {
        Version::V4 => connect.clean_session,
        Version::V5 => connect.clean_session && asked_expiry.unwrap_or(0) == 0,
    };
    let discard_stored = connect.clean_session && !clean_session;
    let admitted = gate
        .sessions()
        .admit(&session_id, &principal, clean_session, gate.limits());
    if let Err(refusal) = admitted {
        let _ = wire.send_now(refuse(refusal)).await;
        return None;
    }
    let claim = gate.sessions().claim(session_id.clone(), device).await;
    if discard_stored {
        // The persistent session is opened after the stored one is gone.
        if let Err(e) = forget_router_session(gate, session_id.clone()).await {
            warn!(error = %e, "could not discard a stored session");
        }
    }
    // A persistent device session this node does not hold may have lived
    // on another node (a delivery of several nodes knows): it resumes here.
    let moved = if device.is_some() && !clean_session && !connect.clean_session {
        match tokio::time::timeout(RESUME_WAIT, gate.delivery().resume(claim.id())).await {
            Ok(Resumed::Here) => None,
            Ok(Resumed::Moved(subscriptions)) => Some(subscriptions),
            Ok(Resumed::Unavailable) | Err(_) => {
                warn!("the session's record could not be read in time: refused");
                let refusal =
                    ConnectRefusal::Auth(Refusal::Unavailable("the session cannot be resumed now"));
                let _ = wire.send_now(refuse(refusal)).await;
                return None;
            }
        }
    } else {
        None
    };
    let receive_maximum = properties
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .unwrap_or(u16::MAX);
    let mut link = match gate
        .open_router_session(session_id, clean_session, receive_maximum)
        .await
    {
        Ok(link) => link,
        Err(e) => {
            warn!(error = %e, "router refused the session");
            let refusal = ConnectRefusal::Busy("the broker cannot take more sessions now");
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
    };

    if let Some(subscriptions) = &moved {
        if let Err(why) = resubscribe(&mut link, subscriptions).await {
            warn!(
                reason = why,
                "the moved session's subscriptions were not re-established"
            );
            let _ = link.tx.send(normal_disconnect()).await;
            let refusal =
                ConnectRefusal::Auth(Refusal::Unavailable("the session cannot be resumed now"));
            let _ = wire.send_now(refuse(refusal)).await;
            return None;
        }
        link.session_present = true;
        info!(
            subscriptions = subscriptions.len(),
            "persistent session resumed from another node"
        );
    }

    // A new connection to this session: a will still waiting for its delay
    // is cancelled (the session is resumed) or, if it starts clean (the old
    // session ends), published now (MQTT 5 §3.1.3.2.2, MQTT-3.1.3-9).
    gate.wills()
        .session_reconnected(claim.id(), connect.clean_session);
    // And one another node armed for it, if that node died.
    if device.is_some() {
        gate.delivery()
            .will_reconnected(claim.id(), connect.clean_session);
    }

    let connack_properties = match version {
        Version::V4 => None,
        Version::V5 => Some(ConnAckProperties {
            assigned_client_identifier: assigned_client_id,
            server_keep_alive: (granted_keep_alive != connect.keep_alive)
                .then_some(granted_keep_alive),
            max_packet_size: u32::try_from(gate.limits().max_packet_size).ok(),
            receive_max: Some(gate.limits().receive_maximum),
            retain_available: Some(1),
            shared_subscription_available: Some(1),
            wildcard_subscription_available: Some(u8::from(matches!(
                principal,
                Principal::Handler(_)
            ))),
            // Delivered with each matching publish (absent = available).
            subscription_identifiers_available: None,
            ..Default::default()
        }),
    };
    let connack = Packet::ConnAck(
        ConnAck {
            session_present: link.session_present,
            code: ConnectReturnCode::Success,
        },
        connack_properties,
    );
    if wire.send_now(connack).await.is_err() {
        // Client gone before hearing yes: end the router session cleanly.
        let _ = link.tx.send(normal_disconnect()).await;
        return None;
    }
    gate.metrics().connection_opened(principal.kind());
    info!(session_present = link.session_present, "connected");

    let (kind, cap) = match principal {
        Principal::Device(_) => (Kind::Device, gate.limits().device_max_subscriptions),
        Principal::Handler(_) => (Kind::Handler, gate.limits().handler_max_subscriptions),
    };
    let opening = Opening {
        kind,
        persistent: !clean_session,
        clean_start: connect.clean_session,
        cap,
    };
    let mut subs = gate.delivery().open(claim.id(), opening);
    let expiry = session_expiry(version, asked_expiry, gate.limits().max_session_expiry);
    if !clean_session && kind == Kind::Device {
        gate.delivery().session_expiry(claim.id(), expiry);
    }
    if let Some(subscriptions) = &moved {
        // The router serves them again (`resubscribe`); the table learns
        // them as from the client's SUBSCRIBE, and so does the cluster.
        for subscription in subscriptions {
            let request = Request {
                filter: &subscription.filter,
                qos: subscription.qos,
                resend_retained: false,
                served: Served {
                    subscription_id: subscription.subscription_id,
                    retain_as_published: subscription.retain_as_published,
                },
            };
            if let Err(denial) = gate.delivery().subscribe(&mut subs, &request) {
                warn!(filter = %subscription.filter, reason = denial.label(), "a moved subscription was not kept");
            }
        }
        gate.delivery().subscribed(claim.id(), subscriptions);
    }
    // A router that kept no session (Session Present 0) holds none of them.
    let held_qos2 = gate
        .sessions()
        .resume_qos2(claim.id(), connect.clean_session || !link.session_present);
    let keep_alive = Duration::from_secs(u64::from(granted_keep_alive));
    let accepted = Accepted {
        who: Who {
            principal,
            client_id,
            version,
            clean_session,
            connect_expiry_zero: version == Version::V5 && asked_expiry.unwrap_or(0) == 0,
        },
        claim,
        subs,
        // The Receive Maximum is the session's: what its earlier
        // connections left unreleased still counts.
        flows: InboundFlows::resumed(version, gate.limits().receive_maximum, held_qos2),
        deadlines: Deadlines {
            token: token_deadline,
            silence_limit: keep_alive.mul_f32(1.5),
            last_heard: Instant::now(),
        },
        session_expiry: expiry,
        will: will.map(|will| Will {
            // Out of the CONNECT's read buffer, which it would keep alive.
            will: wills::owned_will(will),
            delay_secs: will_properties.as_ref().and_then(|p| p.delay_interval),
            properties: wills::publish_properties(will_properties.as_ref()),
        }),
    };
    let state = SessionState::new(gate.clone(), accepted);
    super::ending::arm_will(&state);
    Some((state, link))
}

/// How long a CONNECT waits for delivery to say whether its persistent
/// session lived on another node, and for the router to take its
/// subscriptions back; beyond it the client is told to come back later.
pub const RESUME_WAIT: Duration = Duration::from_secs(2);

/// Subscribes a moved session's router session to what it held, one
/// SUBSCRIBE per subscription identifier, and swallows the SUBACKs: the
/// client made these subscriptions on another node. Retain Handling
/// becomes "never": resuming is not subscribing again.
async fn resubscribe(
    link: &mut RouterLink,
    subscriptions: &[SessionSubscription],
) -> Result<(), &'static str> {
    let mut by_id: Vec<(Option<usize>, Vec<_>)> = Vec::new();
    for subscription in subscriptions {
        let mut filter = subscription.filter();
        filter.retain_forward_rule = RetainForwardRule::Never;
        match by_id
            .iter_mut()
            .find(|(id, _)| *id == subscription.subscription_id)
        {
            Some((_, filters)) => filters.push(filter),
            None => by_id.push((subscription.subscription_id, vec![filter])),
        }
    }
    let wait = async {
        for (n, (id, filters)) in by_id.into_iter().enumerate() {
            let pkid = u16::try_from(n + 1).unwrap_or(u16::MAX);
            let properties = id.map(|id| SubscribeProperties {
                id: Some(id),
                user_properties: Vec::new(),
            });
            let subscribe = Packet::Subscribe(Subscribe { pkid, filters }, properties);
            link.tx
                .send(subscribe)
                .await
                .map_err(|_| "router link closed")?;
            loop {
                match link.rx.next().await.map_err(|_| "router link closed")? {
                    Some(RouterEvent::Packet(Packet::SubAck(ack, _))) if ack.pkid == pkid => break,
                    Some(RouterEvent::Packet(other)) => {
                        debug!(packet = ?other, "router packet before the resumed SUBACK: dropped");
                    }
                    Some(RouterEvent::Paused) | None => {
                        link.rx.wake().await.map_err(|_| "router link closed")?
                    }
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(RESUME_WAIT, wait)
        .await
        .unwrap_or(Err("the router did not answer in time"))
}
