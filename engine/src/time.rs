//! Times on the wire: every timestamp in JSON and HTTP output is RFC 3339 in UTC with
//! milliseconds (`2026-12-01T17:22:31.214Z`), while the engine keeps them as
//! [`Millis`](crate::machine::Millis). Reading accepts both forms, so a document written by an
//! older sagaflow (epoch milliseconds) still reads.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

use crate::machine::Millis;

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn format(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

/// RFC 3339 (any offset) or epoch milliseconds.
pub fn parse(text: &str) -> Option<Millis> {
    match DateTime::parse_from_rfc3339(text) {
        Ok(t) => Some(t.timestamp_millis()),
        Err(_) => text.parse().ok(),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Either {
    Millis(Millis),
    Text(String),
}

fn from_either<E: serde::de::Error>(v: Either) -> Result<Millis, E> {
    match v {
        Either::Millis(ms) => Ok(ms),
        Either::Text(t) => {
            parse(&t).ok_or_else(|| E::custom(format!("`{t}` is not an RFC 3339 time")))
        }
    }
}

/// `#[serde(with = "crate::time::rfc3339")]` on a [`Millis`].
pub mod rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        from_either(Either::deserialize(d)?)
    }
}

/// `#[serde(with = "crate::time::rfc3339_opt")]` on an `Option<Millis>`.
pub mod rfc3339_opt {
    use super::*;

    pub fn serialize<S: Serializer>(ms: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => s.serialize_str(&format(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
        match Option::<Either>::deserialize(d)? {
            Some(v) => from_either(v).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_read_and_rfc3339_is_written() {
        assert_eq!(format(1_764_609_751_214), "2025-12-01T17:22:31.214Z");
        assert_eq!(parse("2025-12-01T17:22:31.214Z"), Some(1_764_609_751_214));
        assert_eq!(
            parse("2025-12-01T18:22:31.214+01:00"),
            Some(1_764_609_751_214)
        );
        assert_eq!(parse("1764609751214"), Some(1_764_609_751_214));
        assert_eq!(parse("yesterday"), None);
    }
}
