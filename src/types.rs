//! Typed values of the public API: the ids of homes, devices and entities, conflict
//! policies, share rights and timestamps.
//!
//! Each has the JSON form the API has always used, so a type here never changes a body:
//! ids are their text, policies and rights their names, and timestamps RFC 3339 text.
//! The node keeps plain text inside and converts at its handles.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's text, taken out.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                Self(text)
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                Self(text.to_string())
            }
        }

        impl From<&String> for $name {
            fn from(text: &String) -> Self {
                Self(text.clone())
            }
        }

        impl From<&$name> for $name {
            fn from(id: &$name) -> Self {
                id.clone()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<&$name> for $name {
            fn eq(&self, other: &&$name) -> bool {
                self == *other
            }
        }

        impl PartialEq<$name> for &$name {
            fn eq(&self, other: &$name) -> bool {
                *self == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

text_id! {
    /// A home's id (HomeId): derived from the home's root signing key, in base58.
    HomeId
}

text_id! {
    /// A device's id: its PeerId in base58, or, for a writer this node cannot name, its
    /// Automerge actor id in hex.
    DeviceId
}

text_id! {
    /// An entity's id, chosen by its owner: `domain.object`, e.g. `light.porch`. Any text
    /// names an entity to read; writes check the form and refuse any other.
    EntityId
}

/// How an entity's concurrent values are decided. Written and read by name, e.g.
/// `latest-wins`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Policy {
    /// The newest value wins (by hybrid logical clock, then writer); the default.
    #[default]
    LatestWins,
    /// Field by field: fields only one side changed are kept, the rest is latest-wins.
    Merge,
    /// The value written by the owner home.
    OwnerWins,
    /// The value written by a home the entity is shared with.
    SharerWins,
    /// Both values are kept, and the conflict waits for someone to choose.
    UserChoice,
}

impl Policy {
    /// Every policy.
    pub const ALL: [Policy; 5] = [
        Policy::LatestWins,
        Policy::Merge,
        Policy::OwnerWins,
        Policy::SharerWins,
        Policy::UserChoice,
    ];

    /// The policy's name, as the API and the CLI write it.
    pub const fn as_str(self) -> &'static str {
        self.to_engine().as_str()
    }

    pub(crate) const fn from_engine(policy: hearth_crdt::Policy) -> Self {
        match policy {
            hearth_crdt::Policy::LatestWins => Policy::LatestWins,
            hearth_crdt::Policy::Merge => Policy::Merge,
            hearth_crdt::Policy::OwnerWins => Policy::OwnerWins,
            hearth_crdt::Policy::SharerWins => Policy::SharerWins,
            hearth_crdt::Policy::UserChoice => Policy::UserChoice,
        }
    }

    const fn to_engine(self) -> hearth_crdt::Policy {
        match self {
            Policy::LatestWins => hearth_crdt::Policy::LatestWins,
            Policy::Merge => hearth_crdt::Policy::Merge,
            Policy::OwnerWins => hearth_crdt::Policy::OwnerWins,
            Policy::SharerWins => hearth_crdt::Policy::SharerWins,
            Policy::UserChoice => hearth_crdt::Policy::UserChoice,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = Error;

    /// Parses a policy's name; anything else is [`Error::Invalid`] naming the five.
    fn from_str(text: &str) -> Result<Self, Error> {
        hearth_crdt::Policy::parse(text)
            .map(Self::from_engine)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown policy {text:?}; use latest-wins, merge, owner-wins, sharer-wins \
                     or user-choice"
                ))
            })
    }
}

/// What a home may do with an entity shared with it. Written and read by name: `read`,
/// `write`, or `none` for a grant taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rights {
    /// Read only.
    Read,
    /// Read and write.
    Write,
    /// No rights: the grant was taken back (or never made).
    None,
}

impl Rights {
    /// The rights' name, as the API writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rights::Read => "read",
            Rights::Write => "write",
            Rights::None => "none",
        }
    }

    pub(crate) const fn from_engine(rights: hearth_crdt::schema::registry::Rights) -> Self {
        match rights {
            hearth_crdt::schema::registry::Rights::Read => Rights::Read,
            hearth_crdt::schema::registry::Rights::Write => Rights::Write,
        }
    }

    /// Rights as the node keeps them inside; text that names none of them (a damaged
    /// record) grants nothing.
    pub(crate) fn from_stored(text: &str) -> Self {
        text.parse().unwrap_or(Rights::None)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Rights {
    type Err = Error;

    /// Parses `read`, `write` or `none`; anything else is [`Error::Invalid`].
    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "read" => Ok(Rights::Read),
            "write" => Ok(Rights::Write),
            "none" => Ok(Rights::None),
            other => Err(Error::Invalid(format!(
                "unknown rights {:?}; use read or write",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

macro_rules! by_name {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

by_name!(Policy);
by_name!(Rights);

/// A point in time, to the millisecond, as the node records times (from a writer's hybrid
/// logical clock or the local clock). Written as RFC 3339 in UTC, e.g.
/// `2026-01-02T03:04:05.123Z`, with the fraction left out on a whole second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The time `ms` milliseconds after the Unix epoch.
    pub const fn from_unix_ms(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn unix_ms(self) -> u64 {
        self.0
    }

    /// The current time (the Unix epoch on a clock set before it).
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self(ms)
    }

    /// The time as a [`std::time::SystemTime`].
    pub fn to_system_time(self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = i128::from(self.0) * 1_000_000;
        let text = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        // Past year 9999 RFC 3339 has no form; such a time comes only from a broken clock.
        f.write_str(text.as_deref().unwrap_or("1970-01-01T00:00:00Z"))
    }
}

impl FromStr for Timestamp {
    type Err = Error;

    /// Parses RFC 3339 (any offset); digits past the millisecond are dropped. A time
    /// before 1970 is [`Error::Invalid`].
    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |why: &str| {
            Error::Invalid(format!(
                "time {:?} {why}; write it as RFC 3339, e.g. 2026-01-02T03:04:05Z",
                text.chars().take(64).collect::<String>()
            ))
        };
        let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map_err(|_| invalid("is not RFC 3339"))?;
        u64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000))
            .map(Self)
            .map_err(|_| invalid("is before 1970"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_write_what_the_api_always_wrote() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (1_767_323_045_000, "2026-01-02T03:04:05Z"),
            (1_767_323_045_500, "2026-01-02T03:04:05.5Z"),
            (1_767_323_045_123, "2026-01-02T03:04:05.123Z"),
        ] {
            let t = Timestamp::from_unix_ms(ms);
            assert_eq!(t.to_string(), text);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{text}\""));
            assert_eq!(text.parse::<Timestamp>().unwrap(), t);
            assert_eq!(
                serde_json::from_str::<Timestamp>(&format!("\"{text}\"")).unwrap(),
                t
            );
        }
        assert_eq!(
            "2026-01-02T04:04:05.123456+01:00"
                .parse::<Timestamp>()
                .unwrap()
                .unix_ms(),
            1_767_323_045_123
        );
        for bad in ["", "yesterday", "1969-12-31T23:59:59Z"] {
            let err = bad.parse::<Timestamp>().unwrap_err().to_string();
            assert!(err.contains("RFC 3339"), "{err}");
        }
    }

    #[test]
    fn policies_and_rights_go_by_name_and_refuse_others_clearly() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
        assert_eq!(Policy::default().as_str(), "latest-wins");
        let err = "newest".parse::<Policy>().unwrap_err().to_string();
        assert!(
            err.contains("\"newest\"") && err.contains("user-choice"),
            "{err}"
        );
        assert!(serde_json::from_str::<Policy>("\"Merge\"").is_err());

        for r in [Rights::Read, Rights::Write, Rights::None] {
            assert_eq!(r.as_str().parse::<Rights>().unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        let err = "admin".parse::<Rights>().unwrap_err().to_string();
        assert!(
            err.contains("\"admin\"") && err.contains("read or write"),
            "{err}"
        );
        assert_eq!(Rights::from_stored("garbage"), Rights::None);
    }

    #[test]
    fn ids_are_their_text() {
        let id = EntityId::from("light.porch");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"light.porch\"");
        assert_eq!(id, "light.porch");
        assert_eq!("light.porch", id);
        assert_eq!(id.to_string(), "light.porch");
        let back: HomeId = serde_json::from_str("\"home\"").unwrap();
        assert_eq!(back.as_str(), "home");
    }
}
