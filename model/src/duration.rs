//! Durations in specs, stored as whole milliseconds. YAML/JSON accepts a number of seconds
//! (`5`, `0.5`) or a string with a unit (`"500ms"`, `"2s"`, `"1m"`, `"1h"`, `"1m30s"`), as
//! compose files write them. Written back as a string (`"1.5s"`).

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Parses `"1m30s"`, `"250ms"`, `"2"` (seconds) into milliseconds.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m30s)");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return from_secs(secs).ok_or_else(bad);
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(n_end);
        let num: f64 = num.parse().map_err(|_| bad())?;
        let u_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(u_end);
        let ms = match unit {
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return Err(bad()),
        };
        total += num * ms;
        rest = next;
    }
    if !total.is_finite() || !(0.0..=1e15).contains(&total) {
        return Err(bad());
    }
    Ok(total.round() as u64)
}

fn from_secs(secs: f64) -> Option<u64> {
    (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| (secs * 1000.0).round() as u64)
}

/// `1500` → `"1.5s"`, `250` → `"250ms"`.
pub fn format(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", ms as f64 / 1000.0)
    }
}

/// For `#[serde(with = "crate::duration")]`: writes milliseconds as a human duration.
pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*ms))
}

/// For `#[serde(with = "crate::duration")]`: reads a duration string or a number of milliseconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration: seconds as a number, or a string such as \"500ms\" or \"2s\"")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        v.checked_mul(1000)
            .ok_or_else(|| E::custom("duration too large"))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::custom("a duration cannot be negative"))
            .and_then(|v| self.visit_u64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        from_secs(v).ok_or_else(|| E::custom(format!("{v} is not a valid number of seconds")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_formats() {
        for (text, ms) in [
            ("500ms", 500),
            ("2s", 2000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("0.5", 500),
            ("3", 3000),
            ("1.5s", 1500),
        ] {
            assert_eq!(super::parse(text), Ok(ms), "{text}");
        }
        for bad in ["", "s", "5x", "-1s", "1s2"] {
            assert!(super::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(super::format(1500), "1.5s");
        assert_eq!(super::format(250), "250ms");
        assert_eq!(super::format(2000), "2s");
    }
}
