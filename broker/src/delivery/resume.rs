//! Owns what a persistent device session carries from one node to another
//! through a delivery of several nodes: its subscriptions as the client
//! made them ([`SessionSubscription`]), and the answer of
//! [`super::Delivery::resume`] at CONNECT ([`Resumed`]). One node
//! (`LocalDelivery`) never moves a session: its `resume` answers
//! [`Resumed::Here`].

use crate::router::protocol::{Filter, QoS, RetainForwardRule};
use std::future::Future;
use std::pin::Pin;

/// One subscription of a persistent session, with its options and
/// identifier, as the client's SUBSCRIBE made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSubscription {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// Retain Handling: 0 on every subscribe, 1 on a new one, 2 never.
    pub retain_handling: u8,
    /// The Subscription Identifier of the SUBSCRIBE that made it.
    pub subscription_id: Option<usize>,
}

impl SessionSubscription {
    /// `filter` of a SUBSCRIBE carrying `subscription_id`.
    pub fn of(filter: &Filter, subscription_id: Option<usize>) -> Self {
        SessionSubscription {
            filter: filter.path.clone(),
            qos: filter.qos,
            no_local: filter.nolocal,
            retain_as_published: filter.preserve_retain,
            retain_handling: match filter.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => 0,
                RetainForwardRule::OnNewSubscribe => 1,
                RetainForwardRule::Never => 2,
            },
            subscription_id,
        }
    }

    /// The SUBSCRIBE filter that makes it again.
    pub fn filter(&self) -> Filter {
        Filter {
            path: self.filter.clone(),
            qos: self.qos,
            nolocal: self.no_local,
            preserve_retain: self.retain_as_published,
            retain_forward_rule: match self.retain_handling {
                0 => RetainForwardRule::OnEverySubscribe,
                1 => RetainForwardRule::OnNewSubscribe,
                _ => RetainForwardRule::Never,
            },
        }
    }
}

/// What delivery knows, at CONNECT with Clean Start 0, of a persistent
/// session this node may not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// Nothing elsewhere: the session is this node's (kept here, or new).
    Here,
    /// The session lived on another node: it resumes here with these
    /// subscriptions (Session Present 1), and what it is owed follows.
    Moved(Vec<SessionSubscription>),
    /// Whether it lives elsewhere could not be learned in time: the
    /// connection is refused (Server unavailable) rather than resumed
    /// empty.
    Unavailable,
}

/// The answer of [`super::Delivery::resume`], awaited by the connecting
/// session under its own deadline.
pub type ResumeFuture = Pin<Box<dyn Future<Output = Resumed> + Send + 'static>>;
