//! Synchronised playback (seed 000): devices of one home start the same media at the
//! same instant, each by its own clock.
//!
//! Every device keeps an estimate of each connected device's clock against its own, from
//! NTP-style probes on the ephemeral stream's clock lane (`clock.rs`, `wire.rs`): one per
//! peer with every heartbeat, and a few at once after an admission. `GET /api/peers`
//! shows them. A playback names its start in the initiator's clock (`start_at`, ms since
//! the Unix epoch); each target converts it with its own estimate of the initiator's
//! clock (`local start = start_at - offset`), raises `coordination.sync_playback` with
//! that local start, and reports it back, so the initiator shows every device's local
//! start, the offset used and its uncertainty. A target with no estimate yet probes the
//! initiator first and schedules on the first answer. Playbacks are short-lived and kept
//! in memory only, by initiator and id: the newest [`MAX_PLAYBACKS`] started here, and of
//! those received the newest few per initiator, [`MAX_PLAYBACKS`] in all.

pub(crate) mod clock;
pub(crate) mod service;
pub(crate) mod wire;

use serde::{Deserialize, Serialize};

pub use clock::ClockEstimate;
use service::PlaybackRequest;

use crate::Error;
use crate::types::{DeviceId, Timestamp};

/// Longest media name, in bytes of UTF-8.
pub const MAX_MEDIA: usize = 1024;
/// Playbacks kept here started here, and as many received; the oldest of each go first.
pub const MAX_PLAYBACKS: usize = 64;
/// How far from now a playback may start, either way (ms): one day.
pub const MAX_START_DISTANCE_MS: u64 = 86_400_000;
/// Most devices one playback names.
pub const MAX_PLAYBACK_DEVICES: usize = 64;

/// What to start: see [`Playback::start`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPlayback {
    /// What to play (a URL, a path, a title: the devices' players read it).
    pub media: String,
    /// When to start, in ms since the Unix epoch by this device's clock.
    pub start_at: u64,
    /// The devices that play it (PeerIds or names); empty: every device of the home.
    #[serde(default)]
    pub device_ids: Vec<String>,
}

/// Where one device of a playback stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSchedule {
    /// Sent to it (or, on the device itself, waiting for a first clock estimate of the
    /// initiator); no local start yet.
    Pending,
    /// It computed its local start.
    Scheduled,
}

/// One device of a playback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlaybackDevice {
    /// The device (PeerId).
    pub device_id: DeviceId,
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub state: DeviceSchedule,
    /// When it starts, in ms since the Unix epoch by its own clock.
    pub local_start_at: Option<u64>,
    /// The initiator's clock minus this device's, in ms, as this device estimated it.
    pub offset_ms: Option<f64>,
    /// How far the offset may be off, in ms (half the round trip of the probe used); 0
    /// on the initiator itself.
    pub uncertainty_ms: Option<f64>,
}

/// A playback, as the initiator or one of its devices sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlaybackSchedule {
    /// Its id (random, chosen by the initiator).
    pub id: String,
    /// What plays.
    pub media: String,
    /// When it starts, in ms since the Unix epoch by the initiator's clock.
    pub start_at: u64,
    /// The device that started it (PeerId).
    pub initiator: DeviceId,
    /// Whether this device started it.
    pub initiated_here: bool,
    /// The devices that play it: every one on the initiator, this device alone on the
    /// others.
    pub devices: Vec<PlaybackDevice>,
    /// When this device created or received it.
    pub created_at: Timestamp,
}

/// Synchronised playback and the clock estimates behind it. A cheap handle
/// ([`crate::Node::playback`]); each device raises `coordination.sync_playback` on
/// [`crate::Node::events`] with its local start.
#[derive(Clone)]
pub struct Playback {
    pub(crate) core: crate::core::CoreHandle,
}

impl Playback {
    /// Starts a playback at `start_at` (this device's clock) on the devices named:
    /// scheduled here at once when this device is one of them, sent to the others, which
    /// schedule it by their estimate of this device's clock and report back. `Invalid`
    /// for blank or long media, a start more than [`MAX_START_DISTANCE_MS`] from now or
    /// more than [`MAX_PLAYBACK_DEVICES`] devices; `NotFound`
    /// for a device not in the home.
    ///
    /// Cancel-safe: dropping the future may still start it.
    pub async fn start(&self, playback: NewPlayback) -> Result<PlaybackSchedule, Error> {
        self.core
            .call(|reply| PlaybackRequest::Start { playback, reply })
            .await?
    }

    /// One playback by id, with each device's local start as far as known here.
    ///
    /// Cancel-safe.
    pub async fn get(&self, id: &str) -> Result<PlaybackSchedule, Error> {
        let id = id.to_string();
        self.core
            .call(|reply| PlaybackRequest::Get { id, reply })
            .await?
    }

    /// The playbacks started or received here, newest first.
    ///
    /// Cancel-safe.
    pub async fn list(&self) -> Result<Vec<PlaybackSchedule>, Error> {
        self.core
            .call(|reply| PlaybackRequest::List { reply })
            .await?
    }

    /// This device's clock estimate of each peer that answered probes, by PeerId.
    ///
    /// Cancel-safe.
    pub async fn clocks(&self) -> Result<Vec<(DeviceId, ClockEstimate)>, Error> {
        self.core
            .call(|reply| PlaybackRequest::Clocks { reply })
            .await?
    }
}

/// Media must say something, in at most [`MAX_MEDIA`] bytes.
pub(crate) fn check_media(media: &str) -> Result<(), String> {
    if media.trim().is_empty() {
        return Err("media must not be blank".into());
    }
    if media.len() > MAX_MEDIA {
        return Err(format!(
            "media is {} bytes; at most {MAX_MEDIA} are allowed",
            media.len()
        ));
    }
    Ok(())
}

/// `start_at` must be within [`MAX_START_DISTANCE_MS`] of `now_ms` (both ms since the
/// Unix epoch by this device's clock).
pub(crate) fn check_start(start_at: u64, now_ms: u64) -> Result<(), String> {
    if start_at.abs_diff(now_ms) > MAX_START_DISTANCE_MS {
        return Err(format!(
            "start_at {start_at} is more than a day from now ({now_ms} ms since the Unix \
             epoch); a playback starts within a day either way"
        ));
    }
    Ok(())
}

/// A playback id: as an alert id, 8 to 64 base58 characters.
pub(crate) fn check_id(id: &str) -> Result<(), String> {
    crate::alerts::check_id(id).map_err(|_| {
        format!(
            "malformed playback id {:?}",
            id.chars().take(64).collect::<String>()
        )
    })
}

/// Converts `start_at` (the initiator's clock) to this device's clock, given the
/// initiator's clock minus this one's in µs. Rounded to the ms; never before the epoch.
pub(crate) fn local_start(start_at_ms: u64, offset_us: i64) -> u64 {
    let local_us = i128::from(start_at_ms) * 1000 - i128::from(offset_us);
    let ms = (local_us + 500).div_euclid(1000);
    u64::try_from(ms.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_moves_by_the_offset_to_the_local_clock() {
        // The initiator is 3 s ahead: its 10 s is this device's 7 s.
        assert_eq!(local_start(10_000, 3_000_000), 7_000);
        // Behind by 1.2346 s: rounded to the nearest ms.
        assert_eq!(local_start(10_000, -1_234_600), 11_235);
        assert_eq!(local_start(10_000, -1_234_400), 11_234);
        assert_eq!(local_start(5, 10_000_000), 0);
        assert_eq!(local_start(u64::MAX, i64::MIN), u64::MAX);
    }

    #[test]
    fn media_and_ids_are_checked() {
        assert!(check_media("http://nas.local/song.flac").is_ok());
        assert!(check_media(" \n").is_err());
        assert!(check_media(&"x".repeat(MAX_MEDIA + 1)).is_err());
        assert!(check_id("5Kq9wXyzAbCdEfGhJk").is_ok());
        assert!(check_id("nope").is_err());
    }

    #[test]
    fn a_start_must_be_within_a_day() {
        let now = 1_767_323_045_000;
        for ok in [
            now,
            now - MAX_START_DISTANCE_MS,
            now + MAX_START_DISTANCE_MS,
        ] {
            assert!(check_start(ok, now).is_ok(), "{ok}");
        }
        for bad in [
            0,
            1,
            now - MAX_START_DISTANCE_MS - 1,
            now + MAX_START_DISTANCE_MS + 1,
            u64::MAX,
        ] {
            let error = check_start(bad, now).unwrap_err();
            assert!(error.contains("within a day"), "{error}");
        }
    }
}
