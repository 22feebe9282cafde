//! `rctl events [--since T] [--until T] [--filter K=V]… [-o json]`: what happens in the
//! cluster, live, as the controller derives it from committed state. Each line carries the
//! raft index of its change: `--since INDEX` resumes right after a line seen.
//!
//! A point (`--since`, `--until`) is a raft index (a plain number), a time ago (`10m`, `2h`)
//! or an RFC 3339 time (`2026-12-07T03:00:00Z`). Without `--since` only new events show;
//! with `--until` the stream ends there.

use std::time::{SystemTime, UNIX_EPOCH};

use rudder_proto::v1::{ClusterEvent, EventsRequest};

use crate::context::Context;
use crate::output::OutputFormat;

/// A point in the event stream, as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A raft index.
    Index(u64),
    /// Milliseconds since the epoch.
    Time(u64),
}

/// Parses a `--since`/`--until` value (see the module doc); `now_ms` anchors `10m`.
pub fn parse_point(s: &str, now_ms: u64) -> Result<Point, String> {
    let s = s.trim();
    if let Ok(i) = s.parse::<u64>() {
        return Ok(Point::Index(i));
    }
    if let Some(secs) = super::image_ls::parse_rfc3339(s) {
        return u64::try_from(secs)
            .map(|s| Point::Time(s * 1000))
            .map_err(|_| format!("{s:?}: before 1970"));
    }
    rudder_model::duration::parse(s)
        .map(|d| Point::Time(now_ms.saturating_sub(d)))
        .map_err(|_| {
            format!("{s:?}: expected a raft index (42), a time ago (10m) or an RFC 3339 time")
        })
}

/// The request for these options.
pub fn request(since: Option<Point>, until: Option<Point>, filters: &[String]) -> EventsRequest {
    let mut req = EventsRequest {
        filters: filters.to_vec(),
        ..Default::default()
    };
    match since {
        Some(Point::Index(i)) => req.since_index = Some(i),
        Some(Point::Time(t)) => req.since_ms = Some(t),
        None => {}
    }
    match until {
        Some(Point::Index(i)) => req.until_index = Some(i),
        Some(Point::Time(t)) => req.until_ms = Some(t),
        None => {}
    }
    req
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(
    ctx: &Context,
    since: Option<&str>,
    until: Option<&str>,
    filters: &[String],
    output: OutputFormat,
) -> anyhow::Result<()> {
    let now = now_ms();
    let point = |s: Option<&str>| -> anyhow::Result<Option<Point>> {
        s.map(|s| parse_point(s, now).map_err(|e| anyhow::anyhow!("events: {e}")))
            .transpose()
    };
    let req = request(point(since)?, point(until)?, filters);
    let mut client = crate::connect(ctx).await?;
    let mut stream = client
        .events(req)
        .await
        .map_err(crate::status_err)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(crate::status_err)? {
        if e.r#type == "notice" {
            eprintln!("warning: {}", e.message);
            continue;
        }
        match output {
            OutputFormat::Json => println!("{}", serde_json::to_string(&json(&e))?),
            // One YAML document per event: a stream any YAML reader splits on `---`.
            OutputFormat::Yaml => print!("---\n{}", serde_yaml::to_string(&json(&e))?),
            OutputFormat::Table => println!("{}", line(&e)),
        }
    }
    Ok(())
}

/// One event as a JSON object (one per line with `-o json`).
pub fn json(e: &ClusterEvent) -> serde_json::Value {
    let attributes: std::collections::BTreeMap<_, _> = e.attributes.iter().collect();
    serde_json::json!({
        "index": e.index,
        "time": rfc3339(e.at_ms),
        "time_ms": e.at_ms,
        "type": e.r#type,
        "action": e.action,
        "id": e.id,
        "name": e.name,
        "service": e.service,
        "node": e.node,
        "message": e.message,
        "attributes": attributes,
    })
}

/// One event as a line: time, index, type and action, name, details, reason.
pub fn line(e: &ClusterEvent) -> String {
    let mut s = format!(
        "{} #{} {} {} {}",
        rfc3339(e.at_ms),
        e.index,
        e.r#type,
        e.action,
        e.name
    );
    let mut details: Vec<String> = Vec::new();
    if !e.node.is_empty() && e.r#type != "node" {
        details.push(format!("node={}", e.node));
    }
    let mut attrs: Vec<_> = e.attributes.iter().collect();
    attrs.sort();
    details.extend(attrs.into_iter().map(|(k, v)| format!("{k}={v}")));
    if !details.is_empty() {
        s.push_str(&format!(" ({})", details.join(", ")));
    }
    if !e.message.is_empty() {
        s.push_str(": ");
        s.push_str(&e.message);
    }
    s
}

/// `ms` since the epoch as RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(ms: u64) -> String {
    let full = rudder_shim::rfc3339((ms / 1000) as i64, (ms % 1000) as u32 * 1_000_000);
    // `.mmm000000Z`: keep the milliseconds.
    format!("{}Z", &full[..full.len() - 7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points() {
        let now = 10_000_000;
        assert_eq!(parse_point("42", now), Ok(Point::Index(42)));
        assert_eq!(parse_point("10s", now), Ok(Point::Time(now - 10_000)));
        assert_eq!(
            parse_point("2026-12-07T03:00:00Z", now),
            Ok(Point::Time(1_796_612_400_000))
        );
        assert!(parse_point("yesterday", now).is_err());
        let r = request(
            Some(Point::Index(7)),
            Some(Point::Time(9)),
            &["service=web".into()],
        );
        assert_eq!(
            (r.since_index, r.since_ms, r.until_ms),
            (Some(7), None, Some(9))
        );
    }

    #[test]
    fn times_round_trip() {
        for s in [
            "1970-01-01T00:00:00.000Z",
            "2026-12-07T03:00:00.250Z",
            "2000-02-29T23:59:59.999Z",
        ] {
            let secs = super::super::image_ls::parse_rfc3339(s).expect("parses");
            let ms = secs as u64 * 1000 + s[20..23].parse::<u64>().expect("ms");
            assert_eq!(rfc3339(ms), s);
        }
    }

    #[test]
    fn a_line_and_its_json() {
        let e = ClusterEvent {
            index: 12,
            at_ms: 0,
            r#type: "task".into(),
            action: "failed".into(),
            name: "web.1.abc".into(),
            service: "web".into(),
            node: "h1".into(),
            message: "exit 137".into(),
            attributes: [("from".to_string(), "running".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            line(&e),
            "1970-01-01T00:00:00.000Z #12 task failed web.1.abc (node=h1, from=running): exit 137"
        );
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&json(&e)).expect("json")).expect("parse");
        assert_eq!(v["attributes"]["from"], "running");
        assert_eq!(v["index"], 12);
    }
}
