//! The controller's data-encryption keys (DEKs): what encrypts its raft log, snapshots and CA
//! key at rest (as a Swarm manager encrypts its WAL and snapshots with the DEK in its key file).
//! Here in the PKI crate so that `rctl cluster admin-cert --ca-dir` can open the sealed CA key
//! on a manager host.
//!
//! Invariants:
//! - Every controller has its own keyring in `<data>/certs/raft-dek` (0600 in the 0700 certs
//!   dir, written atomically): one current key, plus — only while a rotation re-encrypts — the
//!   keys it replaced. [`load_keyring`] and [`store_keyring`] are the only code that reads or
//!   writes that file. With autolock on it is wrapped with the cluster's [`UnlockKey`]
//!   (`WRAPPED_MAGIC | nonce | AES-256-GCM(keyring)`), and opens only with that key.
//! - A record is `MAGIC | key id (u32 BE) | nonce (96 bits, random per record) | AES-256-GCM
//!   ciphertext and tag`. The header and the record's place (its [`Context`], e.g. the log
//!   index) are the associated data, so a record moved to another place does not decrypt.
//! - Records without [`MAGIC`] are plaintext written before encryption existed; they stay
//!   readable ([`DataKeys::open`]) until re-encrypted. Neither a protobuf `Entry` (no field 10)
//!   nor a JSON store (`{`) begins with the magic.
//! - Key bytes are never printed: `Debug` shows key ids only.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The keyring's file in the certs dir.
pub const DEK_FILE: &str = "raft-dek";
/// First bytes of every encrypted record.
pub const MAGIC: &[u8; 4] = b"RDK\x01";
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Magic, key id, nonce.
const HEADER_LEN: usize = MAGIC.len() + 4 + NONCE_LEN;
/// Largest keyring file accepted (a handful of keys).
const MAX_KEYRING_FILE: u64 = 16 * 1024;
const KEYRING_VERSION: u32 = 1;

/// Why encrypting or decrypting the store, a key file or the sealed CA key failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// The record names a data key this controller does not hold.
    #[error("crypt: {what}: written with data key {key_id}, which this controller does not have")]
    UnknownKey {
        /// What was being decrypted.
        what: String,
        /// The data key it was written with.
        key_id: u32,
    },
    /// The record does not authenticate.
    #[error("crypt: {what}: does not decrypt (tampered, moved from elsewhere, or a wrong key)")]
    Decrypt {
        /// What was being decrypted.
        what: String,
    },
    /// The record is too short to hold a nonce and a tag.
    #[error("crypt: {what}: truncated encrypted record ({len} bytes)")]
    Truncated {
        /// What was being decrypted.
        what: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The system could not provide randomness for a key or nonce.
    #[error("crypt: no system randomness")]
    Random,
    /// A key file could not be read or written (path, error).
    #[error("crypt: key file {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A key file is malformed (path, why).
    #[error("crypt: key file {0}: {1}")]
    Format(PathBuf, String),
    /// A new rotation was asked for before the previous one retired its key.
    #[error("crypt: a data key rotation is still re-encrypting (key {0} is not retired yet); try again when it finishes")]
    RotationInProgress(u32),
    /// The CA key to seal or unseal is invalid.
    #[error("crypt: {0}")]
    Ca(#[from] crate::ca::CaError),
    /// The sealed CA key file is over this many bytes.
    #[error("crypt: sealed ca key file too large (over {0} bytes)")]
    TooLarge(u64),
    /// The key file is locked (autolock) and no unlock key was given.
    #[error("crypt: key file {0} is locked (autolock): it needs the cluster's unlock key")]
    Locked(PathBuf),
    /// The unlock key does not open this key file.
    #[error(
        "crypt: key file {0}: the unlock key does not open it (a wrong or rotated unlock key)"
    )]
    WrongUnlockKey(PathBuf),
    /// The unlock key is malformed.
    #[error("crypt: unlock key: {0}")]
    BadUnlockKey(&'static str),
}

/// First bytes of a keyring file wrapped with an unlock key (autolock).
pub const WRAPPED_MAGIC: &[u8; 8] = b"RDRKEKW\x01";
/// The prefix of an unlock key as a user sees it.
pub const UNLOCK_KEY_PREFIX: &str = "RDRKEK-";

/// The cluster's key-encryption key (autolock): wraps each controller's keyring file. Shown
/// to the user once as `RDRKEK-<hex>`; `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct UnlockKey([u8; KEY_LEN]);

impl UnlockKey {
    /// A new random unlock key.
    pub fn generate() -> Result<UnlockKey, CryptError> {
        let mut b = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| CryptError::Random)?;
        Ok(UnlockKey(b))
    }

    /// The key as the user writes it, `RDRKEK-<64 hex digits>`.
    pub fn encode(&self) -> String {
        format!("{UNLOCK_KEY_PREFIX}{}", hex::encode(self.0))
    }

    /// Parses [`UnlockKey::encode`]'s form (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<UnlockKey, CryptError> {
        let s = s.trim();
        if s.len() > 256 {
            return Err(CryptError::BadUnlockKey("too long"));
        }
        let hexpart = s
            .strip_prefix(UNLOCK_KEY_PREFIX)
            .ok_or(CryptError::BadUnlockKey("does not begin with RDRKEK-"))?;
        let v =
            hex::decode(hexpart).map_err(|_| CryptError::BadUnlockKey("not hex after RDRKEK-"))?;
        let b: [u8; KEY_LEN] = v
            .try_into()
            .map_err(|_| CryptError::BadUnlockKey("not 32 bytes"))?;
        Ok(UnlockKey(b))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("32-byte key"))
    }
}

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(..)")
    }
}

/// Wraps a keyring file's `body` with `kek`: `WRAPPED_MAGIC | nonce | AES-256-GCM(body) | tag`.
fn wrap(kek: &UnlockKey, body: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| CryptError::Random)?;
    let mut out = Vec::with_capacity(WRAPPED_MAGIC.len() + NONCE_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(WRAPPED_MAGIC);
    out.extend_from_slice(&nonce);
    let aad = out.clone();
    out.extend_from_slice(body);
    let start = WRAPPED_MAGIC.len() + NONCE_LEN;
    let tag = kek
        .aead()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut out[start..],
        )
        .map_err(|_| CryptError::Random)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn unwrap_body(path: &Path, kek: &UnlockKey, mut raw: Vec<u8>) -> Result<Vec<u8>, CryptError> {
    let start = WRAPPED_MAGIC.len() + NONCE_LEN;
    if raw.len() < start + TAG_LEN {
        return Err(CryptError::Format(
            path.to_owned(),
            "truncated wrapped keyring".into(),
        ));
    }
    let nonce: [u8; NONCE_LEN] = raw[WRAPPED_MAGIC.len()..start].try_into().expect("nonce");
    let aad = raw[..start].to_vec();
    let len = kek
        .aead()
        .open_within(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut raw,
            start..,
        )
        .map_err(|_| CryptError::WrongUnlockKey(path.to_owned()))?
        .len();
    raw.truncate(len);
    Ok(raw)
}

/// Whether the keyring file in `certs_dir` is wrapped with an unlock key (autolock).
pub fn keyring_is_wrapped(certs_dir: &Path) -> Result<bool, CryptError> {
    use std::io::Read as _;
    let path = certs_dir.join(DEK_FILE);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(CryptError::Io(path, e)),
    };
    let mut head = [0u8; WRAPPED_MAGIC.len()];
    match f.read_exact(&mut head) {
        Ok(()) => Ok(&head == WRAPPED_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(CryptError::Io(path, e)),
    }
}

/// The CA key sealed with the data key, in the certs dir of a controller that holds the CA.
pub const SEALED_CA_KEY_FILE: &str = "ca-key.sealed";
const SEALED_CA_KEY: Context = Context::File(SEALED_CA_KEY_FILE);
/// Largest sealed CA key file read.
const MAX_SEALED_CA_KEY: u64 = 64 * 1024;

/// Seals `key_pem` (the CA key) into [`SEALED_CA_KEY_FILE`] in `certs_dir`.
pub fn seal_ca_key(certs_dir: &Path, keys: &DataKeys, key_pem: &str) -> Result<(), CryptError> {
    write_private_atomic(
        &certs_dir.join(SEALED_CA_KEY_FILE),
        &keys.seal(SEALED_CA_KEY, key_pem.as_bytes())?,
    )
}

fn read_sealed_ca_key(certs_dir: &Path) -> Result<Option<Vec<u8>>, CryptError> {
    use std::io::Read as _;
    let path = certs_dir.join(SEALED_CA_KEY_FILE);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CryptError::Io(path, e)),
    };
    let mut raw = Vec::new();
    f.take(MAX_SEALED_CA_KEY + 1)
        .read_to_end(&mut raw)
        .map_err(|e| CryptError::Io(path, e))?;
    if raw.len() as u64 > MAX_SEALED_CA_KEY {
        return Err(CryptError::TooLarge(MAX_SEALED_CA_KEY));
    }
    Ok(Some(raw))
}

/// The CA key from [`SEALED_CA_KEY_FILE`], `None` when this controller keeps none.
pub fn open_sealed_ca_key(certs_dir: &Path, keys: &DataKeys) -> Result<Option<String>, CryptError> {
    let Some(raw) = read_sealed_ca_key(certs_dir)? else {
        return Ok(None);
    };
    let key = keys.open(SEALED_CA_KEY, &raw)?;
    String::from_utf8(key)
        .map(Some)
        .map_err(|_| CryptError::Decrypt {
            what: SEALED_CA_KEY.to_string(),
        })
}

/// The cluster CA of a manager's certs dir (`ca.pem` and the sealed key, opened with the
/// keyring beside it), for offline recovery on that host; `None` when it keeps no sealed key.
pub fn load_sealed_ca(certs_dir: &Path) -> Result<Option<crate::ca::ClusterCa>, CryptError> {
    let Some(keys) = DataKeys::load(certs_dir)? else {
        return Ok(None);
    };
    let Some(key) = open_sealed_ca_key(certs_dir, &keys)? else {
        return Ok(None);
    };
    let ca_path = certs_dir.join(crate::ca::CA_CERT_FILE);
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| CryptError::Io(ca_path, e))?;
    Ok(Some(crate::ca::ClusterCa::from_pem(&ca_pem, &key)?))
}

/// Re-seals [`SEALED_CA_KEY_FILE`] under the current data key if it is under an older one (or
/// plaintext); whether it had to.
pub fn reseal_ca_key(certs_dir: &Path, keys: &DataKeys) -> Result<bool, CryptError> {
    let Some(raw) = read_sealed_ca_key(certs_dir)? else {
        return Ok(false);
    };
    if !keys.is_stale(&raw) {
        return Ok(false);
    }
    let key = keys.open(SEALED_CA_KEY, &raw)?;
    write_private_atomic(
        &certs_dir.join(SEALED_CA_KEY_FILE),
        &keys.seal(SEALED_CA_KEY, &key)?,
    )?;
    Ok(true)
}

/// Where a record lives: bound into its encryption, and named in errors.
#[derive(Clone, Copy, Debug)]
pub enum Context {
    /// The raft log entry at this index.
    Entry(u64),
    /// The snapshot with this term and index.
    Snapshot {
        /// The snapshot's raft term.
        term: u64,
        /// The snapshot's last included log index.
        index: u64,
    },
    /// A file in the certs dir (e.g. the CA key).
    File(&'static str),
}

impl Context {
    fn aad(self, header: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(header.len() + 32);
        v.extend_from_slice(header);
        match self {
            Context::Entry(i) => {
                v.extend_from_slice(b"entry");
                v.extend_from_slice(&i.to_be_bytes());
            }
            Context::Snapshot { term, index } => {
                v.extend_from_slice(b"snapshot");
                v.extend_from_slice(&term.to_be_bytes());
                v.extend_from_slice(&index.to_be_bytes());
            }
            Context::File(name) => {
                v.extend_from_slice(b"file:");
                v.extend_from_slice(name.as_bytes());
            }
        }
        v
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Context::Entry(i) => write!(f, "raft log entry {i}"),
            Context::Snapshot { term, index } => write!(f, "snapshot {term}-{index}"),
            Context::File(name) => write!(f, "file {name}"),
        }
    }
}

/// One 256-bit data key.
struct Dek {
    id: u32,
    bytes: [u8; KEY_LEN],
    key: LessSafeKey,
}

impl Dek {
    fn new(id: u32, bytes: [u8; KEY_LEN]) -> Dek {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("32-byte key"));
        Dek { id, bytes, key }
    }

    fn generate(id: u32) -> Result<Dek, CryptError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| CryptError::Random)?;
        Ok(Dek::new(id, bytes))
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The current key and the ones a rotation has not retired yet.
#[derive(Debug)]
pub struct Keyring {
    current: Dek,
    previous: Vec<Dek>,
}

impl Keyring {
    /// A new keyring with one random data key (id 1).
    pub fn generate() -> Result<Keyring, CryptError> {
        Ok(Keyring {
            current: Dek::generate(1)?,
            previous: Vec::new(),
        })
    }

    fn find(&self, id: u32) -> Option<&Dek> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|d| d.id == id)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    current: KeyEntry,
    previous: Vec<KeyEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u32,
    key: String,
}

/// Reads the keyring from `<certs>/raft-dek`, `None` when there is none yet; a wrapped
/// (autolocked) one is refused with [`CryptError::Locked`].
pub fn load_keyring(certs_dir: &Path) -> Result<Option<Keyring>, CryptError> {
    load_keyring_with(certs_dir, None)
}

/// [`load_keyring`] that opens a keyring wrapped with `kek` (autolock). A wrong key is
/// [`CryptError::WrongUnlockKey`]; a key given for an unwrapped keyring is not needed.
pub fn load_keyring_with(
    certs_dir: &Path,
    kek: Option<&UnlockKey>,
) -> Result<Option<Keyring>, CryptError> {
    let path = certs_dir.join(DEK_FILE);
    let io = |e| CryptError::Io(path.clone(), e);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_KEYRING_FILE + 1), &mut raw)
        .map_err(io)?;
    let bad = |m: String| CryptError::Format(path.clone(), m);
    if raw.len() as u64 > MAX_KEYRING_FILE {
        return Err(bad(format!("larger than {MAX_KEYRING_FILE} bytes")));
    }
    if raw.starts_with(WRAPPED_MAGIC) {
        let Some(kek) = kek else {
            return Err(CryptError::Locked(path));
        };
        raw = unwrap_body(&path, kek, raw)?;
    }
    let file: KeyFile = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    if file.version != KEYRING_VERSION {
        return Err(bad(format!("unknown version {}", file.version)));
    }
    let dek = |e: &KeyEntry| -> Result<Dek, CryptError> {
        let v = hex::decode(&e.key).map_err(|_| bad(format!("key {} is not hex", e.id)))?;
        let bytes: [u8; KEY_LEN] = v
            .try_into()
            .map_err(|_| bad(format!("key {} is not {KEY_LEN} bytes", e.id)))?;
        Ok(Dek::new(e.id, bytes))
    };
    Ok(Some(Keyring {
        current: dek(&file.current)?,
        previous: file.previous.iter().map(dek).collect::<Result<_, _>>()?,
    }))
}

/// Writes the keyring to `<certs>/raft-dek` (0600), atomically and durably.
pub fn store_keyring(certs_dir: &Path, ring: &Keyring) -> Result<(), CryptError> {
    store_keyring_with(certs_dir, ring, None)
}

/// [`store_keyring`], wrapped with `kek` when autolock is on.
pub fn store_keyring_with(
    certs_dir: &Path,
    ring: &Keyring,
    kek: Option<&UnlockKey>,
) -> Result<(), CryptError> {
    let entry = |d: &Dek| KeyEntry {
        id: d.id,
        key: hex::encode(d.bytes),
    };
    let file = KeyFile {
        version: KEYRING_VERSION,
        current: entry(&ring.current),
        previous: ring.previous.iter().map(entry).collect(),
    };
    let body = serde_json::to_vec(&file).expect("key file serializes");
    let body = match kek {
        Some(k) => wrap(k, &body)?,
        None => body,
    };
    write_private_atomic(&certs_dir.join(DEK_FILE), &body)
}

/// Writes `data` to `path` mode 0600: a temporary, fsync, rename, fsync of the directory.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> Result<(), CryptError> {
    let io = |e| CryptError::Io(path.to_owned(), e);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// A controller's keyring in use: seals new records with the current key, opens records of
/// any key it still holds. `dir` is where it is stored (`None`: in memory only, for tests).
pub struct DataKeys {
    dir: Option<PathBuf>,
    ring: RwLock<Keyring>,
    /// The unlock key the stored keyring is wrapped with (autolock on).
    kek: RwLock<Option<UnlockKey>>,
}

impl fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.ring.read().expect("keyring lock");
        f.debug_struct("DataKeys")
            .field("current", &r.current.id)
            .field(
                "previous",
                &r.previous.iter().map(|d| d.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DataKeys {
    /// The keyring stored in `certs_dir`, made (and stored) on first use.
    pub fn load_or_create(certs_dir: &Path) -> Result<DataKeys, CryptError> {
        Self::load_or_create_with(certs_dir, None)
    }

    /// [`DataKeys::load_or_create`] opening a keyring wrapped with `kek` (autolock).
    pub fn load_or_create_with(
        certs_dir: &Path,
        kek: Option<UnlockKey>,
    ) -> Result<DataKeys, CryptError> {
        let wrapped = keyring_is_wrapped(certs_dir)?;
        let ring = match load_keyring_with(certs_dir, kek.as_ref())? {
            Some(r) => r,
            None => {
                let r = Keyring::generate()?;
                store_keyring(certs_dir, &r)?;
                tracing::info!(key = r.current.id, "created this controller's data key");
                r
            }
        };
        Ok(DataKeys {
            dir: Some(certs_dir.to_owned()),
            ring: RwLock::new(ring),
            kek: RwLock::new(if wrapped { kek } else { None }),
        })
    }

    /// The keyring stored in `certs_dir`, `None` when there is none.
    pub fn load(certs_dir: &Path) -> Result<Option<DataKeys>, CryptError> {
        Ok(load_keyring(certs_dir)?.map(|ring| DataKeys {
            dir: Some(certs_dir.to_owned()),
            ring: RwLock::new(ring),
            kek: RwLock::new(None),
        }))
    }

    /// A fresh keyring kept only in memory.
    pub fn ephemeral() -> Result<DataKeys, CryptError> {
        Ok(DataKeys {
            dir: None,
            ring: RwLock::new(Keyring::generate()?),
            kek: RwLock::new(None),
        })
    }

    /// Whether the stored keyring is wrapped with an unlock key (autolock on).
    pub fn is_wrapped(&self) -> bool {
        self.kek.read().expect("kek lock").is_some()
    }

    /// Rewrites the stored keyring wrapped with `kek` (`None`: unwrapped, autolock off);
    /// whether it changed anything. The old unlock key stops opening it.
    pub fn set_unlock_key(&self, kek: Option<UnlockKey>) -> Result<bool, CryptError> {
        let r = self.ring.write().expect("keyring lock");
        let mut cur = self.kek.write().expect("kek lock");
        if *cur == kek {
            return Ok(false);
        }
        if let Some(dir) = &self.dir {
            store_keyring_with(dir, &r, kek.as_ref())?;
        }
        *cur = kek;
        Ok(true)
    }

    /// The id of the key new records are written with.
    pub fn current_id(&self) -> u32 {
        self.ring.read().expect("keyring lock").current.id
    }

    /// The ids of keys that are kept only to read records not yet re-encrypted.
    pub fn previous_ids(&self) -> Vec<u32> {
        let r = self.ring.read().expect("keyring lock");
        r.previous.iter().map(|d| d.id).collect()
    }

    /// Encrypts `plain` for `ctx` with the current key.
    pub fn seal(&self, ctx: Context, plain: &[u8]) -> Result<Vec<u8>, CryptError> {
        let r = self.ring.read().expect("keyring lock");
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&r.current.id.to_be_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        // The thread's CSPRNG (ChaCha, seeded and reseeded from the OS): a system call per
        // record would cost the log a tenth of its write rate.
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        out.extend_from_slice(&nonce);
        let aad = ctx.aad(&out);
        out.extend_from_slice(plain);
        let tag = r
            .current
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[HEADER_LEN..],
            )
            .map_err(|_| CryptError::Decrypt {
                what: ctx.to_string(),
            })?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Decrypts a record read from `ctx`; a record without [`MAGIC`] is legacy plaintext and
    /// comes back as it is.
    pub fn open(&self, ctx: Context, rec: &[u8]) -> Result<Vec<u8>, CryptError> {
        self.open_owned(ctx, rec.to_vec())
    }

    /// [`DataKeys::open`] decrypting in the record's own buffer (a snapshot is not copied).
    pub fn open_owned(&self, ctx: Context, mut rec: Vec<u8>) -> Result<Vec<u8>, CryptError> {
        let Some(key_id) = record_key_id(&rec) else {
            return Ok(rec);
        };
        if rec.len() < HEADER_LEN + TAG_LEN {
            return Err(CryptError::Truncated {
                what: ctx.to_string(),
                len: rec.len(),
            });
        }
        let r = self.ring.read().expect("keyring lock");
        let dek = r.find(key_id).ok_or_else(|| CryptError::UnknownKey {
            what: ctx.to_string(),
            key_id,
        })?;
        let nonce: [u8; NONCE_LEN] = rec[MAGIC.len() + 4..HEADER_LEN]
            .try_into()
            .expect("nonce length");
        let aad = ctx.aad(&rec[..HEADER_LEN]);
        let len = dek
            .key
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut rec,
                HEADER_LEN..,
            )
            .map_err(|_| CryptError::Decrypt {
                what: ctx.to_string(),
            })?
            .len();
        rec.truncate(len);
        Ok(rec)
    }

    /// Whether `rec` must be rewritten to be under the current key (plaintext or an old key).
    pub fn is_stale(&self, rec: &[u8]) -> bool {
        record_key_id(rec) != Some(self.current_id())
    }

    /// Makes a new current key; the old one is kept (and stored) until [`DataKeys::retire`].
    /// Refused while an earlier rotation's key is not retired yet.
    pub fn rotate(&self) -> Result<u32, CryptError> {
        let mut r = self.ring.write().expect("keyring lock");
        if let Some(old) = r.previous.first() {
            return Err(CryptError::RotationInProgress(old.id));
        }
        let id = r
            .current
            .id
            .checked_add(1)
            .ok_or_else(|| CryptError::Format(self.path(), "key ids exhausted".into()))?;
        let new = Dek::generate(id)?;
        let old = std::mem::replace(&mut r.current, new);
        r.previous.push(old);
        // Stored before any record uses the new key.
        if let Err(e) = self.persist(&r) {
            let old = r.previous.pop().expect("just pushed");
            r.current = old;
            return Err(e);
        }
        tracing::info!(
            key = id,
            "rotated the data key; re-encrypting in the background"
        );
        Ok(id)
    }

    /// Forgets every key but the current one (after everything was re-encrypted with it).
    pub fn retire(&self) -> Result<Vec<u32>, CryptError> {
        let mut r = self.ring.write().expect("keyring lock");
        let gone: Vec<Dek> = std::mem::take(&mut r.previous);
        if let Err(e) = self.persist(&r) {
            r.previous = gone;
            return Err(e);
        }
        Ok(gone.iter().map(|d| d.id).collect())
    }

    fn persist(&self, r: &Keyring) -> Result<(), CryptError> {
        match &self.dir {
            Some(dir) => store_keyring_with(dir, r, self.kek.read().expect("kek lock").as_ref()),
            None => Ok(()),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir
            .as_deref()
            .map(|d| d.join(DEK_FILE))
            .unwrap_or_default()
    }
}

/// The key id of an encrypted record, `None` for plaintext.
pub fn record_key_id(rec: &[u8]) -> Option<u32> {
    if rec.len() >= MAGIC.len() + 4 && rec.starts_with(MAGIC) {
        Some(u32::from_be_bytes(
            rec[MAGIC.len()..MAGIC.len() + 4]
                .try_into()
                .expect("4 bytes"),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = DataKeys::ephemeral().unwrap();
        let rec = k.seal(Context::Entry(7), b"hello secret").unwrap();
        assert!(rec.starts_with(MAGIC));
        assert!(!rec.windows(6).any(|w| w == b"secret"));
        assert_eq!(k.open(Context::Entry(7), &rec).unwrap(), b"hello secret");
        // Two seals of the same plaintext differ (random nonce).
        assert_ne!(rec, k.seal(Context::Entry(7), b"hello secret").unwrap());
        for i in [5, HEADER_LEN, rec.len() - 1] {
            let mut bad = rec.clone();
            bad[i] ^= 1;
            let err = k.open(Context::Entry(7), &bad).unwrap_err();
            assert!(err.to_string().contains("raft log entry 7"), "{err}");
        }
        let err = k
            .open(Context::Entry(7), &rec[..HEADER_LEN + 3])
            .unwrap_err();
        assert!(matches!(err, CryptError::Truncated { .. }), "{err}");
    }

    #[test]
    fn a_record_moved_elsewhere_does_not_decrypt() {
        let k = DataKeys::ephemeral().unwrap();
        let rec = k.seal(Context::Entry(7), b"x").unwrap();
        let err = k.open(Context::Entry(8), &rec).unwrap_err();
        assert!(err.to_string().contains("raft log entry 8"), "{err}");
        let snap = k
            .seal(Context::Snapshot { term: 1, index: 8 }, b"s")
            .unwrap();
        assert!(k
            .open(Context::Snapshot { term: 2, index: 8 }, &snap)
            .is_err());
        assert!(k.open(Context::Entry(8), &snap).is_err());
        // Another controller's key.
        let other = DataKeys::ephemeral().unwrap();
        assert!(other.open(Context::Entry(7), &rec).is_err());
    }

    #[test]
    fn legacy_plaintext_reads_as_is() {
        let k = DataKeys::ephemeral().unwrap();
        assert_eq!(
            k.open(Context::Entry(1), b"\x08\x01plain").unwrap(),
            b"\x08\x01plain"
        );
        assert!(k.is_stale(b"\x08\x01plain"));
    }

    #[test]
    fn rotation_keeps_old_records_readable_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let k = DataKeys::load_or_create(dir.path()).unwrap();
        let old = k.seal(Context::Entry(1), b"old").unwrap();
        let id = k.rotate().unwrap();
        assert_eq!(id, 2);
        assert!(matches!(k.rotate(), Err(CryptError::RotationInProgress(1))));
        let new = k.seal(Context::Entry(2), b"new").unwrap();
        assert_eq!(record_key_id(&new), Some(2));
        assert!(k.is_stale(&old) && !k.is_stale(&new));
        // A restart mid-rotation still has both keys.
        let again = DataKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again.open(Context::Entry(1), &old).unwrap(), b"old");
        assert_eq!(k.retire().unwrap(), vec![1]);
        let again = DataKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again.previous_ids(), Vec::<u32>::new());
        let err = again.open(Context::Entry(1), &old).unwrap_err();
        assert!(
            matches!(err, CryptError::UnknownKey { key_id: 1, .. }),
            "{err}"
        );
        assert_eq!(again.open(Context::Entry(2), &new).unwrap(), b"new");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(DEK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Debug never prints key bytes.
        let hexkey = serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(dir.path().join(DEK_FILE)).unwrap(),
        )
        .unwrap()["current"]["key"]
            .as_str()
            .unwrap()
            .to_string();
        let dbg = format!("{again:?} {:?}", again.ring.read().unwrap());
        assert!(!dbg.contains(&hexkey[..16]), "{dbg}");
    }

    #[test]
    fn the_sealed_ca_key_opens_offline_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::ClusterCa::generate("t", std::time::SystemTime::now()).unwrap();
        std::fs::write(dir.path().join(crate::ca::CA_CERT_FILE), ca.cert_pem()).unwrap();
        assert!(
            load_sealed_ca(dir.path()).unwrap().is_none(),
            "no keyring yet"
        );
        let keys = DataKeys::load_or_create(dir.path()).unwrap();
        seal_ca_key(dir.path(), &keys, ca.key_pem()).unwrap();
        let raw = std::fs::read(dir.path().join(SEALED_CA_KEY_FILE)).unwrap();
        assert!(!raw.windows(11).any(|w| w == b"PRIVATE KEY"));
        let got = load_sealed_ca(dir.path()).unwrap().unwrap();
        assert_eq!(got.fingerprint(), ca.fingerprint());
        keys.rotate().unwrap();
        assert!(reseal_ca_key(dir.path(), &keys).unwrap());
        assert!(!reseal_ca_key(dir.path(), &keys).unwrap());
        keys.retire().unwrap();
        let got = load_sealed_ca(dir.path()).unwrap().unwrap();
        assert_eq!(got.key_pem(), ca.key_pem());
    }

    #[test]
    fn autolock_wraps_the_keyring_and_only_the_unlock_key_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let k = DataKeys::load_or_create(dir.path()).unwrap();
        let rec = k.seal(Context::Entry(3), b"locked away").unwrap();
        let plain_file = std::fs::read(dir.path().join(DEK_FILE)).unwrap();
        let hexkey = serde_json::from_slice::<serde_json::Value>(&plain_file).unwrap()["current"]
            ["key"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!keyring_is_wrapped(dir.path()).unwrap());
        let kek = UnlockKey::generate().unwrap();
        assert!(k.set_unlock_key(Some(kek.clone())).unwrap());
        assert!(!k.set_unlock_key(Some(kek.clone())).unwrap(), "no change");
        // The wrapped file is recognised and holds no raw key.
        let raw = std::fs::read(dir.path().join(DEK_FILE)).unwrap();
        assert!(raw.starts_with(WRAPPED_MAGIC));
        assert!(keyring_is_wrapped(dir.path()).unwrap());
        assert!(!raw.windows(16).any(|w| w == &hexkey.as_bytes()[..16]));
        let raw_key = hex::decode(&hexkey).unwrap();
        assert!(!raw.windows(16).any(|w| w == &raw_key[..16]));
        // Without a key: locked; a wrong key: refused; the right one: opens.
        let err = DataKeys::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CryptError::Locked(_)), "{err}");
        assert!(err.to_string().contains("raft-dek"), "{err}");
        let wrong = UnlockKey::generate().unwrap();
        let err = DataKeys::load_or_create_with(dir.path(), Some(wrong)).unwrap_err();
        assert!(matches!(err, CryptError::WrongUnlockKey(_)), "{err}");
        let again = DataKeys::load_or_create_with(dir.path(), Some(kek.clone())).unwrap();
        assert!(again.is_wrapped());
        assert_eq!(again.open(Context::Entry(3), &rec).unwrap(), b"locked away");
        // A data key rotation keeps the file wrapped.
        again.rotate().unwrap();
        assert!(keyring_is_wrapped(dir.path()).unwrap());
        again.retire().unwrap();
        // Rotation of the unlock key: the old one stops working.
        let kek2 = UnlockKey::generate().unwrap();
        again.set_unlock_key(Some(kek2.clone())).unwrap();
        let err = DataKeys::load_or_create_with(dir.path(), Some(kek)).unwrap_err();
        assert!(matches!(err, CryptError::WrongUnlockKey(_)), "{err}");
        let third = DataKeys::load_or_create_with(dir.path(), Some(kek2)).unwrap();
        assert_eq!(third.current_id(), 2);
        // Off: unwrapped again, readable without a key.
        third.set_unlock_key(None).unwrap();
        assert!(!keyring_is_wrapped(dir.path()).unwrap());
        assert_eq!(
            DataKeys::load_or_create(dir.path()).unwrap().current_id(),
            2
        );
    }

    #[test]
    fn unlock_keys_print_and_parse() {
        let k = UnlockKey::generate().unwrap();
        let s = k.encode();
        assert!(s.starts_with("RDRKEK-") && s.len() == 7 + 64, "{s}");
        assert_eq!(UnlockKey::parse(&format!(" {s}\n")).unwrap(), k);
        assert!(!format!("{k:?}").contains(&s[7..20]));
        for bad in ["", "RDRKEK-zz", "abc", "RDRKEK-00"] {
            assert!(
                matches!(UnlockKey::parse(bad), Err(CryptError::BadUnlockKey(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_bad_key_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DEK_FILE), b"{}").unwrap();
        let err = DataKeys::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("raft-dek"), "{err}");
    }
}
