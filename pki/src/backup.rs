//! The cluster backup file: the whole store (serialized as the snapshots are) encrypted with a
//! backup key that is not any controller's data key, so the file can travel and be restored on
//! a fresh host.
//!
//! Format (version 1): `MAGIC (8) | version (u32 BE) | key check (8) | ciphertext length (u64
//! BE) | nonce (12) | AES-256-GCM ciphertext and tag`. The whole header is the associated
//! data. The key check (the first 8 bytes of SHA-256 over a label and the key) tells a wrong key
//! apart from a tampered file; the length tells a truncated file apart from both.
//! Keys are 32 random bytes, written as 64 hex characters (in `RUDDER_BACKUP_KEY` or a key file).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};
use sha2::Digest as _;

/// First bytes of a backup file.
pub const MAGIC: &[u8; 8] = b"RUDDERBK";
/// The backup format this build writes, and the only one it reads.
pub const VERSION: u32 = 1;
/// The environment variable `rudder-controller --restore` reads the key from.
pub const KEY_ENV: &str = "RUDDER_BACKUP_KEY";
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = MAGIC.len() + 4 + 8 + 8 + NONCE_LEN;
/// Largest backup accepted (the store lives in memory on every controller).
pub const MAX_BACKUP: u64 = 2 * 1024 * 1024 * 1024;
/// Largest key file read.
const MAX_KEY_FILE: u64 = 4096;

/// Why a backup could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file does not start with [`MAGIC`].
    #[error(
        "backup: not a rudder backup file (no {:?} header)",
        String::from_utf8_lossy(MAGIC)
    )]
    NotBackup,
    /// A format version this build does not read.
    #[error("backup: format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// The key is not the one the backup was written with.
    #[error("backup: wrong backup key (its fingerprint does not match the key this backup was written with)")]
    WrongKey,
    /// The file is shorter than its header says.
    #[error("backup: truncated file ({got} bytes, the header says {want})")]
    Truncated {
        /// Bytes in the file.
        got: u64,
        /// Bytes the header promises.
        want: u64,
    },
    /// The authentication tag does not verify.
    #[error("backup: the file does not decrypt: it was tampered with or corrupted")]
    Tampered,
    /// The backup key is malformed or its file is readable by others.
    #[error("backup: backup key: {0}")]
    Key(String),
    /// The backup is larger than [`MAX_BACKUP`].
    #[error("backup: too large ({0} bytes, at most {MAX_BACKUP})")]
    TooLarge(u64),
    /// The system could not provide randomness for a key or nonce.
    #[error("backup: no system randomness")]
    Random,
    /// A file could not be read or written (path, error).
    #[error("backup: {0}: {1}")]
    Io(std::path::PathBuf, std::io::Error),
}

/// A 256-bit backup key. `Debug` never shows the bytes.
#[derive(Clone)]
pub struct BackupKey([u8; KEY_LEN]);

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupKey({})", hex::encode(self.check()))
    }
}

impl BackupKey {
    /// A new random key.
    pub fn generate() -> Result<BackupKey, BackupError> {
        let mut b = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| BackupError::Random)?;
        Ok(BackupKey(b))
    }

    /// A key from exactly 32 raw bytes.
    pub fn from_bytes(b: &[u8]) -> Result<BackupKey, BackupError> {
        let b: [u8; KEY_LEN] = b
            .try_into()
            .map_err(|_| BackupError::Key(format!("must be {KEY_LEN} bytes, got {}", b.len())))?;
        Ok(BackupKey(b))
    }

    /// Parses 64 hex characters (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<BackupKey, BackupError> {
        let s = s.trim();
        let b = hex::decode(s)
            .map_err(|_| BackupError::Key(format!("must be {} hex characters", KEY_LEN * 2)))?;
        Self::from_bytes(&b)
    }

    /// Reads a key file (hex); refused if group or others may read it.
    pub fn read_file(path: &std::path::Path) -> Result<BackupKey, BackupError> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let f = std::fs::File::open(path).map_err(|e| BackupError::Io(path.into(), e))?;
        let md = f.metadata().map_err(|e| BackupError::Io(path.into(), e))?;
        if md.mode() & 0o077 != 0 {
            return Err(BackupError::Key(format!(
                "{} is readable by group or others (mode {:o}); chmod 600 it",
                path.display(),
                md.mode() & 0o777
            )));
        }
        let mut s = String::new();
        f.take(MAX_KEY_FILE)
            .read_to_string(&mut s)
            .map_err(|e| BackupError::Io(path.into(), e))?;
        Self::parse(&s)
    }

    /// The key as 64 hex characters, as key files hold it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw key bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn check(&self) -> [u8; 8] {
        let mut h = sha2::Sha256::new();
        h.update(b"rudder-backup-key-check\0");
        h.update(self.0);
        h.finalize()[..8].try_into().expect("8 bytes")
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte key"))
    }
}

/// Encrypts `plain` (consumed: sealed in place) into a backup file's bytes.
pub fn seal(key: &BackupKey, mut plain: Vec<u8>) -> Result<Vec<u8>, BackupError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| BackupError::Random)?;
    let ct_len = (plain.len() + TAG_LEN) as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_be_bytes());
    header.extend_from_slice(&key.check());
    header.extend_from_slice(&ct_len.to_be_bytes());
    header.extend_from_slice(&nonce);
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header),
            &mut plain,
        )
        .map_err(|_| BackupError::Tampered)?;
    // Header first: one more copy of the store, which is cheaper than a second pass.
    header.reserve(plain.len());
    header.extend_from_slice(&plain);
    Ok(header)
}

/// Decrypts a backup file's bytes; every refusal says why.
pub fn open(key: &BackupKey, mut file: Vec<u8>) -> Result<Vec<u8>, BackupError> {
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotBackup);
    }
    if file.len() < HEADER_LEN {
        return Err(BackupError::Truncated {
            got: file.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let version = u32::from_be_bytes(file[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(BackupError::Version(version));
    }
    if file[12..20] != key.check() {
        return Err(BackupError::WrongKey);
    }
    let ct_len = u64::from_be_bytes(file[20..28].try_into().expect("8 bytes"));
    let want = HEADER_LEN as u64 + ct_len;
    if (file.len() as u64) < want {
        return Err(BackupError::Truncated {
            got: file.len() as u64,
            want,
        });
    }
    if (file.len() as u64) > want || ct_len < TAG_LEN as u64 {
        return Err(BackupError::Tampered);
    }
    let nonce: [u8; NONCE_LEN] = file[28..HEADER_LEN].try_into().expect("nonce");
    let mut body = file.split_off(HEADER_LEN);
    let plain_len = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&file),
            &mut body,
        )
        .map_err(|_| BackupError::Tampered)?
        .len();
    body.truncate(plain_len);
    Ok(body)
}

/// Reads a backup file (size-limited).
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>, BackupError> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(|e| BackupError::Io(path.into(), e))?;
    let mut v = Vec::new();
    f.take(MAX_BACKUP + 1)
        .read_to_end(&mut v)
        .map_err(|e| BackupError::Io(path.into(), e))?;
    if v.len() as u64 > MAX_BACKUP {
        return Err(BackupError::TooLarge(v.len() as u64));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let key = BackupKey::generate().unwrap();
        let plain = b"{\"services\":{}}".repeat(1000);
        let file = seal(&key, plain.clone()).unwrap();
        assert_eq!(&file[..8], MAGIC);
        assert_eq!(open(&key, file.clone()).unwrap(), plain);
        // Key as text round-trips.
        let k2 = BackupKey::parse(&format!("{}\n", key.to_hex())).unwrap();
        assert_eq!(open(&k2, file.clone()).unwrap(), plain);

        let wrong = BackupKey::generate().unwrap();
        let e = open(&wrong, file.clone()).unwrap_err();
        assert!(matches!(e, BackupError::WrongKey), "{e}");
        assert!(e.to_string().contains("wrong backup key"));

        let mut tampered = file.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 1;
        let e = open(&key, tampered).unwrap_err();
        assert!(matches!(e, BackupError::Tampered), "{e}");

        let mut truncated = file.clone();
        truncated.truncate(file.len() - 100);
        let e = open(&key, truncated).unwrap_err();
        assert!(matches!(e, BackupError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));

        let e = open(&key, b"{\"not\":1}".to_vec()).unwrap_err();
        assert!(matches!(e, BackupError::NotBackup), "{e}");
        assert!(BackupKey::parse("abc").is_err());
    }
}
