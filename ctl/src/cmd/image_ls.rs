//! `rctl image ls|rm|prune`: the images in the cluster registry (or in one host's content
//! store) with the bytes they take and share, removing names, and garbage collection.
//!
//! Sizes are as `docker system df -v` shows them: SIZE is the config plus every layer as
//! stored (compressed), SHARED the bytes of those blobs another image uses too, UNIQUE the
//! rest (what removing the image and pruning would free).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rudder_image::usage::human_bytes;
use rudder_proto::v1::{
    ImageSummary, ListImagesRequest, ListImagesResponse, PruneImagesRequest, RemoveImagesRequest,
};

use crate::context::Context;
use crate::output::{self, OutputFormat};

/// `sha256:0123456789ab…` → `0123456789ab`, as docker shows image ids.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "<none>"
    } else {
        s
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-23T10:00:00.5Z`, `…+01:00`).
pub(crate) fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.get(4..5)? != "-" || !matches!(s.get(10..11)?, "T" | "t" | " ") {
        return None;
    }
    // Skip a fraction, then the zone.
    let rest = s.get(19..)?;
    let rest = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match rest {
        "Z" | "z" => 0,
        z if z.len() == 6 => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            sign * (z.get(1..3)?.parse::<i64>().ok()? * 3600
                + z.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// How long ago `created` was, as docker says it ("3 minutes ago"); the text itself when it
/// cannot be read, "" when empty.
fn ago(created: &str, now: SystemTime) -> String {
    if created.is_empty() {
        return String::new();
    }
    let Some(t) = parse_rfc3339(created) else {
        return created.to_string();
    };
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let secs = (now - t).max(0);
    let (n, unit) = match secs {
        s if s < 60 => return "less than a minute ago".into(),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86_400 => (s / 3600, "hour"),
        s if s < 86_400 * 30 => (s / 86_400, "day"),
        s if s < 86_400 * 365 => (s / (86_400 * 30), "month"),
        s => (s / (86_400 * 365), "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// The summary line under the table.
fn summary(r: &ListImagesResponse, host: bool) -> String {
    let mut s = format!(
        "{} image{}, {} blob{}, {} total on disk ({} if not deduplicated)",
        r.image_count,
        if r.image_count == 1 { "" } else { "s" },
        r.blobs,
        if r.blobs == 1 { "" } else { "s" },
        human_bytes(r.disk_bytes),
        human_bytes(r.undeduplicated_bytes),
    );
    if host {
        s.push_str(&format!(
            ", {} unpacked in {} layer{}",
            human_bytes(r.unpacked_bytes),
            r.layers,
            if r.layers == 1 { "" } else { "s" }
        ));
    }
    s.push_str(&format!(
        ", {} reclaimable by rctl image prune",
        human_bytes(r.reclaimable_bytes)
    ));
    s
}

fn to_json(i: &ImageSummary) -> serde_json::Value {
    serde_json::json!({
        "repository": i.repository,
        "tag": i.tag,
        "digest": i.digest,
        "created": i.created,
        "size": i.size,
        "shared": i.shared,
        "unique": i.unique,
        "unpacked": i.unpacked,
        "tasks": i.tasks,
    })
}

/// `rctl image ls [-a] [--node NODE] [-q] [-o json]`.
pub async fn ls(
    ctx: &Context,
    all: bool,
    node: Option<&str>,
    quiet: bool,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .list_images(ListImagesRequest {
            all,
            node: node.unwrap_or_default().to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    if quiet {
        for i in &r.images {
            match (i.repository.as_str(), i.tag.as_str()) {
                ("", _) => println!("{}", i.digest),
                (repo, "") => println!("{repo}@{}", i.digest),
                (repo, tag) => println!("{repo}:{tag}"),
            }
        }
        return Ok(());
    }
    let v = serde_json::json!({
        "place": r.place,
        "images": r.images.iter().map(to_json).collect::<Vec<_>>(),
        "image_count": r.image_count,
        "blobs": r.blobs,
        "disk_bytes": r.disk_bytes,
        "undeduplicated_bytes": r.undeduplicated_bytes,
        "reclaimable_bytes": r.reclaimable_bytes,
        "layers": r.layers,
        "unpacked_bytes": r.unpacked_bytes,
    });
    output::print(output, &v, |w| {
        write_table(w, &r, node.is_some(), SystemTime::now())
    })
}

/// The images as columns (a host's adds what is unpacked and which tasks use each), then the
/// totals line.
fn write_table(
    w: &mut dyn std::io::Write,
    r: &ListImagesResponse,
    host: bool,
    now: SystemTime,
) -> std::io::Result<()> {
    let mut header = vec![
        "REPOSITORY",
        "TAG",
        "DIGEST",
        "CREATED",
        "SIZE",
        "SHARED",
        "UNIQUE",
    ];
    if host {
        header.extend(["UNPACKED", "TASKS"]);
    }
    let rows: Vec<Vec<String>> = r
        .images
        .iter()
        .map(|i| {
            let mut row = vec![
                or_none(&i.repository).to_string(),
                or_none(&i.tag).to_string(),
                short(&i.digest).to_string(),
                ago(&i.created, now),
                human_bytes(i.size),
                human_bytes(i.shared),
                human_bytes(i.unique),
            ];
            if host {
                row.push(human_bytes(i.unpacked));
                row.push(i.tasks.join(","));
            }
            row
        })
        .collect();
    output::write_table(w, &header, &rows)?;
    writeln!(w, "{}", summary(r, host))
}

/// `rctl image rm [--force] REF...`.
pub async fn rm(ctx: &Context, references: &[String], force: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .remove_images(RemoveImagesRequest {
            references: references.to_vec(),
            force,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    for i in r.removed {
        println!("Untagged: {}", i.reference);
        if i.manifest_removed {
            println!("Deleted: {}", i.digest);
        }
    }
    Ok(())
}

/// `rctl image prune [--grace DURATION]`: one line per manager and per host.
pub async fn prune(ctx: &Context, grace: Option<Duration>) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let r = client
        .prune_images(PruneImagesRequest {
            grace_ms: grace.map(|g| g.as_millis() as u64),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut failed = 0;
    for p in &r.results {
        if !p.error.is_empty() {
            failed += 1;
            println!("{}: not pruned: {}", p.place, p.error);
            continue;
        }
        let young = if p.kept_young > 0 {
            format!(" ({} recent kept)", p.kept_young)
        } else {
            String::new()
        };
        if p.place.starts_with("host ") {
            println!(
                "{}: removed {} image{}, {} layer{}, {}{young}",
                p.place,
                p.images,
                if p.images == 1 { "" } else { "s" },
                p.layers,
                if p.layers == 1 { "" } else { "s" },
                human_bytes(p.bytes)
            );
        } else {
            println!(
                "{}: removed {} blob{}, {}{young}",
                p.place,
                p.blobs,
                if p.blobs == 1 { "" } else { "s" },
                human_bytes(p.bytes)
            );
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} place(s) could not be pruned (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_times_read_as_docker_says_them() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2026-11-23T10:00:00.123456789Z"),
            parse_rfc3339("2026-11-23T11:00:00+01:00")
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        let now = UNIX_EPOCH + Duration::from_secs(951_868_800 + 3 * 60 + 5);
        assert_eq!(ago("2000-03-01T00:00:00Z", now), "3 minutes ago");
        assert_eq!(ago("2000-02-29T23:59:30Z", now), "3 minutes ago");
        assert_eq!(ago("2000-03-01T00:02:30Z", now), "less than a minute ago");
        assert_eq!(ago("1999-03-01T00:00:00Z", now), "1 year ago");
        assert_eq!(ago("", now), "");
        assert_eq!(ago("garbage", now), "garbage");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }
}
