//! Event-name patterns: dotted names where `*` stands for one segment and `**` for any
//! number of segments (a lone `*` or `**` matches every name).

use std::fmt;

use crate::Error;

/// Longest pattern or event name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A parsed pattern such as `entity.*`, `room.**` or `**`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

impl Pattern {
    /// Parses a pattern. Segments are separated by `.`, and each is a literal name, `*` or
    /// `**`; a segment that mixes `*` with other characters, or an empty one, is refused.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() > MAX_NAME_LEN {
            return Err(Error::Invalid(format!(
                "pattern is {} bytes; at most {MAX_NAME_LEN} are allowed",
                text.len()
            )));
        }
        // A lone `*` means everything, as in the interface contract, not "one segment".
        if text == "*" || text == "**" {
            return Ok(Self {
                text: text.to_string(),
                segments: vec![Segment::Any],
            });
        }
        let segments = text
            .split('.')
            .map(|s| match s {
                "*" => Ok(Segment::One),
                "**" => Ok(Segment::Any),
                _ => check_segment(s, text, "pattern").map(|()| Segment::Literal(s.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// A pattern that matches every name.
    pub fn all() -> Self {
        Self {
            text: "**".to_string(),
            segments: vec![Segment::Any],
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split('.').collect();
        match_from(&self.segments, &parts)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

/// Checks an event name: dotted, non-empty segments without wildcards.
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
    if name.len() > MAX_NAME_LEN {
        return Err(Error::Invalid(format!(
            "event name is {} bytes; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    for s in name.split('.') {
        check_segment(s, name, "event name")?;
    }
    Ok(())
}

fn check_segment(segment: &str, whole: &str, what: &str) -> Result<(), Error> {
    if segment.is_empty() || segment.contains('*') || segment.chars().any(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "invalid {what} {whole:?}: use dotted names such as `entity.changed`, with `*` for \
             one segment and `**` for any number"
        )));
    }
    Ok(())
}

/// Matches segment by segment. `**` tries every split point; the recursion depth is
/// bounded by the number of segments, which the length cap bounds.
fn match_from(pattern: &[Segment], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Segment::Any, rest)) => (0..=name.len()).any(|skip| match_from(rest, &name[skip..])),
        Some((Segment::One, rest)) => !name.is_empty() && match_from(rest, &name[1..]),
        Some((Segment::Literal(l), rest)) => {
            name.first().is_some_and(|n| n == l) && match_from(rest, &name[1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn star_is_one_segment_and_double_star_any_number() {
        assert!(m("entity.*", "entity.changed"));
        assert!(!m("entity.*", "entity.changed.twice"));
        assert!(!m("entity.*", "room.created"));
        assert!(m("*.changed", "entity.changed"));
        assert!(m("room.**", "room.chat"));
        assert!(m("room.**", "room.member.joined"));
        assert!(m("room.**", "room"));
        assert!(m("entity.changed", "entity.changed"));
        assert!(!m("entity.changed", "entity.deleted"));
    }

    #[test]
    fn a_lone_star_or_double_star_matches_everything() {
        for p in ["*", "**"] {
            assert!(m(p, "entity.changed"));
            assert!(m(p, "peer.connected"));
            assert!(m(p, "a.b.c.d"));
        }
    }

    #[test]
    fn malformed_patterns_and_names_are_refused() {
        for bad in ["", "entity.", ".x", "ent*.changed", "a..b", "a b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Pattern::parse(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(validate_name("entity.changed").is_ok());
        for bad in ["entity.*", "", "a..b"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
