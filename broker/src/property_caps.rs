//! Owns the caps on the MQTT 5 properties a device may send with a PUBLISH or
//! a will: the bytes of its user properties (names and values) and of its
//! correlation data.
//!
//! Why: what a device sends is kept, and copied. A command waits in its
//! topic's router log until a handler reads it; the SDK echoes the
//! correlation data into every reply, which then waits in each subscriber's
//! inbox; a delayed will waits for its delay. Without a cap, one packet of
//! the maximum size (256 KiB) can be nearly all user properties with an
//! empty payload. The caps are far above what the product uses (a device
//! sends no user properties of its own; correlation data is a request id,
//! 16 to 36 bytes) and bound what each kept message can carry.

use crate::acl::Denial;
use crate::answers::ConnectRefusal;
use crate::auth::Principal;
use bytes::Bytes;
use mqtt_router::protocol::{LastWillProperties, PublishProperties};

/// The caps (`BROKER_DEVICE_MAX_USER_PROPERTY_BYTES`,
/// `BROKER_DEVICE_MAX_CORRELATION_DATA_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyCaps {
    /// Most bytes of user property names and values, together.
    pub user_property_bytes: usize,
    /// Most bytes of correlation data.
    pub correlation_data_bytes: usize,
}

impl Default for PropertyCaps {
    fn default() -> Self {
        PropertyCaps {
            user_property_bytes: 4096,
            correlation_data_bytes: 256,
        }
    }
}

/// Which cap a message is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excess {
    UserProperties,
    CorrelationData,
}

impl Excess {
    /// Short label for logs.
    pub fn label(self) -> &'static str {
        match self {
            Excess::UserProperties => "user properties over the cap",
            Excess::CorrelationData => "correlation data over the cap",
        }
    }
}

/// Checks what one message carries against `caps`.
pub fn check(
    caps: &PropertyCaps,
    user_properties: &[(String, String)],
    correlation_data: Option<&Bytes>,
) -> Result<(), Excess> {
    // Summed with saturation: a sum cannot wrap into something small.
    let user_bytes = user_properties.iter().fold(0usize, |sum, (k, v)| {
        sum.saturating_add(k.len()).saturating_add(v.len())
    });
    if user_bytes > caps.user_property_bytes {
        return Err(Excess::UserProperties);
    }
    if correlation_data.map_or(0, Bytes::len) > caps.correlation_data_bytes {
        return Err(Excess::CorrelationData);
    }
    Ok(())
}

/// Checks a device's PUBLISH.
pub fn check_publish(
    caps: &PropertyCaps,
    properties: Option<&PublishProperties>,
) -> Result<(), Excess> {
    properties.map_or(Ok(()), |p| {
        check(caps, &p.user_properties, p.correlation_data.as_ref())
    })
}

/// Checks a device's will, at CONNECT.
pub fn check_will(
    caps: &PropertyCaps,
    properties: Option<&LastWillProperties>,
) -> Result<(), Excess> {
    properties.map_or(Ok(()), |p| {
        check(caps, &p.user_properties, p.correlation_data.as_ref())
    })
}

/// Whether `principal` may send a PUBLISH with `properties`: devices are
/// capped, handlers (the broker's own services) are not.
pub fn allow_publish(
    principal: &Principal,
    caps: &PropertyCaps,
    properties: Option<&PublishProperties>,
) -> Result<(), Denial> {
    match principal {
        Principal::Handler(_) => Ok(()),
        Principal::Device(_) => {
            check_publish(caps, properties).map_err(|_| Denial::PropertiesTooLarge)
        }
    }
}

/// Whether `principal` may leave a will with `properties` (see
/// `allow_publish`).
pub fn allow_will(
    principal: &Principal,
    caps: &PropertyCaps,
    properties: Option<&LastWillProperties>,
) -> Result<(), ConnectRefusal> {
    match principal {
        Principal::Handler(_) => Ok(()),
        Principal::Device(_) => check_will(caps, properties)
            .map_err(|excess| ConnectRefusal::WillPropertiesTooLarge(excess.label())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(usize, usize)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|&(k, v)| ("k".repeat(k), "v".repeat(v)))
            .collect()
    }

    #[test]
    fn names_and_values_count_together_and_the_cap_itself_is_allowed() {
        let caps = PropertyCaps {
            user_property_bytes: 100,
            correlation_data_bytes: 16,
        };
        let corr = |n: usize| Some(Bytes::from(vec![0u8; n]));
        type Row = (Vec<(String, String)>, Option<Bytes>, Result<(), Excess>);
        let table: Vec<Row> = vec![
            (props(&[]), None, Ok(())),
            (props(&[(50, 50)]), None, Ok(())),
            (props(&[(50, 51)]), None, Err(Excess::UserProperties)),
            (props(&[(10, 10); 5]), None, Ok(())),
            (props(&[(10, 10); 6]), None, Err(Excess::UserProperties)),
            (props(&[(101, 0)]), None, Err(Excess::UserProperties)),
            (props(&[]), corr(16), Ok(())),
            (props(&[]), corr(17), Err(Excess::CorrelationData)),
            (props(&[(1, 1)]), corr(0), Ok(())),
        ];
        for (user, correlation, expected) in table {
            assert_eq!(
                check(&caps, &user, correlation.as_ref()),
                expected,
                "{} user pairs, {:?} correlation bytes",
                user.len(),
                correlation.as_ref().map(Bytes::len)
            );
        }
    }

    #[test]
    fn publishes_and_wills_are_checked_alike() {
        let caps = PropertyCaps::default();
        assert_eq!(check_publish(&caps, None), Ok(()));
        assert_eq!(check_will(&caps, None), Ok(()));
        let publish = PublishProperties {
            user_properties: props(&[(1, 4096)]),
            ..Default::default()
        };
        assert_eq!(
            check_publish(&caps, Some(&publish)),
            Err(Excess::UserProperties)
        );
        let will = LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: Some(Bytes::from(vec![0u8; 257])),
            user_properties: Vec::new(),
        };
        assert_eq!(check_will(&caps, Some(&will)), Err(Excess::CorrelationData));
        let under = LastWillProperties {
            correlation_data: Some(Bytes::from(vec![0u8; 256])),
            user_properties: props(&[(96, 4000)]),
            ..will
        };
        assert_eq!(check_will(&caps, Some(&under)), Ok(()));
    }
}
