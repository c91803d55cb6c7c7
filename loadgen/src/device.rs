//! Owns one simulated device's life: its credentials, connection (TCP, TLS
//! or WebSocket), CONNECT and subscriptions with every SUBACK checked, the
//! publishes the pacer owes it, and the accounting of each reply (latency,
//! loss, duplicates) into the shard's counters. The shard that runs many
//! of them is [`crate::run`]'s.

use crate::mqtt::{self, ConnectParams, Connection, Incoming, Stream};
use crate::payload;
use crate::run::{Ctx, DeviceAuth, DeviceEnd, JwtKey, RunConfig, Slot};
use bytes::BytesMut;
use protocol::claims::DeviceClaims;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn mint(cfg: &RunConfig, uid: &str) -> Result<(String, String), String> {
    match &cfg.auth {
        DeviceAuth::Jwt { key, ttl_secs } => {
            let claims = DeviceClaims::new(uid, *ttl_secs);
            let token = match key {
                JwtKey::Secret(s) => claims.sign_hs256(s),
                JwtKey::Pem { alg, pem, kid } => claims.sign_pem(*alg, pem, kid.as_deref()),
            }
            .map_err(|e| format!("minting token for {uid}: {e}"))?;
            Ok((protocol::topics::DEVICE_USERNAME.to_owned(), token))
        }
        DeviceAuth::Password { username, password } => Ok((username.clone(), password.clone())),
        DeviceAuth::Anonymous => Ok((String::new(), String::new())),
    }
}

pub(crate) async fn device(
    ctx: Arc<Ctx>,
    global: u64,
    new_user: bool,
    ready: mpsc::UnboundedSender<Arc<Slot>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let slot = Arc::new(Slot::default());
    let uid = ctx.cfg.uid(global);
    let res = run_device(&ctx, global, &uid, new_user, &slot, &ready, permit).await;
    slot.alive.store(false, Relaxed);
    match res {
        Ok(()) => {}
        Err(DeviceEnd::Setup(e)) => {
            if new_user {
                ctx.counters.new_failed.fetch_add(1, Relaxed);
            } else {
                ctx.counters.connect_failed.fetch_add(1, Relaxed);
            }
            ctx.note_error(format!("{uid}: {e}"));
        }
        Err(DeviceEnd::Dropped(e)) => {
            ctx.counters.dropped.fetch_add(1, Relaxed);
            ctx.note_error(format!("{uid}: {e}"));
        }
    }
}

async fn run_device(
    ctx: &Arc<Ctx>,
    global: u64,
    uid: &str,
    new_user: bool,
    slot: &Arc<Slot>,
    ready: &mpsc::UnboundedSender<Arc<Slot>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), DeviceEnd> {
    let cfg = &ctx.cfg;
    let (username, password) = mint(cfg, uid).map_err(DeviceEnd::Setup)?;
    let conn = tokio::select! {
        r = tokio::time::timeout(cfg.connect_timeout, mqtt::open_at(&cfg.endpoint, cfg.node_addr(global), cfg.source(global))) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(DeviceEnd::Setup(format!("connect: {e}"))),
            Err(_) => return Err(DeviceEnd::Setup("connect: timed out".into())),
        },
        _ = ctx.cancel.cancelled() => return Ok(()),
    };
    let client_id = format!("lg-{uid}");
    let params = ConnectParams {
        client_id: &client_id,
        username: (!matches!(cfg.auth, DeviceAuth::Anonymous)).then_some(username.as_str()),
        password: (!matches!(cfg.auth, DeviceAuth::Anonymous)).then_some(password.as_str()),
        keep_alive: cfg.keep_alive,
        clean: true,
    };
    let dev = Device {
        ctx,
        global,
        uid,
        new_user,
        slot,
    };
    match conn {
        Connection::Tcp(s) => dev.session(s, &params, ready, permit).await,
        Connection::Tls(s) => dev.session(s, &params, ready, permit).await,
        Connection::Ws(s) => dev.session(s, &params, ready, permit).await,
    }
}

struct Device<'a> {
    ctx: &'a Arc<Ctx>,
    global: u64,
    uid: &'a str,
    new_user: bool,
    slot: &'a Arc<Slot>,
}

impl Device<'_> {
    async fn session<S: Stream>(
        &self,
        mut s: S,
        params: &ConnectParams<'_>,
        ready: &mpsc::UnboundedSender<Arc<Slot>>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<(), DeviceEnd> {
        let ctx = self.ctx;
        let cfg = &ctx.cfg;
        let c = &ctx.counters;
        let mut rbuf = BytesMut::with_capacity(1024);
        let mut wbuf = BytesMut::with_capacity(256);
        let filters = cfg.filters(self.uid);
        let setup = mqtt::setup(
            &mut s,
            &mut rbuf,
            &mut wbuf,
            cfg.version,
            params,
            &filters,
            cfg.qos,
        );
        let granted = match tokio::time::timeout(cfg.connect_timeout, setup).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => return Err(DeviceEnd::Setup(e.to_string())),
            Err(_) => return Err(DeviceEnd::Setup("CONNACK/SUBACK timed out".into())),
        };
        drop(permit);
        if !self.new_user {
            c.connected.fetch_add(1, Relaxed);
        }
        let ok = granted.iter().filter(|g| **g).count() as u64;
        c.subs_acked.fetch_add(ok, Relaxed);
        c.subs_refused.fetch_add(filters.len() as u64 - ok, Relaxed);
        if granted.len() != filters.len() || ok != filters.len() as u64 {
            return Err(DeviceEnd::Setup(format!(
                "SUBACK granted {ok} of {} filters",
                filters.len()
            )));
        }
        self.slot.alive.store(true, Relaxed);
        if self.new_user {
            c.new_joined.fetch_add(1, Relaxed);
        } else {
            c.ready.fetch_add(1, Relaxed);
        }
        let _ = ready.send(self.slot.clone());
        self.run_loop(s, rbuf, wbuf, filters).await
    }

    async fn run_loop<S: Stream>(
        &self,
        mut s: S,
        mut rbuf: BytesMut,
        mut wbuf: BytesMut,
        filters: Vec<String>,
    ) -> Result<(), DeviceEnd> {
        let ctx = self.ctx;
        let cfg = &ctx.cfg;
        let c = &ctx.counters;
        let reply_topic = filters.into_iter().next().unwrap_or_default().into_bytes();
        let command = cfg.command_topic.as_bytes();
        let uid_in_payload = cfg.uid_in_payload.then_some(self.uid);
        let mut seq: u64 = 0;
        let mut recv_bits: Vec<u64> = Vec::new();
        let mut pkid: u16 = 0;
        let mut body = Vec::with_capacity(cfg.payload_size.max(payload::HEADER_LEN + 64));
        let ping_every =
            Duration::from_secs(u64::from(cfg.keep_alive) * 3 / 4).max(Duration::from_secs(1));
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        let keep_alive = cfg.keep_alive > 0;
        let dropped = |e: String| DeviceEnd::Dropped(e);

        let mut publish = |wbuf: &mut BytesMut, seq: &mut u64| -> Result<(), DeviceEnd> {
            payload::encode(
                *seq,
                ctx.now_ns(),
                uid_in_payload,
                cfg.payload_size,
                &mut body,
            );
            *seq += 1;
            let id = if cfg.qos == 1 {
                pkid = pkid.checked_add(1).unwrap_or(1);
                Some(pkid)
            } else {
                None
            };
            mqtt::encode_publish(cfg.version, command, &body, id, wbuf)
                .map_err(|e| DeviceEnd::Dropped(e.to_string()))
        };

        if self.new_user {
            // A new user's first command: its reply is the first message ever
            // routed to its reply topic.
            publish(&mut wbuf, &mut seq)?;
            s.write_all(&wbuf)
                .await
                .map_err(|e| dropped(e.to_string()))?;
            wbuf.clear();
            c.sent.fetch_add(1, Relaxed);
        }

        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {
                    wbuf.clear();
                    mqtt::encode_disconnect(&mut wbuf);
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = s.write_all(&wbuf).await;
                        let _ = s.shutdown().await;
                    }).await;
                    return Ok(());
                }
                r = s.read_buf(&mut rbuf) => {
                    match r {
                        Ok(0) => return Err(dropped("broker closed the connection".into())),
                        Ok(_) => {}
                        Err(e) => return Err(dropped(e.to_string())),
                    }
                    loop {
                        let packet = match mqtt::decode(cfg.version, &mut rbuf) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => return Err(dropped(e.to_string())),
                        };
                        match packet {
                            Incoming::Publish { topic, payload: body_in, pkid: id, .. } => {
                                if let Some(id) = id {
                                    mqtt::encode_puback(id, &mut wbuf);
                                }
                                if topic[..] != reply_topic[..] {
                                    c.other_received.fetch_add(1, Relaxed);
                                    continue;
                                }
                                self.on_reply(&body_in, seq, &mut recv_bits);
                            }
                            Incoming::Disconnect { reason } => {
                                return Err(dropped(format!("broker disconnected: {reason}")));
                            }
                            _ => {}
                        }
                    }
                    if rbuf.capacity() - rbuf.len() < 512 {
                        rbuf.reserve(1024);
                    }
                    if !wbuf.is_empty() {
                        s.write_all(&wbuf).await.map_err(|e| dropped(e.to_string()))?;
                        wbuf.clear();
                    }
                }
                _ = self.slot.notify.notified() => {
                    let n = self.slot.pending.swap(0, Relaxed);
                    for _ in 0..n {
                        publish(&mut wbuf, &mut seq)?;
                    }
                    s.write_all(&wbuf).await.map_err(|e| dropped(e.to_string()))?;
                    wbuf.clear();
                    c.sent.fetch_add(u64::from(n), Relaxed);
                }
                _ = ping.tick(), if keep_alive => {
                    mqtt::encode_pingreq(&mut wbuf);
                    s.write_all(&wbuf).await.map_err(|e| dropped(e.to_string()))?;
                    wbuf.clear();
                }
            }
        }
    }

    fn on_reply(&self, body: &[u8], sent: u64, recv_bits: &mut Vec<u64>) {
        let ctx = self.ctx;
        let c = &ctx.counters;
        let Some((sq, ts)) = payload::decode(body) else {
            c.unexpected.fetch_add(1, Relaxed);
            return;
        };
        if sq >= sent {
            c.unexpected.fetch_add(1, Relaxed);
            return;
        }
        let (word, bit) = ((sq / 64) as usize, sq % 64);
        if recv_bits.len() <= word {
            recv_bits.resize(word + 1, 0);
        }
        if recv_bits[word] & (1 << bit) != 0 {
            c.duplicated.fetch_add(1, Relaxed);
            return;
        }
        recv_bits[word] |= 1 << bit;
        c.received.fetch_add(1, Relaxed);
        let us = ctx.now_ns().saturating_sub(ts) / 1000;
        ctx.latency.record(self.global as usize, us);
        if self.new_user && sq == 0 {
            ctx.first.record(self.global as usize, us);
            c.new_first_reply.fetch_add(1, Relaxed);
        }
    }
}
