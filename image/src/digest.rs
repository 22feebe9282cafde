//! Content digests. Only `sha256:<64 lowercase hex>` is accepted: it is what every OCI tool
//! writes, and refusing anything else up front means a digest taken from a remote manifest can
//! be joined into a filesystem path or URL without further checks.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use crate::{ImageError, Result};

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex characters.
pub fn validate(digest: &str) -> Result<()> {
    hex_of(digest).map(|_| ())
}

/// The hex part of a valid digest (what content-addressed paths are named after).
pub fn hex_of(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::InvalidDigest(digest.to_string()))?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(ImageError::InvalidDigest(digest.to_string()))
    }
}

/// The digest of a byte slice.
pub fn of_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain ids of a stack of layers, bottom first, from their diff ids (the digests of the
/// uncompressed layer tars): `chain(1) = diff(1)`, `chain(n) = sha256(chain(n-1) + " " +
/// diff(n))`, as containerd and BuildKit name their snapshots. An unpacked layer is stored
/// under its chain id, not its blob digest: two byte-identical layers in one image (a repeated
/// `mkdir -p`, the same file copied twice) then get two directories, where one directory named
/// twice in `lowerdir` makes the overlay mount fail with `ELOOP`.
pub fn chain_ids(diff_ids: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        validate(d)?;
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => of_bytes(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    Ok(out)
}

/// Formats a finished hasher as a digest string.
pub fn finish(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`; nothing is hashed yet.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Returns (digest, bytes read).
    pub fn finish(self) -> (String, u64) {
        (finish(self.hasher), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`; nothing is hashed yet.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Returns (inner writer, digest, bytes written).
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, finish(self.hasher), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes a whole reader: (digest, length).
pub fn of_reader(reader: impl Read) -> io::Result<(String, u64)> {
    let mut hashing = HashingReader::new(reader);
    io::copy(&mut hashing, &mut io::sink())?;
    Ok(hashing.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_tell_identical_layers_apart() {
        let a = of_bytes(b"layer a");
        let b = of_bytes(b"layer b");
        let ids = chain_ids(&[a.clone(), b.clone(), b.clone()]).unwrap();
        assert_eq!(ids[0], a, "the bottom layer's chain id is its diff id");
        assert_eq!(ids[1], of_bytes(format!("{a} {b}").as_bytes()));
        assert_eq!(ids[2], of_bytes(format!("{} {b}", ids[1]).as_bytes()));
        assert_ne!(ids[1], ids[2], "the same layer twice gets two snapshots");
        assert!(chain_ids(&[]).unwrap().is_empty());
        assert!(chain_ids(&["sha256:../x".to_string()]).is_err());
    }

    #[test]
    fn validates_digests() {
        let good = of_bytes(b"hello");
        assert_eq!(
            good,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(validate(&good).is_ok());
        for bad in [
            "sha256:abc",
            "sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000000",
            "",
        ] {
            assert!(validate(bad).is_err(), "{bad} should be refused");
        }
    }
}
