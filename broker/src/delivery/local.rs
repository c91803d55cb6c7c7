//! Owns delivery on one node: the path decision for each subscription, a
//! session's row at the start and end of each connection, and the rows of
//! persistent sessions whose client is away (until the client comes back,
//! a clean start replaces them, or they expire).

use super::row::Doubled;
use super::{
    CommandTopics, Delivery, Denial, Kind, Opening, Path, Publish, PublishProperties, Request,
    Routed, Subscriptions, Table,
};
use crate::router::protocol::QoS;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;

/// Delivery on this node alone.
pub struct LocalDelivery {
    table: Table,
    /// The rows persistent sessions left when their connection ended, by
    /// session id: their subscriptions stay in the router (and counted in
    /// the table) meanwhile.
    kept: Mutex<HashMap<String, Subscriptions>>,
}

impl LocalDelivery {
    /// Delivery with the operator's command topics, keeping the table's
    /// size in `gauge` (`/metrics`: `reply_index_topics`).
    pub fn new(configured: impl IntoIterator<Item = String>, gauge: Gauge) -> Self {
        LocalDelivery {
            table: Table::new(configured, gauge),
            kept: Mutex::default(),
        }
    }

    /// The shared table (tests and metrics read it).
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Takes `filter` into the table for `row`'s inbox if the gate can serve
    /// it: a QoS 0 subscription of a clean device session (one with an
    /// inbox) that this connection has not already made through the router.
    ///
    /// A subscription keeps its path for as long as it exists: moving it
    /// while messages are on their way would lose or repeat some (MQTT
    /// 3.8.4: a resubscription must not interrupt the flow). So a QoS 1/2
    /// resubscription of a topic the gate serves stays with the gate, at
    /// granted QoS 0 (a server may grant less than asked); unsubscribing
    /// first gets the higher QoS from the router. The exception: a topic
    /// that has held a retained message since, which a resubscription must
    /// send (Retain Handling 0) and only the router has; it moves there.
    fn serve_directly(&self, row: &mut Subscriptions, request: &Request<'_>) -> bool {
        let Some(inbox) = row.inbox.clone() else {
            return false;
        };
        let filter = request.filter;
        if row.is_direct(filter) {
            if request.resend_retained && self.table.is_retained(filter) {
                self.stop_serving(row, filter);
                return false;
            }
            return self.table.subscribe(filter, &inbox, request.served);
        }
        if request.qos != QoS::AtMostOnce || row.is_via_router(filter) {
            return false;
        }
        if !self.table.subscribe(filter, &inbox, request.served) {
            return false;
        }
        row.add_direct(filter);
        true
    }

    /// `filter` is about to be subscribed in the router: the table learns
    /// that the router serves it, before any publish can miss it.
    fn subscribing_in_router(&self, row: &mut Subscriptions, filter: &str) {
        if !row.add_via_router(filter) {
            return;
        }
        match row.kind {
            Kind::Device => self.table.device_subscribed_in_router(filter),
            Kind::Handler => self.table.handler_subscribed(filter),
        }
    }

    /// The gate stops serving `topic` to `row`, if it did.
    fn stop_serving(&self, row: &mut Subscriptions, topic: &str) {
        if row.inbox.is_none() || !row.remove_direct(topic) {
            return;
        }
        if let Some(inbox) = &row.inbox {
            self.table.unsubscribe(topic, inbox);
        }
    }

    /// Uncounts router filters and command declarations a row held, which
    /// the router no longer holds (or holds once for two counts).
    fn uncount<'a>(
        &self,
        kind: Kind,
        via_router: impl Iterator<Item = &'a str>,
        declared: impl Iterator<Item = &'a str>,
    ) {
        for filter in via_router {
            match kind {
                Kind::Handler => self.table.handler_unsubscribed(filter),
                Kind::Device => self.table.device_left_router(filter),
            }
        }
        for filter in declared {
            self.table.withdraw(filter);
        }
    }

    /// Keeps the row of persistent session `id`, whose connection ended;
    /// what an earlier connection's leftovers already count is uncounted
    /// (see `Subscriptions::absorb`).
    fn keep(&self, id: &str, row: Subscriptions) {
        let kind = row.kind;
        let doubled: Doubled = {
            let mut kept = self.kept.lock();
            match kept.get_mut(id) {
                Some(earlier) => earlier.absorb(row),
                None => {
                    kept.insert(id.to_owned(), row);
                    return;
                }
            }
        };
        let (via_router, declared) = (doubled.via_router.iter(), doubled.declared.iter());
        self.uncount(
            kind,
            via_router.map(String::as_str),
            declared.map(String::as_str),
        );
    }
}

impl CommandTopics for LocalDelivery {
    fn is_command(&self, topic: &str) -> bool {
        self.table.is_command(topic)
    }
}

impl Delivery for LocalDelivery {
    fn open(&self, id: &str, opening: Opening) -> Subscriptions {
        let fresh = || Subscriptions::new(opening.kind, opening.persistent, opening.cap);
        let kept = self.kept.lock().remove(id);
        match kept {
            Some(kept) if !opening.clean_start => kept,
            // A clean start ends that session in the router: what it left
            // is released.
            Some(kept) => {
                self.uncount(kept.kind, kept.via_router(), kept.declared());
                fresh()
            }
            None => fresh(),
        }
    }

    fn subscribe(&self, row: &mut Subscriptions, request: &Request<'_>) -> Result<Path, Denial> {
        row.admit(request.filter)?;
        if self.serve_directly(row, request) {
            return Ok(Path::Inbox);
        }
        self.subscribing_in_router(row, request.filter);
        Ok(Path::Router)
    }

    fn granted(&self, row: &mut Subscriptions, filter: &str) {
        if row.kind == Kind::Handler && row.declare(filter) {
            self.table.declare(filter);
        }
    }

    fn unsubscribe(&self, row: &mut Subscriptions, filter: &str) {
        self.stop_serving(row, filter);
        if row.kind == Kind::Handler {
            if row.undeclare(filter) {
                self.table.withdraw(filter);
            }
            if row.remove_via_router(filter) {
                self.table.handler_unsubscribed(filter);
            }
        }
        row.release(filter);
    }

    fn route(
        &self,
        topic: &str,
        publish: &Publish,
        properties: &Option<PublishProperties>,
    ) -> Routed {
        self.table.route(topic, publish, properties)
    }

    fn close(&self, id: &str, row: &mut Subscriptions) {
        let row = row.take();
        if row.persistent {
            // Its subscriptions stay in the router: the next connection
            // takes them back, the expiry releases them.
            self.keep(id, row);
            return;
        }
        if let Some(inbox) = &row.inbox {
            for topic in row.direct() {
                self.table.unsubscribe(topic, inbox);
            }
        }
        self.uncount(row.kind, row.via_router(), row.declared());
    }

    fn expire(&self, id: &str) {
        let kept = self.kept.lock().remove(id);
        if let Some(kept) = kept {
            self.uncount(kept.kind, kept.via_router(), kept.declared());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Served;
    use bytes::Bytes;

    fn delivery() -> LocalDelivery {
        LocalDelivery::new(["sync".to_owned()], Gauge::default())
    }

    fn opening(kind: Kind, persistent: bool, cap: usize) -> Opening {
        Opening {
            kind,
            persistent,
            clean_start: !persistent,
            cap,
        }
    }

    fn request(filter: &str, qos: QoS) -> Request<'_> {
        Request {
            filter,
            qos,
            resend_retained: false,
            served: Served::default(),
        }
    }

    fn publish(topic: &'static str, payload: &'static str, retain: bool) -> Publish {
        Publish::with_qos(
            Bytes::from_static(topic.as_bytes()),
            Bytes::from_static(payload.as_bytes()),
            retain,
            QoS::AtLeastOnce,
            1,
        )
    }

    fn drained(row: &Subscriptions) -> usize {
        let mut count = 0;
        if let Some(inbox) = row.inbox() {
            inbox.drain(|_| count += 1);
        }
        count
    }

    #[test]
    fn the_path_of_a_first_subscription() {
        use Kind::{Device, Handler};
        use QoS::{AtLeastOnce, AtMostOnce, ExactlyOnce};
        // (kind, persistent, asked QoS, topic held a retained message) ->
        // path (Inbox: granted QoS 0 by the gate; Router: the router grants)
        let table = [
            (Device, false, AtMostOnce, false, Path::Inbox),
            (Device, false, AtLeastOnce, false, Path::Router),
            (Device, false, ExactlyOnce, false, Path::Router),
            (Device, false, AtMostOnce, true, Path::Router),
            (Device, false, AtLeastOnce, true, Path::Router),
            (Device, true, AtMostOnce, false, Path::Router),
            (Device, true, AtLeastOnce, false, Path::Router),
            (Device, true, AtMostOnce, true, Path::Router),
            (Handler, false, AtMostOnce, false, Path::Router),
            (Handler, false, AtLeastOnce, true, Path::Router),
            (Handler, true, AtMostOnce, false, Path::Router),
        ];
        for (kind, persistent, qos, retained, path) in table {
            let case = format!("{kind:?} persistent={persistent} {qos:?} retained={retained}");
            let delivery = delivery();
            if retained {
                delivery.route("1_t", &publish("1_t", "kept", true), &None);
            }
            let mut row = delivery.open("s", opening(kind, persistent, 10));
            assert_eq!(
                row.inbox().is_some(),
                kind == Device && !persistent,
                "{case}: only clean device sessions have an inbox"
            );
            assert_eq!(
                delivery.subscribe(&mut row, &request("1_t", qos)),
                Ok(path),
                "{case}"
            );
            // A publish then takes that path, and only that one.
            let routed = delivery.route("1_t", &publish("1_t", "x", false), &None);
            assert_eq!(routed.needs_router, path == Path::Router, "{case}");
            assert_eq!(drained(&row), usize::from(path == Path::Inbox), "{case}");
            // The end: a clean session forgets, a persistent one keeps (its
            // router subscription still counts until it expires).
            delivery.close("s", &mut row);
            let kept = usize::from(persistent || retained);
            assert_eq!(delivery.table().topics(), kept, "{case}");
            delivery.expire("s");
            assert_eq!(delivery.table().topics(), usize::from(retained), "{case}");
        }
    }

    #[test]
    fn a_subscription_keeps_its_path_until_retained_handling_needs_the_router() {
        let delivery = delivery();
        let mut row = delivery.open("s", opening(Kind::Device, false, 10));
        let q0 = request("1_a", QoS::AtMostOnce);
        let q1 = request("1_a", QoS::AtLeastOnce);
        // (what the client sends, in order) -> path
        assert_eq!(delivery.subscribe(&mut row, &q0), Ok(Path::Inbox));
        assert_eq!(
            delivery.subscribe(&mut row, &q1),
            Ok(Path::Inbox),
            "a QoS 1 resubscription stays with the gate, granted QoS 0"
        );
        delivery.route("1_a", &publish("1_a", "r", true), &None);
        assert_eq!(
            delivery.subscribe(&mut row, &q0),
            Ok(Path::Inbox),
            "without Retain Handling 0 nothing needs resending"
        );
        let resend = Request {
            resend_retained: true,
            ..q0
        };
        assert_eq!(
            delivery.subscribe(&mut row, &resend),
            Ok(Path::Router),
            "the retained message is the router's to send"
        );
        // Once through the router, a device topic stays there for this
        // connection, even after an unsubscribe.
        delivery.unsubscribe(&mut row, "1_a");
        assert_eq!(delivery.subscribe(&mut row, &q0), Ok(Path::Router));
        // Unsubscribing from the gate's path, then asking for QoS 1: the
        // router serves it.
        assert_eq!(
            delivery.subscribe(&mut row, &request("1_b", QoS::AtMostOnce)),
            Ok(Path::Inbox)
        );
        delivery.unsubscribe(&mut row, "1_b");
        assert_eq!(
            delivery.subscribe(&mut row, &request("1_b", QoS::AtLeastOnce)),
            Ok(Path::Router)
        );
        delivery.close("s", &mut row);
        assert_eq!(delivery.table().topics(), 1, "only the retained topic");
    }

    #[test]
    fn the_cap_counts_across_the_connections_of_a_persistent_session() {
        let delivery = delivery();
        let q1 = |filter| request(filter, QoS::AtLeastOnce);
        let mut row = delivery.open("D:1:c", opening(Kind::Device, true, 2));
        assert_eq!(delivery.subscribe(&mut row, &q1("1_a")), Ok(Path::Router));
        assert_eq!(delivery.subscribe(&mut row, &q1("1_b")), Ok(Path::Router));
        assert_eq!(
            delivery.subscribe(&mut row, &q1("1_c")),
            Err(Denial::QuotaExceeded)
        );
        delivery.close("D:1:c", &mut row);
        assert_eq!(row.held(), 0, "closing leaves the row empty");

        // Resumed: the cap still counts both; a resubscription is free.
        let mut row = delivery.open("D:1:c", opening(Kind::Device, true, 2));
        assert_eq!(row.held(), 2);
        assert_eq!(
            delivery.subscribe(&mut row, &q1("1_c")),
            Err(Denial::QuotaExceeded)
        );
        assert_eq!(delivery.subscribe(&mut row, &q1("1_a")), Ok(Path::Router));
        delivery.close("D:1:c", &mut row);

        // A clean start releases what the session kept.
        let mut row = delivery.open(
            "D:1:c",
            Opening {
                clean_start: true,
                ..opening(Kind::Device, false, 2)
            },
        );
        assert_eq!(row.held(), 0);
        assert_eq!(delivery.table().topics(), 0);
        assert_eq!(
            delivery.subscribe(&mut row, &request("1_c", QoS::AtMostOnce)),
            Ok(Path::Inbox)
        );
        delivery.close("D:1:c", &mut row);
        assert_eq!(delivery.table().topics(), 0);
    }

    #[test]
    fn kept_rows_are_handed_back_once() {
        let delivery = delivery();
        let q1 = |filter| request(filter, QoS::AtLeastOnce);
        // Two connections of one session (a takeover that did not wait)
        // both subscribed `1_a` through the router: counted twice.
        let mut first = delivery.open("D:1:c", opening(Kind::Device, true, 10));
        let mut late = delivery.open("D:1:c", opening(Kind::Device, true, 10));
        assert_eq!(delivery.subscribe(&mut first, &q1("1_a")), Ok(Path::Router));
        assert_eq!(delivery.subscribe(&mut late, &q1("1_a")), Ok(Path::Router));
        assert_eq!(delivery.subscribe(&mut late, &q1("1_b")), Ok(Path::Router));
        delivery.close("D:1:c", &mut first);
        delivery.close("D:1:c", &mut late);
        assert_eq!(delivery.table().topics(), 2);

        // Resumed: handed back whole, once.
        let mut resumed = delivery.open("D:1:c", opening(Kind::Device, true, 10));
        assert_eq!(resumed.via_router().count(), 2);
        let fresh = delivery.open("D:1:c", opening(Kind::Device, true, 10));
        assert_eq!(fresh.via_router().count(), 0);

        // Expired: released, counted once, and the table is empty again.
        delivery.close("D:1:c", &mut resumed);
        assert!(
            delivery
                .route("1_a", &publish("1_a", "x", false), &None)
                .needs_router
        );
        delivery.expire("D:1:c");
        assert_eq!(delivery.table().topics(), 0);
        assert!(
            !delivery
                .route("1_a", &publish("1_a", "x", false), &None)
                .needs_router
        );
    }

    #[test]
    fn command_topics_follow_handler_subscriptions() {
        let delivery = delivery();
        let q1 = |filter| request(filter, QoS::AtLeastOnce);
        // (who, filter granted, persistent) -> command topic while it lives,
        // and after its connection ends
        let table = [
            (Kind::Handler, "$share/g/jobs", "jobs", false, true, false),
            (Kind::Handler, "jobs", "jobs", true, true, true),
            (Kind::Handler, "work/+", "work/x", false, true, false),
            (Kind::Handler, "#", "anything", false, false, false),
            (Kind::Handler, "alice_x", "alice_x", false, false, false),
            (
                Kind::Handler,
                "$share/g/12_3_list",
                "12_3_list",
                true,
                false,
                false,
            ),
            (Kind::Device, "jobs", "jobs", false, false, false),
        ];
        for (kind, filter, topic, persistent, live, after) in table {
            let case = format!("{kind:?} {filter} persistent={persistent}");
            let mut row = delivery.open("s", opening(kind, persistent, 10));
            assert_eq!(delivery.subscribe(&mut row, &q1(filter)), Ok(Path::Router));
            assert!(!delivery.is_command(topic), "{case}: only once granted");
            delivery.granted(&mut row, filter);
            delivery.granted(&mut row, filter);
            assert_eq!(delivery.is_command(topic), live, "{case}");
            delivery.close("s", &mut row);
            assert_eq!(delivery.is_command(topic), after, "{case}: kept");
            delivery.expire("s");
            assert!(!delivery.is_command(topic), "{case}: expired");
            assert!(delivery.is_command("sync"), "configured ones stay");
            assert_eq!(delivery.table().topics(), 0, "{case}");
        }
        // An unsubscribe withdraws it at once.
        let mut row = delivery.open("h", opening(Kind::Handler, false, 10));
        assert_eq!(delivery.subscribe(&mut row, &q1("jobs")), Ok(Path::Router));
        delivery.granted(&mut row, "jobs");
        delivery.unsubscribe(&mut row, "jobs");
        assert!(!delivery.is_command("jobs"));
        assert_eq!(row.held(), 0);
        delivery.close("h", &mut row);
    }

    #[test]
    fn where_a_publish_goes() {
        use Kind::{Device, Handler};
        use QoS::{AtLeastOnce, AtMostOnce};
        type Subscriber = (Kind, bool, &'static str, QoS);
        let clean_q0: Subscriber = (Device, false, "1_t", AtMostOnce);
        // (who subscribed: kind, persistent, filter, QoS; the publish
        // retained) -> (inboxes it reached, router needed)
        let table: [(&[Subscriber], bool, (usize, bool)); 9] = [
            (&[], false, (0, false)),
            (&[], true, (0, true)),
            (&[clean_q0], false, (1, false)),
            (&[clean_q0, clean_q0], false, (2, false)),
            (&[(Device, false, "1_t", AtLeastOnce)], false, (0, true)),
            (&[(Device, true, "1_t", AtMostOnce)], false, (0, true)),
            (
                &[(Handler, false, "$share/g/+", AtMostOnce), clean_q0],
                false,
                (1, true),
            ),
            (
                &[(Handler, false, "1_other", AtMostOnce), clean_q0],
                false,
                (1, false),
            ),
            (&[clean_q0], true, (1, true)),
        ];
        for (who, retain, (reached, needs_router)) in table {
            let case = format!("{who:?} retain={retain}");
            let delivery = delivery();
            let mut rows: Vec<_> = who
                .iter()
                .map(|&(kind, persistent, filter, qos)| {
                    let mut row = delivery.open("s", opening(kind, persistent, 10));
                    assert!(delivery.subscribe(&mut row, &request(filter, qos)).is_ok());
                    row
                })
                .collect();
            let routed = delivery.route("1_t", &publish("1_t", "x", retain), &None);
            assert_eq!(routed.needs_router, needs_router, "{case}");
            let got: usize = rows.iter().map(drained).sum();
            assert_eq!(got, reached, "{case}");
            for (i, row) in rows.iter_mut().enumerate() {
                delivery.close(&format!("s{i}"), row);
                delivery.expire(&format!("s{i}"));
            }
            assert_eq!(delivery.table().topics(), usize::from(retain), "{case}");
        }
    }
}
