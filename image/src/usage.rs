//! Disk usage of a content-addressed store and what garbage collection may remove: pure
//! functions over "which image uses which blob" and "which blobs are on disk", shared by the
//! cluster registry (controller) and the per-host content store (agent).
//!
//! Accounting follows `docker system df -v`: an image's size is its config plus its layers as
//! stored (compressed); the bytes of blobs that another image also uses are *shared*, the
//! rest *unique* to it. Removing an image frees at most its unique bytes.
//!
//! Invariants: a blob counts once per image however often the image lists it; an image's
//! shared plus unique bytes equal its size; a blob is collectable only when no image
//! references it *and* it is older than the grace period (a push uploads blobs before the
//! manifest that references them, so a young unreferenced blob may be about to be used).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

/// One image (manifest) and the blobs it needs: config and layers, with their sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBlobs {
    /// The manifest's digest: images are distinct by it, whatever their names.
    pub id: String,
    /// (digest, size in bytes) of the config and every layer.
    pub blobs: Vec<(String, u64)>,
}

/// An image's size split into bytes shared with other images and bytes only it uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageUsage {
    /// All its blobs' bytes.
    pub size: u64,
    /// Bytes of blobs other images use too.
    pub shared: u64,
    /// Bytes only this image uses: what removing it would free.
    pub unique: u64,
}

/// Size, shared and unique bytes of each image (by id). Two entries with the same id are one
/// image (e.g. two tags of one manifest) and never share with each other.
pub fn usage(images: &[ImageBlobs]) -> HashMap<String, ImageUsage> {
    // Each image's distinct blobs, so a layer listed twice counts once.
    let mut per_image: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for img in images {
        let blobs = per_image.entry(&img.id).or_default();
        for (d, size) in &img.blobs {
            blobs.insert(d, *size);
        }
    }
    let mut users: HashMap<&str, usize> = HashMap::new();
    for blobs in per_image.values() {
        for d in blobs.keys() {
            *users.entry(d).or_default() += 1;
        }
    }
    per_image
        .into_iter()
        .map(|(id, blobs)| {
            let mut u = ImageUsage::default();
            for (d, size) in blobs {
                u.size += size;
                if users[d] > 1 {
                    u.shared += size;
                } else {
                    u.unique += size;
                }
            }
            (id.to_string(), u)
        })
        .collect()
}

/// A blob file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Its digest, from its path.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written (the later of its mtime and ctime), for the grace period.
    pub modified: SystemTime,
}

/// Totals for a store: what is on disk, what it would take without sharing, what a prune
/// would free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Distinct images.
    pub images: u64,
    /// Blob files on disk and their bytes.
    pub blobs: u64,
    /// Bytes those blobs take.
    pub disk_bytes: u64,
    /// `disk_bytes` plus every byte that sharing saves: each image's blobs counted for it
    /// alone.
    pub undeduplicated_bytes: u64,
    /// Bytes of blobs on disk that no image references (and no `keep` digest names).
    pub reclaimable_bytes: u64,
}

/// Totals over `images` and the blobs `on_disk`. `keep` names blobs that are referenced
/// although no image lists them as config or layer (the manifests' own bytes).
pub fn totals(images: &[ImageBlobs], on_disk: &[StoredBlob], keep: &BTreeSet<String>) -> Totals {
    let per_image = usage(images);
    let referenced = referenced(images, keep);
    let disk: HashMap<&str, u64> = on_disk
        .iter()
        .map(|b| (b.digest.as_str(), b.size))
        .collect();
    let disk_bytes: u64 = disk.values().sum();
    let reclaimable_bytes = disk
        .iter()
        .filter(|(d, _)| !referenced.contains(**d))
        .map(|(_, s)| s)
        .sum();
    // Sharing saves (users - 1) copies of every shared blob that is actually here.
    let mut users: HashMap<&str, u64> = HashMap::new();
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    for img in images {
        for (d, _) in &img.blobs {
            if seen.insert((&img.id, d)) {
                *users.entry(d).or_default() += 1;
            }
        }
    }
    let saved: u64 = users
        .iter()
        .filter_map(|(d, n)| disk.get(d).map(|size| size * (n - 1)))
        .sum();
    Totals {
        images: per_image.len() as u64,
        blobs: disk.len() as u64,
        disk_bytes,
        undeduplicated_bytes: disk_bytes + saved,
        reclaimable_bytes,
    }
}

/// Every digest `images` need (configs and layers), plus `keep`.
pub fn referenced(images: &[ImageBlobs], keep: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = keep.clone();
    for img in images {
        out.insert(img.id.clone());
        out.extend(img.blobs.iter().map(|(d, _)| d.clone()));
    }
    out
}

/// What a collection decides about the blobs on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collection {
    /// Unreferenced and older than the grace period: to delete.
    pub remove: Vec<StoredBlob>,
    /// Unreferenced but younger than the grace period: kept this time.
    pub young: Vec<StoredBlob>,
}

/// Splits the unreferenced blobs `on_disk` into those to remove and those too young to;
/// `referenced` comes from [`referenced`]. A blob modified in the future (clock skew) is
/// young.
pub fn collect(
    on_disk: &[StoredBlob],
    referenced: &BTreeSet<String>,
    now: SystemTime,
    grace: Duration,
) -> Collection {
    let mut out = Collection::default();
    for b in on_disk.iter().filter(|b| !referenced.contains(&b.digest)) {
        let age = now.duration_since(b.modified).unwrap_or(Duration::ZERO);
        if age >= grace {
            out.remove.push(b.clone());
        } else {
            out.young.push(b.clone());
        }
    }
    out
}

/// `n` bytes as `docker` prints sizes (powers of 1000): `0 B`, `512 B`, `12.4 MB`, `1.05 GB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, blobs: &[(&str, u64)]) -> ImageBlobs {
        ImageBlobs {
            id: id.into(),
            blobs: blobs.iter().map(|(d, s)| (d.to_string(), *s)).collect(),
        }
    }

    fn blob(d: &str, size: u64, age_s: u64, now: SystemTime) -> StoredBlob {
        StoredBlob {
            digest: d.into(),
            size,
            modified: now - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn shared_bytes_are_those_another_image_uses() {
        // a and b share the base layer; b lists its own layer twice; c is a second tag of a.
        let images = [
            img("a", &[("cfg-a", 1), ("base", 100), ("top-a", 10)]),
            img(
                "b",
                &[("cfg-b", 2), ("base", 100), ("top-b", 20), ("top-b", 20)],
            ),
            img("a", &[("cfg-a", 1), ("base", 100), ("top-a", 10)]),
        ];
        let u = usage(&images);
        assert_eq!(u.len(), 2);
        assert_eq!(
            u["a"],
            ImageUsage {
                size: 111,
                shared: 100,
                unique: 11
            }
        );
        assert_eq!(
            u["b"],
            ImageUsage {
                size: 122,
                shared: 100,
                unique: 22
            }
        );
        let alone = usage(&[img("x", &[("l", 5)])]);
        assert_eq!(
            alone["x"],
            ImageUsage {
                size: 5,
                shared: 0,
                unique: 5
            }
        );
    }

    #[test]
    fn totals_count_disk_once_and_sharing_savings() {
        let now = SystemTime::now();
        let images = [
            img("m-a", &[("cfg-a", 1), ("base", 100)]),
            img("m-b", &[("cfg-b", 2), ("base", 100)]),
        ];
        let disk = [
            blob("m-a", 7, 0, now),
            blob("m-b", 8, 0, now),
            blob("cfg-a", 1, 0, now),
            blob("cfg-b", 2, 0, now),
            blob("base", 100, 0, now),
            blob("orphan", 50, 0, now),
        ];
        let t = totals(&images, &disk, &BTreeSet::new());
        assert_eq!(t.images, 2);
        assert_eq!(t.blobs, 6);
        assert_eq!(t.disk_bytes, 168);
        // The base layer is stored once instead of twice.
        assert_eq!(t.undeduplicated_bytes, 268);
        // Manifests are referenced (they are the images' ids); only the orphan is garbage.
        assert_eq!(t.reclaimable_bytes, 50);
    }

    #[test]
    fn collect_spares_referenced_and_young_blobs() {
        let now = SystemTime::now();
        let images = [img("m", &[("cfg", 1), ("layer", 10)])];
        let keep: BTreeSet<String> = ["index".to_string()].into();
        let refs = referenced(&images, &keep);
        let disk = [
            blob("m", 3, 3600, now),
            blob("cfg", 1, 3600, now),
            blob("layer", 10, 3600, now),
            blob("index", 4, 3600, now),
            blob("old", 20, 3600, now),
            blob("fresh", 30, 5, now),
            StoredBlob {
                digest: "future".into(),
                size: 1,
                modified: now + Duration::from_secs(60),
            },
        ];
        let c = collect(&disk, &refs, now, Duration::from_secs(600));
        let names = |v: &[StoredBlob]| v.iter().map(|b| b.digest.clone()).collect::<Vec<_>>();
        assert_eq!(names(&c.remove), ["old"]);
        assert_eq!(names(&c.young), ["fresh", "future"]);
        // With no grace at all, every unreferenced blob goes, whatever its age.
        let c = collect(&disk, &refs, now, Duration::ZERO);
        assert_eq!(names(&c.remove), ["old", "fresh", "future"]);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.00 kB");
        assert_eq!(human_bytes(12_400_000), "12.4 MB");
        assert_eq!(human_bytes(4_260_000), "4.26 MB");
        assert_eq!(human_bytes(123_456_789), "123 MB");
        assert_eq!(human_bytes(1_050_000_000), "1.05 GB");
    }
}
