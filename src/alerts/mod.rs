//! Emergency alerts (seed 000's "event propagation" for emergencies): a device raises an
//! alert, and every device of its home, and of each paired home that opted in to its
//! alerts, gets `emergency.alert` ([`crate::Event::Alert`]), even a device that was away
//! when it was sent, as long as it returns within the alert's TTL.
//!
//! The sender keeps the alert in a persistent outbox (the store's Outbox keyspace) with a
//! receipt per target device, and sends it on the ephemeral stream, which has a queue of
//! its own and so never waits behind bulk sync (`wire.rs`). Each target acknowledges
//! it; until then the sender retries with a backoff while the target is connected, and at
//! once when it reconnects (`outbox.rs`). A receipt is `pending` (not sent yet),
//! `delivered` (sent, not yet acknowledged), `acknowledged`, `declined` (a paired home
//! that did not opt in) or `expired` (the TTL ran out first). The outbox survives a
//! restart, and a crash, of the sender.
//!
//! A receiving home takes alerts from a paired home only once it opted in
//! ([`Alerts::accept_from`]); the flag lives in its home document, so every device of
//! the home follows it.

pub(crate) mod outbox;
pub(crate) mod service;
pub(crate) mod wire;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::types::{DeviceId, HomeId, Timestamp};
use service::AlertRequest;

/// An alert's TTL unless told otherwise: one hour.
pub const DEFAULT_ALERT_TTL_S: u64 = 3600;
/// Longest TTL an alert may have: a week.
pub const MAX_ALERT_TTL_S: u64 = 7 * 24 * 3600;
/// Longest alert message, in bytes of UTF-8.
pub const MAX_ALERT_MESSAGE: usize = 1024;
/// Most target devices (receipts) one alert has; devices past it are not targeted.
pub const MAX_ALERT_TARGETS: usize = 256;
/// Most alerts this device's outbox holds while some target still has to acknowledge
/// them; sending another is refused (`Conflict`) until one is settled or expires.
pub const MAX_OUTBOX_ALERTS: usize = 128;
/// Sent alerts kept for listing once settled (the oldest go first).
pub const MAX_SENT_KEPT: usize = 256;
/// Received alerts kept for listing and for recognising retries (the oldest go first).
pub const MAX_RECEIVED_KEPT: usize = 256;

/// How urgent an alert is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Needs attention (the default).
    #[default]
    Warning,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// Its name: `info`, `warning` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            other => Err(Error::Invalid(format!(
                "unknown severity {:?}: use info, warning or critical",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// Where an alert came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertSource {
    /// The home of the device that raised it.
    pub home: HomeId,
    /// The device that raised it (its PeerId), as the receiver authenticated it.
    pub device: DeviceId,
}

/// An alert as every device it reaches sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Its id, chosen by the sender (random).
    pub id: String,
    /// What it says.
    pub message: String,
    /// How urgent it is.
    pub severity: Severity,
    /// How long it lives, in seconds from when it was sent.
    pub ttl_s: u64,
    /// When it was sent, by the sender's clock.
    pub sent_at: Timestamp,
    /// When it expires, by this device's clock (a receiver counts the time the sender
    /// said was left, so clocks that disagree do not stretch or cut it).
    pub expires_at: Timestamp,
    /// Who raised it.
    pub source: AlertSource,
}

/// Whether this device sent or received an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Raised here.
    Sent,
    /// Raised by another device.
    Received,
}

/// Where one target device stands with an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptState {
    /// Not sent yet: the device has not been connected since the alert was raised.
    Pending,
    /// Sent, not acknowledged yet; sent again with a backoff while connected.
    Delivered,
    /// The device received it and raised `emergency.alert`.
    Acknowledged,
    /// The device's home has not opted in to this home's alerts.
    Declined,
    /// The TTL ran out before the device acknowledged it.
    Expired,
}

impl ReceiptState {
    /// Whether nothing more will happen to this receipt.
    pub fn is_settled(self) -> bool {
        !matches!(self, Self::Pending | Self::Delivered)
    }
}

/// One target device's receipt for an alert this device sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The target (PeerId).
    pub device: DeviceId,
    /// Its home.
    pub home: HomeId,
    /// Where it stands.
    pub state: ReceiptState,
    /// Copies sent to it so far.
    pub attempts: u32,
    /// When it was first sent.
    pub delivered_at: Option<Timestamp>,
    /// When it acknowledged (or declined) it.
    pub acknowledged_at: Option<Timestamp>,
}

/// An alert this device sent or received, with its receipts when it sent it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// The alert.
    #[serde(flatten)]
    pub alert: Alert,
    /// Sent here, or received.
    pub direction: Direction,
    /// When this device received it (received alerts only).
    pub received_at: Option<Timestamp>,
    /// One per target device (sent alerts only), in the order targeted.
    pub receipts: Vec<Receipt>,
}

/// What to raise: see [`Alerts::send`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAlert {
    /// What it says (at most [`MAX_ALERT_MESSAGE`] bytes, not blank).
    pub message: String,
    /// How urgent it is (default `warning`).
    #[serde(default)]
    pub severity: Severity,
    /// How long it lives, in seconds (default [`DEFAULT_ALERT_TTL_S`], at most
    /// [`MAX_ALERT_TTL_S`]).
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
}

fn default_ttl() -> u64 {
    DEFAULT_ALERT_TTL_S
}

impl NewAlert {
    /// A `warning` alert saying `message`, living an hour.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            severity: Severity::default(),
            ttl_s: DEFAULT_ALERT_TTL_S,
        }
    }

    /// Sets its severity.
    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// Sets its TTL (whole seconds; a part second rounds up).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl_s = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        self
    }
}

/// A home's opt-in to a paired home's alerts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertAcceptance {
    /// The paired home.
    pub home_id: HomeId,
    /// Its name.
    pub name: String,
    /// Whether this home takes its alerts.
    pub accept: bool,
}

/// Emergency alerts: raise one for the home (and the paired homes that take them), list
/// the ones this device sent or received, and opt in to a paired home's. A cheap handle
/// ([`crate::Node::alerts`]); received alerts arrive on [`crate::Node::events`] as
/// [`crate::Event::Alert`].
#[derive(Clone)]
pub struct Alerts {
    pub(crate) core: crate::core::CoreHandle,
}

impl Alerts {
    /// Raises an alert: stored in the outbox first, raised here as `emergency.alert`,
    /// then sent to every connected target at once and to the others when they return
    /// within its TTL. Refused (`Invalid`) for a blank or long message or a TTL of 0 or
    /// past [`MAX_ALERT_TTL_S`]; `Conflict` when the outbox holds
    /// [`MAX_OUTBOX_ALERTS`] alerts still waiting for acknowledgements.
    ///
    /// Cancel-safe: dropping the future may still raise the alert.
    pub async fn send(&self, alert: NewAlert) -> Result<AlertRecord, Error> {
        self.core
            .call(|reply| AlertRequest::Send { alert, reply })
            .await?
    }

    /// The alerts this device sent or received, newest first.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<AlertRecord>, Error> {
        self.core.call(|reply| AlertRequest::List { reply }).await?
    }

    /// One alert by id, with each target's receipt when this device sent it.
    ///
    /// Cancel-safe.
    pub async fn get(&self, id: &str) -> Result<AlertRecord, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| AlertRequest::Get { id, reply })
            .await?
    }

    /// Opts this home in to (or out of) the alerts of paired home `home` (its HomeId, or
    /// its name when unique). Every device of this home follows it, through the home
    /// document. `NotFound` for a home that is not paired.
    ///
    /// Cancel-safe: dropping the future may still change it.
    pub async fn accept_from(&self, home: &str, accept: bool) -> Result<AlertAcceptance, Error> {
        let home = home.to_string();
        self.core
            .call(|reply| AlertRequest::Accept {
                home,
                accept,
                reply,
            })
            .await?
    }

    /// Counters of alerts, since start.
    ///
    /// Cancel-safe.
    pub async fn counters(&self) -> Result<AlertCounters, Error> {
        self.core
            .call(|reply| AlertRequest::Counters { reply })
            .await?
    }
}

/// Alerts counted since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AlertCounters {
    /// Alerts raised here.
    pub sent: u64,
    /// Copies sent to target devices, retries included.
    pub copies_sent: u64,
    /// Alerts received from other devices and raised here.
    pub received: u64,
    /// Copies received again (retries whose acknowledgement was lost), acknowledged again.
    pub duplicates: u64,
    /// Alerts from paired homes this home has not opted in to, declined.
    pub declined: u64,
    /// Acknowledgements taken.
    pub acks: u64,
    /// Messages dropped: malformed, oversized, expired, or an acknowledgement for no
    /// receipt of its sender.
    pub dropped_malformed: u64,
    /// Messages dropped because their sender went over its rate.
    pub dropped_rate: u64,
}

/// Checks what a user asked to raise.
pub(crate) fn check_new(alert: &NewAlert) -> Result<(), Error> {
    check_message(&alert.message).map_err(Error::Invalid)?;
    check_ttl(alert.ttl_s).map_err(Error::Invalid)
}

/// A message must say something, in at most [`MAX_ALERT_MESSAGE`] bytes.
pub(crate) fn check_message(message: &str) -> Result<(), String> {
    if message.trim().is_empty() {
        return Err("an alert's message must not be blank".into());
    }
    if message.len() > MAX_ALERT_MESSAGE {
        return Err(format!(
            "alert message is {} bytes; at most {MAX_ALERT_MESSAGE} are allowed",
            message.len()
        ));
    }
    Ok(())
}

/// A TTL is 1 s to [`MAX_ALERT_TTL_S`].
pub(crate) fn check_ttl(ttl_s: u64) -> Result<(), String> {
    if ttl_s == 0 || ttl_s > MAX_ALERT_TTL_S {
        return Err(format!(
            "ttl_s is {ttl_s}; use 1 to {MAX_ALERT_TTL_S} seconds"
        ));
    }
    Ok(())
}

/// An alert id: 8 to 64 base58 characters (the sender makes 22 from 16 random bytes).
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    let ok = (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() && !matches!(b, b'0' | b'O' | b'I' | b'l'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "malformed alert id {:?}",
            id.chars().take(64).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_alerts_are_checked_and_default_to_a_warning_for_an_hour() {
        let alert: NewAlert = serde_json::from_str(r#"{"message": "smoke"}"#).unwrap();
        assert_eq!(alert, NewAlert::new("smoke"));
        assert_eq!(alert.severity, Severity::Warning);
        assert_eq!(alert.ttl_s, 3600);
        assert!(check_new(&alert).is_ok());
        for bad in [
            NewAlert::new("  "),
            NewAlert::new("x".repeat(MAX_ALERT_MESSAGE + 1)),
            NewAlert::new("ok").ttl(Duration::ZERO),
            NewAlert::new("ok").ttl(Duration::from_secs(MAX_ALERT_TTL_S + 1)),
        ] {
            assert!(matches!(check_new(&bad), Err(Error::Invalid(_))), "{bad:?}");
        }
        assert_eq!(NewAlert::new("a").ttl(Duration::from_millis(1500)).ttl_s, 2);
    }

    #[test]
    fn severities_parse_by_name_only() {
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            assert_eq!(s.as_str().parse::<Severity>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("CRITICAL".parse::<Severity>().is_err());
        assert!(serde_json::from_str::<Severity>("\"loud\"").is_err());
    }

    #[test]
    fn ids_are_short_base58() {
        assert!(check_id("5Kq9wXyzAbCdEfGhJk").is_ok());
        for bad in [
            "",
            "short",
            "has space here",
            "0OIl0OIl0OIl",
            &"a".repeat(65),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
