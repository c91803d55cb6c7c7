//! Owns the identity service's share of the process's file descriptors.
//! Every connection is a descriptor, and in the default run the service
//! lives in the broker's process: without a share of its own, connections
//! to it (idle ones, thousands of them) could take every descriptor and the
//! MQTT listeners' accepts would fail. So at start:
//!
//! 1. the soft open-file limit is raised to the hard one (what an
//!    unprivileged process may do on its own);
//! 2. [`plan`] checks that [`RESERVED`] descriptors (stdio, the listeners,
//!    the store, the in-process handlers' links, the outbound clients) plus
//!    the identity service's `IDP_MAX_CONNECTIONS` leave the MQTT listeners
//!    a share at least as large as the identity service's (or all the
//!    broker is configured for, if less), and refuses the configuration
//!    with the fix otherwise;
//! 3. the broker's connection cap is lowered to what is left for it when it
//!    is above it, with a warning, so that the MQTT listeners refuse over
//!    their share at accept instead of failing it for both services.

/// Descriptors kept for what is not a client connection: stdio, the
/// listeners (TLS, TCP, internal, metrics, the identity service), the
/// store's files, the in-process handlers' connections to the internal
/// listener (both ends, up to 2 × 32), the runtime, and outbound clients
/// (JWKS, SMS provider, Redis).
pub const RESERVED: u64 = 128;

/// How the descriptors are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The open-file limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// Connections the identity service may hold.
    pub identity: u64,
    /// Connections the MQTT listeners may hold: what they asked for, or
    /// what is left for them if less.
    pub mqtt: u64,
}

impl Budget {
    /// Whether the MQTT listeners get less than they asked for.
    pub fn lowers_mqtt(&self, asked: u64) -> bool {
        self.mqtt < asked
    }
}

/// Why the descriptors cannot be shared.
#[derive(Debug, thiserror::Error)]
#[error("IDP_MAX_CONNECTIONS={identity} does not fit the open-file limit of {limit} (RLIMIT_NOFILE): {reserved} are kept for listeners, the store and outbound clients, and the MQTT listeners must keep at least {mqtt_floor} beside the identity service; lower IDP_MAX_CONNECTIONS to at most {fits}, or raise the limit (`ulimit -n`, LimitNOFILE= under systemd, --ulimit nofile= in Docker) to at least {needed}")]
pub struct BudgetError {
    pub identity: u64,
    pub limit: u64,
    pub reserved: u64,
    pub mqtt_floor: u64,
    pub fits: u64,
    pub needed: u64,
}

/// Shares `limit` descriptors between the identity service's `identity`
/// connections and the MQTT listeners' `mqtt` (0 when the identity service
/// runs on its own).
pub fn plan(limit: Option<u64>, identity: u64, mqtt: u64) -> Result<Budget, BudgetError> {
    let Some(limit) = limit else {
        return Ok(Budget {
            limit,
            identity,
            mqtt,
        });
    };
    // The MQTT listeners are the main service: they keep at least as many
    // descriptors as the identity service may take.
    let mqtt_floor = mqtt.min(identity);
    let needed = RESERVED.saturating_add(identity).saturating_add(mqtt_floor);
    if needed > limit {
        let spare = limit.saturating_sub(RESERVED);
        // The largest identity cap `i` with `i + min(mqtt, i) <= spare`: past
        // the MQTT cap (room for both whole) or else half of what is spare.
        let fits = if spare >= mqtt.saturating_mul(2) {
            spare - mqtt
        } else {
            spare / 2
        };
        return Err(BudgetError {
            identity,
            limit,
            reserved: RESERVED,
            mqtt_floor,
            fits,
            needed,
        });
    }
    let left = limit.saturating_sub(RESERVED).saturating_sub(identity);
    Ok(Budget {
        limit: Some(limit),
        identity,
        mqtt: mqtt.min(left),
    })
}

/// Raises the soft open-file limit to the hard one, and returns the limit
/// in force (`None`: unlimited). A failure to raise keeps the soft limit.
#[cfg(unix)]
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "cannot raise the soft open-file limit to the hard one");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Elsewhere the limit is not known here.
#[cfg(not(unix))]
pub fn raise_open_files_limit() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_fit_and_the_mqtt_share_is_what_is_left() {
        let budget = plan(Some(20_000), 256, 50_000).unwrap();
        assert_eq!(budget.identity, 256);
        assert_eq!(budget.mqtt, 20_000 - RESERVED - 256);
        assert!(budget.lowers_mqtt(50_000));
        let roomy = plan(Some(1 << 20), 256, 50_000).unwrap();
        assert_eq!(roomy.mqtt, 50_000);
        assert!(!roomy.lowers_mqtt(50_000));
    }

    #[test]
    fn unlimited_fits_everything() {
        let budget = plan(None, 256, 50_000).unwrap();
        assert_eq!((budget.identity, budget.mqtt), (256, 50_000));
    }

    #[test]
    fn an_identity_cap_that_leaves_mqtt_less_than_its_own_is_refused_with_the_fix() {
        let error = plan(Some(1024), 600, 50_000).unwrap_err();
        assert_eq!(error.needed, RESERVED + 600 + 600);
        let text = error.to_string();
        assert!(text.contains("IDP_MAX_CONNECTIONS=600"), "{text}");
        assert!(text.contains("ulimit -n"), "{text}");
        // The suggested cap does fit.
        let fits = error.fits;
        assert!(fits > 0);
        let budget = plan(Some(1024), fits, 50_000).unwrap();
        assert!(budget.mqtt >= fits);
        assert!(plan(Some(1024), fits + 1, 50_000).is_err());
    }

    #[test]
    fn a_small_broker_cap_needs_only_its_own_share() {
        // 100 MQTT connections need 100 descriptors, not 600.
        let budget = plan(Some(1024), 600, 100).unwrap();
        assert_eq!(budget.mqtt, 100);
        let error = plan(Some(1024), 900, 100).unwrap_err();
        let budget = plan(Some(1024), error.fits, 100).unwrap();
        assert_eq!(budget.mqtt, 100);
        assert!(plan(Some(1024), error.fits + 1, 100).is_err());
    }

    #[test]
    fn on_its_own_the_identity_service_needs_its_cap_and_the_reserve() {
        assert!(plan(Some(RESERVED + 256), 256, 0).is_ok());
        let error = plan(Some(RESERVED + 255), 256, 0).unwrap_err();
        assert_eq!(error.fits, 255);
    }

    #[test]
    fn the_limit_in_force_is_at_least_the_soft_one() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let now = raise_open_files_limit();
        match (before.current, now) {
            (Some(soft), Some(now)) => assert!(now >= soft),
            (None, now) => assert_eq!(now, None),
            (Some(_), None) => {}
        }
    }
}
