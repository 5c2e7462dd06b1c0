//! Presence: each user's status in the home. `online`, `away` and `busy` are set;
//! `offline` is derived (the user's device is neither this node nor a connected, admitted
//! device of the home) and never stored.

use serde::{Deserialize, Serialize};

use crate::core::CoreHandle;
use crate::{DeviceId, Error, Timestamp};

/// A user's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Available.
    Online,
    /// Away from the device.
    Away,
    /// Present but not to be disturbed.
    Busy,
    /// Derived: the user's device is not reachable. Cannot be set.
    Offline,
}

impl Status {
    /// The status as text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Offline => "offline",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "online" => Ok(Status::Online),
            "away" => Ok(Status::Away),
            "busy" => Ok(Status::Busy),
            "offline" => Err(Error::Invalid(
                "offline cannot be set: it is derived when a user's device is unreachable; \
                 use online, away or busy"
                    .into(),
            )),
            other => Err(Error::Invalid(format!(
                "unknown status {:?}; use online, away or busy",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// A user's presence (the API's presence body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PresenceInfo {
    /// The user.
    pub user: String,
    /// Their status, `offline` when their device is unreachable.
    pub status: Status,
    /// When the stored status last changed.
    pub since: Timestamp,
    /// PeerId of the device the user is on.
    pub device: DeviceId,
    /// Optional free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Handle to presence. Cheap to clone. A `user` of `None` is the device name.
#[derive(Clone)]
pub struct Presence {
    pub(crate) core: CoreHandle,
}

impl Presence {
    /// Sets a user's status (not `offline`) and optional note.
    ///
    /// Not cancel-safe.
    pub async fn set(
        &self,
        user: Option<&str>,
        status: Status,
        note: Option<String>,
    ) -> Result<PresenceInfo, Error> {
        if status == Status::Offline {
            return Err("offline"
                .parse::<Status>()
                .err()
                .unwrap_or(Error::Invalid("offline cannot be set".into())));
        }
        let user = user.map(str::to_string);
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::SetPresence {
                user,
                status,
                note,
                reply,
            })
            .await?
    }

    /// A user's presence; [`Error::NotFound`] for a user who never set one.
    ///
    /// Cancel-safe.
    pub async fn get(&self, user: Option<&str>) -> Result<PresenceInfo, Error> {
        let user = user.map(str::to_string);
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::GetPresence { user, reply })
            .await?
    }

    /// Users who are not offline, in the whole home or (with `room`) among a room's
    /// members, ordered by user.
    ///
    /// Cancel-safe.
    pub async fn online(&self, room: Option<&str>) -> Result<Vec<PresenceInfo>, Error> {
        let room = room.map(str::to_string);
        self.core
            .call(|reply| crate::rooms::service::RoomRequest::ListPresence { room, reply })
            .await?
    }
}
