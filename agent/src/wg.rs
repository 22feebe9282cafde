//! WireGuard for the overlay: this host's key, its one WireGuard interface, and that
//! interface's peers.
//!
//! The interface is kernel WireGuard when the kernel has it, otherwise Rudder's userspace
//! device ([`device`]: boringtun's `noise::Tunn` with our own offloaded data path) run by a
//! child process, `rudder-agent wg-userspace --iface NAME`, that serves the
//! standard configuration socket `/var/run/wireguard/NAME.sock`. Invariants:
//!
//! - The private key never leaves the host: it lives in a 0600 file and is handed only to the
//!   local device.
//! - The tunnel outlives the agent, like containers do: the child runs in its own session and
//!   a restarted agent adopts the running device through its socket instead of replacing it.
//! - Userspace mode keeps the TUN interface persistent (made like `ip tuntap add … multi_queue`, by an ioctl) and lets
//!   the child attach to it, so a child that dies and is restarted by the supervisor leaves the
//!   interface, its addresses and its routes in place; the supervisor re-applies key, port and
//!   peers to the new child.
//! - A peer is never modified in place (boringtun's device, used before, panicked on it), so a peer
//!   whose endpoint or allowed IPs changed is removed and added again. Peers that did not change
//!   are not touched, so their sessions survive.
//! - No socket or netlink call can hang the agent: each has a timeout and none blocks an async
//!   worker thread.
//! - Nothing here starts `wireguard-go`: the userspace socket is spoken to directly (the text
//!   protocol is small), never through wireguard-control's userspace backend, which starts
//!   `wireguard-go` when the socket is missing and prints to stdout on keys it does not know.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{debug, info, instrument, warn};
use wireguard_control::{DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::hostnet::netlink::NetlinkHostNet;
use crate::hostnet::{HostNet, HostNetError, LinkSet, NetOp, Ns};

pub mod batch;
pub mod choice;
pub mod coalesce;
pub mod device;
pub mod mtu;
pub mod qdisc;
pub mod segment;
pub mod uapi;

/// How often the paths to the peers are checked against what the overlay needs.
const PATH_CHECK_EVERY: Duration = Duration::from_secs(10);
/// Where userspace WireGuard sockets live (the fixed path `wg` reads).
const RUN_DIR: &str = "/var/run/wireguard";
/// Bound on every single socket, netlink or `ip` call.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on a new userspace child coming up and answering on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopped child gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Liveness check period of the userspace child.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);
/// Every this many checks the child's socket is asked too; a few failed answers in a row mean
/// a hung child, which is replaced.
const PROBE_EVERY_TICKS: u32 = 5;
const PROBE_FAILURES_TO_RESTART: u32 = 3;
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
/// The child's log is rotated (one old copy) when it is larger than this at a start.
const MAX_CHILD_LOG: u64 = 1 << 20;

/// Why WireGuard could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The key file could not be read or written.
    #[error("wireguard: key file {path}: {source}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file does not hold a WireGuard private key.
    #[error("wireguard: key file {0}: not a base64 WireGuard private key")]
    BadKeyFile(PathBuf),
    /// A peer's public key is not a WireGuard key.
    #[error("wireguard: peer public key {0:?}: not a base64 WireGuard key")]
    BadPeerKey(String),
    /// A peer the device refuses.
    #[error("wireguard: peer {key}: {reason}")]
    BadPeer {
        /// The peer's public key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The interface name is invalid.
    #[error(
        "wireguard: interface name {0:?} is invalid (1 to 15 of a-z A-Z 0-9 . _ -, not starting with -)"
    )]
    BadName(String),
    /// An interface of that name exists and is something else.
    #[error("wireguard: interface {iface} exists and is not a WireGuard or TUN device: {detail}")]
    Foreign {
        /// The interface.
        iface: String,
        /// What it is.
        detail: String,
    },
    /// An operation did not finish in time.
    #[error("wireguard: {iface}: {op} timed out after {}s", .after.as_secs())]
    Timeout {
        /// The interface.
        iface: String,
        /// The operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The userspace device's socket failed.
    #[error("wireguard: {iface}: {op} through {}: {source}", socket_path(.iface).display())]
    Uapi {
        /// The interface.
        iface: String,
        /// The operation.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The device refused an operation.
    #[error("wireguard: {iface}: {op}: the device refused it (errno {errno})")]
    Refused {
        /// The interface.
        iface: String,
        /// The operation.
        op: &'static str,
        /// The device's errno.
        errno: i32,
    },
    /// The kernel refused an operation.
    #[error("wireguard: {iface}: kernel {op}: {source}")]
    Netlink {
        /// The interface.
        iface: String,
        /// The operation.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The interface's link could not be set up.
    #[error("wireguard: {0}")]
    Link(#[from] HostNetError),
    /// The userspace device could not start.
    #[error("wireguard: {iface}: starting the userspace device: {msg}")]
    Start {
        /// The interface.
        iface: String,
        /// Why.
        msg: String,
    },
    /// The interface was shut down.
    #[error("wireguard: {0}: the interface was shut down")]
    Closed(String),
}

/// This host's WireGuard key pair. `Debug` shows only the public key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// The private key: never leaves the host.
    pub private: Key,
    /// The public key peers configure.
    pub public: Key,
}

impl KeyPair {
    /// A new random key pair.
    pub fn generate() -> KeyPair {
        KeyPair::from_private(Key::generate_private())
    }

    /// The pair of an existing private key.
    pub fn from_private(private: Key) -> KeyPair {
        let public = private.get_public();
        KeyPair { private, public }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.to_base64())
            .finish_non_exhaustive()
    }
}

/// The key in `path` (base64 private key, as `wg genkey` writes it), or a new one written there
/// with mode 0600 if the file does not exist. A readable-by-others file is tightened to 0600.
pub fn load_or_create_key(path: &Path) -> Result<KeyPair, WgError> {
    let key_err = |source| WgError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = Key::from_base64(text.trim())
                .map_err(|_| WgError::BadKeyFile(path.to_path_buf()))?;
            let mode = std::fs::metadata(path)
                .map_err(key_err)?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777),
                      "wireguard key file was readable by others; setting it to 0600");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(key_err)?;
            }
            Ok(KeyPair::from_private(key))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => generate_key(path),
        Err(e) => Err(key_err(e)),
    }
}

/// A new key pair, atomically replacing whatever `path` held (key rotation). Mode 0600.
pub fn generate_key(path: &Path) -> Result<KeyPair, WgError> {
    let pair = KeyPair::generate();
    write_key(path, &pair.private).map_err(|source| WgError::KeyFile {
        path: path.to_path_buf(),
        source,
    })?;
    info!(path = %path.display(), public = %pair.public.to_base64(), "new wireguard key");
    Ok(pair)
}

fn write_key(path: &Path, key: &Key) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{}\n", key.to_base64()).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// One peer as the caller wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Base64, as `wg pubkey` prints it.
    pub public_key: String,
    /// Its underlay address and WireGuard port.
    pub endpoint: SocketAddr,
    /// Networks routed to this peer; host bits are ignored (10.1.2.3/24 is 10.1.2.0/24).
    pub allowed_ips: Vec<(Ipv4Addr, u8)>,
}

/// Which WireGuard implementation drives the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's WireGuard (`ip link … type wireguard`), configured over netlink.
    Kernel,
    /// Rudder's userspace device in the `wg-userspace` child, configured over its socket.
    Userspace,
}

/// Handle on this host's WireGuard interface. Clones share it, and so does a second `ensure`
/// for the same interface in this process. Dropping every handle stops the supervision but
/// leaves the device running (a restarted agent adopts it); `shutdown` removes it.
#[derive(Clone)]
pub struct Wg {
    inner: Arc<Inner>,
}

struct Inner {
    iface: String,
    name: InterfaceName,
    backend: Backend,
    agent_exe: PathBuf,
    state: tokio::sync::Mutex<State>,
    supervisor: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The task that checks the paths to the peers ([`watch_paths`]).
    path_watch: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The interfaces with a live handle in this process. A second `ensure` for one of them joins
/// the first handle rather than starting a second supervisor that would fight the first over
/// the child.
static LIVE: std::sync::Mutex<BTreeMap<String, Weak<Inner>>> =
    std::sync::Mutex::new(BTreeMap::new());
/// Serializes `ensure` in this process, so two callers cannot both miss `LIVE`.
static ENSURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn live(iface: &str) -> Option<Arc<Inner>> {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(iface)
        .and_then(Weak::upgrade)
}

/// What the device should hold, so a restarted userspace child can be given it again.
struct State {
    key: KeyPair,
    listen_port: u16,
    /// The interface's MTU (derived from the underlay's, see [`mtu`]).
    mtu: u32,
    peers: Vec<Wanted>,
    /// Endpoint each peer was last configured with by us. The device reports the endpoint it
    /// currently uses, which WireGuard updates when the peer roams; comparing against what we
    /// set too keeps a roamed peer from being removed and re-added on every `set_peers`.
    applied: HashMap<Key, SocketAddr>,
    child: Child,
    closed: bool,
}

impl Wg {
    /// Brings the interface up, idempotently: adopts an existing interface (and, in userspace
    /// mode, its running child) after an agent restart. Kernel WireGuard when the module
    /// exists; otherwise starts `<agent_exe> wg-userspace --iface NAME`, waits (bounded) for its
    /// socket and supervises it. Sets the private key, listen port, MTU (`mtu`, see
    /// [`mtu::overlay_mtu`]) and link up. `RUDDER_WG_BACKEND` (`auto`, `kernel`, `userspace`)
    /// overrides the choice of implementation ([`choice::choose`]).
    #[instrument(skip(key, agent_exe), fields(public = %key.public.to_base64()))]
    pub async fn ensure(
        iface: &str,
        listen_port: u16,
        key: &KeyPair,
        mtu: u32,
        agent_exe: &Path,
    ) -> Result<Wg, WgError> {
        let name = parse_iface(iface)?;
        let _one_at_a_time = ENSURING.lock().await;
        if let Some(inner) = live(iface) {
            let mut st = inner.state.lock().await;
            if !st.closed {
                if st.key != *key {
                    inner.set_device(Some(&key.private), None).await?;
                    st.key = key.clone();
                }
                if st.listen_port != listen_port {
                    inner.set_device(None, Some(listen_port)).await?;
                    st.listen_port = listen_port;
                }
                link_up(iface, mtu, Some(TXQUEUELEN)).await?;
                st.mtu = mtu;
                drop(st);
                debug!("joining the live handle of this process");
                return Ok(Wg { inner });
            }
        }
        let pref = choice::Preference::parse(std::env::var("RUDDER_WG_BACKEND").ok().as_deref())
            .map_err(|msg| WgError::Start {
                iface: iface.to_string(),
                msg,
            })?;
        let module = choice::module_state(Path::new("/sys/module"));
        let existing = match link_kind(iface).await? {
            LinkKind::Missing => choice::Existing::Missing,
            LinkKind::WireGuard => choice::Existing::WireGuard,
            LinkKind::Tun => choice::Existing::Tun,
            LinkKind::Other(detail) => choice::Existing::Other(detail),
        };
        let backend = match choice::choose(&existing, module, pref) {
            choice::Choice::Adopt(b) => b,
            choice::Choice::Userspace => Backend::Userspace,
            choice::Choice::Refuse(detail) => {
                return Err(WgError::Foreign {
                    iface: iface.to_string(),
                    detail,
                })
            }
            choice::Choice::TryKernel => {
                let add = NetOp::AddWireguard {
                    name: iface.to_string(),
                };
                let added = match host()?.apply(&Ns::Host, &[add]).await {
                    Ok(()) => true,
                    Err(e) => {
                        debug!(%e, ?module, "no kernel wireguard");
                        false
                    }
                };
                choice::after_kernel_add(added, module, pref).map_err(|msg| WgError::Start {
                    iface: iface.to_string(),
                    msg,
                })?
            }
        };
        let child = match backend {
            Backend::Kernel => Child::None,
            Backend::Userspace => match uapi_get(iface).await {
                Ok(_) => {
                    let child = Child::adopt(iface);
                    info!(pid = ?child.pid(), "adopting the running userspace wireguard");
                    child
                }
                Err(e) => {
                    debug!(%e, "no userspace wireguard answering; starting one");
                    start_child(iface, agent_exe, mtu).await?
                }
            },
        };
        let inner = Arc::new(Inner {
            iface: iface.to_string(),
            name,
            backend,
            agent_exe: agent_exe.to_path_buf(),
            state: tokio::sync::Mutex::new(State {
                key: key.clone(),
                listen_port,
                mtu,
                peers: Vec::new(),
                applied: HashMap::new(),
                child,
                closed: false,
            }),
            supervisor: std::sync::Mutex::new(None),
            path_watch: std::sync::Mutex::new(None),
        });
        {
            let mut st = inner.state.lock().await;
            let current = inner.get().await?;
            let set_key = current.public_key.as_ref() != Some(&key.public);
            let set_port = current.listen_port != Some(listen_port);
            if set_key || set_port {
                inner
                    .set_device(
                        set_key.then_some(&key.private),
                        set_port.then_some(listen_port),
                    )
                    .await?;
            }
            link_up(iface, mtu, Some(TXQUEUELEN)).await?;
            // Until the caller says otherwise, the peers the device already has are the ones
            // to restore if the child has to be restarted.
            st.peers = current
                .peers
                .iter()
                .filter_map(Wanted::from_state)
                .collect();
            st.applied = st
                .peers
                .iter()
                .map(|p| (p.key.clone(), p.endpoint))
                .collect();
        }
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iface.to_string(), Arc::downgrade(&inner));
        if backend == Backend::Userspace {
            let task = tokio::spawn(supervise(Arc::downgrade(&inner)));
            *inner.supervisor.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        let task = tokio::spawn(watch_paths(Arc::downgrade(&inner)));
        *inner.path_watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        info!(?backend, listen_port, "wireguard interface ready");
        Ok(Wg { inner })
    }

    /// Which implementation drives the interface.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The interface's name.
    pub fn iface(&self) -> &str {
        &self.inner.iface
    }

    /// Makes the peer set exactly `peers`: removes peers not wanted, removes and re-adds a peer
    /// whose endpoint or allowed IPs changed, adds new ones, leaves unchanged ones alone.
    #[instrument(skip_all, fields(iface = %self.inner.iface, peers = peers.len()))]
    pub async fn set_peers(&self, peers: &[WgPeer]) -> Result<(), WgError> {
        let wanted = parse_peers(peers)?;
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        if st.closed {
            return Err(WgError::Closed(inner.iface.clone()));
        }
        st.peers = wanted.clone();
        let current = inner.get().await?;
        let plan = plan_peers(&current.peers, &wanted, &st.applied);
        if !plan.remove.is_empty() {
            inner.remove_peers(&plan.remove).await?;
        }
        for key in &plan.remove {
            st.applied.remove(key);
        }
        if !plan.add.is_empty() {
            inner.add_peers(&plan.add).await?;
        }
        for p in &plan.add {
            st.applied.insert(p.key.clone(), p.endpoint);
        }
        let keep: HashSet<&Key> = wanted.iter().map(|w| &w.key).collect();
        st.applied.retain(|k, _| keep.contains(k));
        if !plan.remove.is_empty() || !plan.add.is_empty() {
            info!(
                removed = plan.remove.len(),
                added = plan.add.len(),
                total = wanted.len(),
                "wireguard peers updated"
            );
        }
        Ok(())
    }

    /// Replaces the interface's private key (key rotation). Peers keep their configuration;
    /// they need the new public key before they can talk to this host again.
    #[instrument(skip_all, fields(iface = %self.inner.iface, public = %key.public.to_base64()))]
    pub async fn set_key(&self, key: &KeyPair) -> Result<(), WgError> {
        let mut st = self.inner.state.lock().await;
        if st.closed {
            return Err(WgError::Closed(self.inner.iface.clone()));
        }
        self.inner.set_device(Some(&key.private), None).await?;
        st.key = key.clone();
        Ok(())
    }

    /// Sets the interface's MTU (when the underlay's changed); nothing when it is the same.
    #[instrument(skip_all, fields(iface = %self.inner.iface, mtu))]
    pub async fn set_mtu(&self, mtu: u32) -> Result<(), WgError> {
        let mut st = self.inner.state.lock().await;
        if st.closed {
            return Err(WgError::Closed(self.inner.iface.clone()));
        }
        if st.mtu != mtu {
            link_up(&self.inner.iface, mtu, None).await?;
            info!(from = st.mtu, to = mtu, "wireguard interface MTU changed");
            st.mtu = mtu;
        }
        Ok(())
    }

    /// Removes the interface: stops the userspace child (SIGTERM, then SIGKILL) and deletes
    /// the link. Other clones of this handle fail from then on.
    #[instrument(skip_all, fields(iface = %self.inner.iface))]
    pub async fn shutdown(self) {
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        if st.closed {
            return;
        }
        st.closed = true;
        {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            if live
                .get(&inner.iface)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&self.inner)))
            {
                live.remove(&inner.iface);
            }
        }
        for slot in [&inner.supervisor, &inner.path_watch] {
            if let Some(task) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                task.abort();
            }
        }
        if inner.backend == Backend::Userspace {
            st.child.stop(&inner.iface, STOP_GRACE).await;
            for path in [
                socket_path(&inner.iface),
                pid_path(&inner.iface),
                log_path(&inner.iface),
            ] {
                let _ = std::fs::remove_file(path);
            }
        }
        let del = NetOp::DelLink {
            name: inner.iface.clone(),
        };
        let deleted = match host() {
            Ok(h) => h.apply(&Ns::Host, &[del]).await.map_err(WgError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            warn!(%e, "deleting the wireguard link");
        }
        info!("wireguard interface removed");
    }
}

impl Inner {
    async fn get(&self) -> Result<DeviceState, WgError> {
        match self.backend {
            Backend::Userspace => uapi_get(&self.iface).await,
            Backend::Kernel => {
                let name = self.name;
                let dev = self
                    .blocking("get", move || {
                        wireguard_control::Device::get(&name, wireguard_control::Backend::Kernel)
                    })
                    .await?;
                Ok(DeviceState {
                    public_key: dev.public_key,
                    listen_port: dev.listen_port,
                    peers: dev
                        .peers
                        .into_iter()
                        .map(|p| PeerState {
                            public_key: p.config.public_key,
                            endpoint: p.config.endpoint,
                            allowed_ips: p
                                .config
                                .allowed_ips
                                .iter()
                                .map(|a| (a.address, a.cidr))
                                .collect(),
                        })
                        .collect(),
                })
            }
        }
    }

    async fn set_device(&self, private: Option<&Key>, port: Option<u16>) -> Result<(), WgError> {
        match self.backend {
            Backend::Userspace => {
                let mut req = String::from("set=1\n");
                if let Some(k) = private {
                    let _ = writeln!(req, "private_key={}", hex::encode(k.as_bytes()));
                }
                if let Some(p) = port {
                    let _ = writeln!(req, "listen_port={p}");
                }
                uapi_set(&self.iface, req, "set key and port").await
            }
            Backend::Kernel => {
                let mut update = DeviceUpdate::new();
                if let Some(k) = private {
                    update = update.set_private_key(k.clone());
                }
                if let Some(p) = port {
                    update = update.set_listen_port(p);
                }
                let name = self.name;
                self.blocking("set key and port", move || {
                    update.apply(&name, wireguard_control::Backend::Kernel)
                })
                .await
            }
        }
    }

    async fn remove_peers(&self, keys: &[Key]) -> Result<(), WgError> {
        match self.backend {
            Backend::Userspace => {
                let mut req = String::from("set=1\n");
                for k in keys {
                    let _ = writeln!(req, "public_key={}\nremove=true", hex::encode(k.as_bytes()));
                }
                uapi_set(&self.iface, req, "remove peers").await
            }
            Backend::Kernel => {
                let update = keys
                    .iter()
                    .fold(DeviceUpdate::new(), |u, k| u.remove_peer_by_key(k));
                let name = self.name;
                self.blocking("remove peers", move || {
                    update.apply(&name, wireguard_control::Backend::Kernel)
                })
                .await
            }
        }
    }

    /// Adds peers that the device does not have. Never sent in the same request as removals:
    /// boringtun carries a peer section's `remove` flag over into the sections after it.
    async fn add_peers(&self, peers: &[Wanted]) -> Result<(), WgError> {
        match self.backend {
            Backend::Userspace => {
                let mut req = String::from("set=1\n");
                for p in peers {
                    let _ = writeln!(req, "public_key={}", hex::encode(p.key.as_bytes()));
                    let _ = writeln!(req, "endpoint={}", p.endpoint);
                    for (ip, len) in &p.allowed_ips {
                        let _ = writeln!(req, "allowed_ip={ip}/{len}");
                    }
                }
                uapi_set(&self.iface, req, "add peers").await
            }
            Backend::Kernel => {
                let builders: Vec<PeerConfigBuilder> = peers
                    .iter()
                    .map(|p| {
                        p.allowed_ips.iter().fold(
                            PeerConfigBuilder::new(&p.key)
                                .set_endpoint(p.endpoint)
                                .replace_allowed_ips(),
                            |b, (ip, len)| b.add_allowed_ip(IpAddr::V4(*ip), *len),
                        )
                    })
                    .collect();
                let update = DeviceUpdate::new().add_peers(&builders);
                let name = self.name;
                self.blocking("add peers", move || {
                    update.apply(&name, wireguard_control::Backend::Kernel)
                })
                .await
            }
        }
    }

    /// A blocking wireguard-control call on the blocking pool, bounded by `OP_TIMEOUT`.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, WgError> {
        let iface = self.iface.clone();
        match tokio::time::timeout(OP_TIMEOUT, tokio::task::spawn_blocking(f)).await {
            Err(_) => Err(WgError::Timeout {
                iface,
                op,
                after: OP_TIMEOUT,
            }),
            Ok(Err(join)) => Err(WgError::Netlink {
                iface,
                op,
                source: io::Error::other(join.to_string()),
            }),
            Ok(Ok(r)) => r.map_err(|source| WgError::Netlink { iface, op, source }),
        }
    }

    /// Replaces a dead or hung userspace child and gives the new one the whole configuration.
    async fn restart(&self, st: &mut State) -> Result<(), WgError> {
        st.child.stop(&self.iface, Duration::from_millis(500)).await;
        st.child = start_child(&self.iface, &self.agent_exe, st.mtu).await?;
        let applied = async {
            self.set_device(Some(&st.key.private), Some(st.listen_port))
                .await?;
            // The link may have been deleted and recreated by `start_child`.
            link_up(&self.iface, st.mtu, None).await?;
            if !st.peers.is_empty() {
                self.add_peers(&st.peers).await?;
            }
            Ok::<_, WgError>(())
        }
        .await;
        if let Err(e) = applied {
            // A child without its configuration must not pass as healthy: the next check
            // starts over.
            st.child.stop(&self.iface, Duration::from_millis(500)).await;
            return Err(e);
        }
        st.applied = st
            .peers
            .iter()
            .map(|p| (p.key.clone(), p.endpoint))
            .collect();
        Ok(())
    }
}

/// Checks every [`PATH_CHECK_EVERY`] that the underlay paths to the peers still carry a full
/// overlay packet (interface MTU + [`mtu::WIREGUARD_OVERHEAD`]) and says so once per peer when
/// one does not ([`mtu::check_paths`]). Ends with the last handle or at shutdown.
async fn watch_paths(inner: Weak<Inner>) {
    let mut reported = HashMap::new();
    loop {
        tokio::time::sleep(PATH_CHECK_EVERY).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let (needed, peers) = {
            let st = inner.state.lock().await;
            if st.closed {
                return;
            }
            let peers: Vec<SocketAddr> = st.applied.values().copied().collect();
            (st.mtu + mtu::WIREGUARD_OVERHEAD, peers)
        };
        // Local syscalls only (socket, connect, getsockopt): nothing is sent.
        let observed: Vec<(SocketAddr, u32)> = peers
            .into_iter()
            .map(|p| (p, mtu::path_mtu(p).unwrap_or(0)))
            .collect();
        for f in mtu::check_paths(needed, &observed, &mut reported) {
            warn!(iface = %inner.iface, peer = %f.peer, path_mtu = f.path_mtu, needed = f.needed,
                  "wireguard: {f}");
        }
    }
}

/// Watches the userspace child; restarts it (with backoff) when it exits or stops answering.
/// Ends when every `Wg` handle is gone or the interface is shut down.
async fn supervise(inner: Weak<Inner>) {
    let mut until_probe = PROBE_EVERY_TICKS;
    let mut probe_failures: u32 = 0;
    let mut wait = SUPERVISE_EVERY;
    loop {
        tokio::time::sleep(wait).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut st = inner.state.lock().await;
        if st.closed {
            return;
        }
        until_probe = until_probe.saturating_sub(1);
        let mut reason = st.child.exited(&inner.iface);
        if reason.is_none() && until_probe == 0 {
            until_probe = PROBE_EVERY_TICKS;
            match uapi_get(&inner.iface).await {
                Ok(_) => probe_failures = 0,
                Err(e) => {
                    probe_failures += 1;
                    warn!(iface = %inner.iface, %e, probe_failures, "userspace wireguard not answering");
                    if probe_failures >= PROBE_FAILURES_TO_RESTART {
                        reason = Some(format!("not answering: {e}"));
                    }
                }
            }
        }
        let Some(reason) = reason else {
            wait = SUPERVISE_EVERY;
            continue;
        };
        probe_failures = 0;
        warn!(iface = %inner.iface, %reason, log = %log_tail(&inner.iface),
              "userspace wireguard is gone; restarting it");
        match inner.restart(&mut st).await {
            Ok(()) => {
                info!(iface = %inner.iface, pid = ?st.child.pid(), peers = st.peers.len(),
                      "userspace wireguard restarted and reconfigured");
                wait = SUPERVISE_EVERY;
            }
            Err(e) => {
                wait = (wait * 2).min(MAX_RESTART_BACKOFF);
                warn!(iface = %inner.iface, %e, retry_in = ?wait, "restarting userspace wireguard failed");
            }
        }
    }
}

/// The userspace child as this agent knows it.
enum Child {
    /// Kernel mode: there is none.
    None,
    /// Started by this process: waited on, so it never lingers as a zombie.
    Owned(tokio::process::Child),
    /// Started by an earlier agent (found through the pid file).
    Adopted(i32),
    /// Something answers on the socket but no pid file names it; only the socket can tell
    /// whether it lives.
    Unknown,
}

impl Child {
    fn adopt(iface: &str) -> Child {
        match read_pid(iface) {
            Some(pid) if pid_is_child_for(pid, iface) => Child::Adopted(pid),
            _ => Child::Unknown,
        }
    }

    fn pid(&self) -> Option<i32> {
        match self {
            Child::Owned(c) => c.id().map(|p| p as i32),
            Child::Adopted(pid) => Some(*pid),
            Child::None | Child::Unknown => None,
        }
    }

    /// Why the child is no longer running, or `None` if it is (or cannot be told from here).
    fn exited(&mut self, iface: &str) -> Option<String> {
        match self {
            Child::None | Child::Unknown => None,
            Child::Owned(c) => match c.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(format!("exited with {status}")),
                Err(e) => Some(format!("cannot be waited on: {e}")),
            },
            Child::Adopted(pid) => {
                (!pid_is_child_for(*pid, iface)).then(|| format!("process {pid} is gone"))
            }
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Leaves `Child::None`.
    async fn stop(&mut self, iface: &str, grace: Duration) {
        match std::mem::replace(self, Child::None) {
            Child::None => {}
            Child::Owned(mut c) => {
                if let Some(pid) = c.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                if tokio::time::timeout(grace, c.wait()).await.is_err() {
                    warn!(iface, pid = ?c.id(), "userspace wireguard ignored SIGTERM; killing it");
                    let _ = c.start_kill();
                    let _ = tokio::time::timeout(OP_TIMEOUT, c.wait()).await;
                }
            }
            Child::Adopted(pid) => stop_pid(pid, iface, grace).await,
            Child::Unknown => match read_pid(iface) {
                Some(pid) if pid_is_child_for(pid, iface) => stop_pid(pid, iface, grace).await,
                // The child exits within a second or so once its socket file is gone.
                _ => {
                    let _ = std::fs::remove_file(socket_path(iface));
                }
            },
        }
    }
}

async fn stop_pid(pid: i32, iface: &str, grace: Duration) {
    for (signal, within) in [(Signal::SIGTERM, grace), (Signal::SIGKILL, OP_TIMEOUT)] {
        if !pid_is_child_for(pid, iface) {
            return;
        }
        let _ = kill(Pid::from_raw(pid), signal);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !pid_is_child_for(pid, iface) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    warn!(iface, pid, "userspace wireguard did not exit after SIGKILL");
}

/// Whether `pid` is a live (not zombie) `wg-userspace` process for `iface`: a pid file can
/// outlive its process, and the pid be reused.
fn pid_is_child_for(pid: i32, iface: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.contains(&b"wg-userspace".as_slice())
        && args
            .windows(2)
            .any(|w| w[0] == b"--iface" && w[1] == iface.as_bytes());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    ours && !zombie
}

fn read_pid(iface: &str) -> Option<i32> {
    std::fs::read_to_string(pid_path(iface))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Starts `agent_exe wg-userspace --iface NAME` in its own session on the (persistent) TUN
/// interface NAME, records its pid, and waits until it answers on its socket.
async fn start_child(iface: &str, agent_exe: &Path, mtu: u32) -> Result<Child, WgError> {
    let start_err = |msg: String| WgError::Start {
        iface: iface.to_string(),
        msg,
    };
    // A stale child (hung, or still starting) would attach to the same TUN queues.
    if let Some(pid) = read_pid(iface).filter(|p| pid_is_child_for(*p, iface)) {
        warn!(
            iface,
            pid, "stopping a stale userspace wireguard before starting a new one"
        );
        stop_pid(pid, iface, Duration::from_millis(500)).await;
    }
    std::fs::create_dir_all(RUN_DIR).map_err(|e| start_err(format!("creating {RUN_DIR}: {e}")))?;
    let _ = std::fs::remove_file(socket_path(iface));
    match link_kind(iface).await? {
        LinkKind::Tun => {}
        LinkKind::Missing => {
            let add = NetOp::AddTun {
                name: iface.to_string(),
            };
            host()?.apply(&Ns::Host, &[add]).await?
        }
        LinkKind::WireGuard | LinkKind::Other(_) => {
            return Err(WgError::Foreign {
                iface: iface.to_string(),
                detail: "exists and is not the TUN device userspace WireGuard needs".into(),
            })
        }
    }
    link_up(iface, mtu, Some(TXQUEUELEN)).await?;
    let log = open_child_log(iface)
        .map_err(|e| start_err(format!("opening log {}: {e}", log_path(iface).display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| start_err(format!("log: {e}")))?;
    let mut cmd = tokio::process::Command::new(agent_exe);
    cmd.arg("wg-userspace")
        .arg("--iface")
        .arg(iface)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // Its own session: the tunnel outlives this agent, like a container's shim.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| start_err(format!("running {}: {e}", agent_exe.display())))?;
    let pid = child.id().unwrap_or_default();
    crate::shim::write_atomic(&pid_path(iface), &pid.to_string())
        .map_err(|e| start_err(format!("writing {}: {e}", pid_path(iface).display())))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(start_err(format!(
                "it exited with {status}: {}",
                log_tail(iface)
            )));
        }
        if uapi_get(iface).await.is_ok() {
            info!(iface, pid, "userspace wireguard started");
            return Ok(Child::Owned(child));
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(OP_TIMEOUT, child.wait()).await;
            return Err(start_err(format!(
                "no answer on {} within {}s: {}",
                socket_path(iface).display(),
                START_TIMEOUT.as_secs(),
                log_tail(iface)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn open_child_log(iface: &str) -> io::Result<std::fs::File> {
    let path = log_path(iface);
    if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > MAX_CHILD_LOG {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(&path, old);
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The last lines of the child's log, for error messages.
fn log_tail(iface: &str) -> String {
    let Ok(mut f) = std::fs::File::open(log_path(iface)) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(io::SeekFrom::Start(len.saturating_sub(600)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().rev().take(4).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail.join(" | ")
    }
}

fn socket_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{iface}.sock"))
}

fn pid_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{iface}.pid"))
}

fn log_path(iface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{iface}.log"))
}

/// Queue of the tunnel interface: the default 500 drops bursts a single TCP stream makes
/// (measured: 1–3k drops per 5 s iperf3 run).
const TXQUEUELEN: u32 = 4000;

/// `rudder-agent wg-userspace IFACE`: runs Rudder's userspace device ([`device`]) for `iface`
/// until it is shut down, and returns the process's exit code.
pub fn userspace_main(iface: &str) -> i32 {
    if parse_iface(iface).is_err() {
        eprintln!("{}", WgError::BadName(iface.to_string()));
        return 2;
    }
    // A panicking thread would leave a half-working device: end the process instead, so the
    // agent restarts and reconfigures it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(70);
    }));
    let code = device::run(iface, &socket_path(iface));
    info!(iface, code, "userspace wireguard stopped");
    code
}

fn parse_iface(iface: &str) -> Result<InterfaceName, WgError> {
    let ok = (1..=15).contains(&iface.len())
        && !iface.starts_with('-')
        && iface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(WgError::BadName(iface.to_string()));
    }
    iface
        .parse()
        .map_err(|_| WgError::BadName(iface.to_string()))
}

/// What the device holds, as read from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DeviceState {
    public_key: Option<Key>,
    listen_port: Option<u16>,
    peers: Vec<PeerState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerState {
    public_key: Key,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<(IpAddr, u8)>,
}

/// A wanted peer, validated and normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    key: Key,
    endpoint: SocketAddr,
    allowed_ips: BTreeSet<(Ipv4Addr, u8)>,
}

impl Wanted {
    /// The device's peer as a wanted one, if it is expressible as one (IPv4 only, has an
    /// endpoint).
    fn from_state(p: &PeerState) -> Option<Wanted> {
        Some(Wanted {
            key: p.public_key.clone(),
            endpoint: p.endpoint?,
            allowed_ips: v4_set(&p.allowed_ips)?,
        })
    }
}

/// The allowed IPs as a normalized IPv4 set; `None` if any is not IPv4.
fn v4_set(ips: &[(IpAddr, u8)]) -> Option<BTreeSet<(Ipv4Addr, u8)>> {
    ips.iter()
        .map(|(ip, len)| match ip {
            IpAddr::V4(v4) if *len <= 32 => Some(normalize(*v4, *len)),
            _ => None,
        })
        .collect()
}

fn normalize(ip: Ipv4Addr, len: u8) -> (Ipv4Addr, u8) {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (Ipv4Addr::from(u32::from(ip) & mask), len)
}

fn parse_peers(peers: &[WgPeer]) -> Result<Vec<Wanted>, WgError> {
    let mut seen = HashSet::new();
    peers
        .iter()
        .map(|p| {
            let key = Key::from_base64(p.public_key.trim())
                .map_err(|_| WgError::BadPeerKey(p.public_key.clone()))?;
            if !seen.insert(key.clone()) {
                return Err(WgError::BadPeer {
                    key: p.public_key.clone(),
                    reason: "listed twice".into(),
                });
            }
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|(ip, len)| {
                    if *len > 32 {
                        Err(WgError::BadPeer {
                            key: p.public_key.clone(),
                            reason: format!("allowed IP {ip}/{len}: prefix longer than 32"),
                        })
                    } else {
                        Ok(normalize(*ip, *len))
                    }
                })
                .collect::<Result<_, _>>()?;
            Ok(Wanted {
                key,
                endpoint: p.endpoint,
                allowed_ips,
            })
        })
        .collect()
}

/// The change that turns the device's peers into the wanted ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct PeerPlan {
    /// Peers to remove: unwanted ones and changed ones (which are also in `add`).
    remove: Vec<Key>,
    add: Vec<Wanted>,
}

/// Pure diff of current against wanted peers. A peer is unchanged when its allowed IPs are
/// the wanted set and its endpoint is the wanted one, either as the device reports it or as
/// we last set it (the device's may have roamed since).
fn plan_peers(
    current: &[PeerState],
    wanted: &[Wanted],
    applied: &HashMap<Key, SocketAddr>,
) -> PeerPlan {
    let current: HashMap<&Key, &PeerState> = current.iter().map(|p| (&p.public_key, p)).collect();
    let wanted_keys: HashSet<&Key> = wanted.iter().map(|w| &w.key).collect();
    let mut plan = PeerPlan::default();
    for key in current.keys() {
        if !wanted_keys.contains(key) {
            plan.remove.push((*key).clone());
        }
    }
    for w in wanted {
        let Some(cur) = current.get(&w.key) else {
            plan.add.push(w.clone());
            continue;
        };
        let same_ips = v4_set(&cur.allowed_ips).as_ref() == Some(&w.allowed_ips);
        let same_endpoint =
            cur.endpoint == Some(w.endpoint) || applied.get(&w.key) == Some(&w.endpoint);
        if !(same_ips && same_endpoint) {
            plan.remove.push(w.key.clone());
            plan.add.push(w.clone());
        }
    }
    plan.remove.sort_by_key(|k| k.0);
    plan
}

/// One exchange on the userspace socket. Returns the answer's lines before `errno=`.
async fn uapi(iface: &str, request: &str, op: &'static str) -> Result<Vec<String>, WgError> {
    let path = socket_path(iface);
    let exchange = async {
        let mut sock = tokio::net::UnixStream::connect(&path).await?;
        sock.write_all(request.as_bytes()).await?;
        let mut reader = BufReader::new(sock);
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                break;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let done = line.starts_with("errno=");
            lines.push(line.to_string());
            if done {
                break;
            }
        }
        Ok::<_, io::Error>(lines)
    };
    let mut lines = tokio::time::timeout(OP_TIMEOUT, exchange)
        .await
        .map_err(|_| WgError::Timeout {
            iface: iface.to_string(),
            op,
            after: OP_TIMEOUT,
        })?
        .map_err(|source| WgError::Uapi {
            iface: iface.to_string(),
            op,
            source,
        })?;
    let errno = lines
        .pop()
        .and_then(|l| l.strip_prefix("errno=").and_then(|n| n.parse::<i32>().ok()));
    match errno {
        Some(0) => Ok(lines),
        Some(errno) => Err(WgError::Refused {
            iface: iface.to_string(),
            op,
            errno,
        }),
        None => Err(WgError::Uapi {
            iface: iface.to_string(),
            op,
            source: io::Error::new(io::ErrorKind::InvalidData, "answer without errno"),
        }),
    }
}

async fn uapi_set(iface: &str, mut request: String, op: &'static str) -> Result<(), WgError> {
    request.push('\n');
    uapi(iface, &request, op).await.map(|_| ())
}

async fn uapi_get(iface: &str) -> Result<DeviceState, WgError> {
    let lines = uapi(iface, "get=1\n\n", "get").await?;
    parse_get(&lines).map_err(|msg| WgError::Uapi {
        iface: iface.to_string(),
        op: "get",
        source: io::Error::new(io::ErrorKind::InvalidData, msg),
    })
}

/// Parses a `get=1` answer (boringtun's or wireguard-go's).
fn parse_get(lines: &[String]) -> Result<DeviceState, String> {
    let mut dev = DeviceState::default();
    let hex_key = |v: &str| Key::from_hex(v).map_err(|_| format!("bad key {v:?}"));
    for line in lines {
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("bad line {line:?}"));
        };
        let peer = dev.peers.last_mut();
        match (k, peer) {
            ("own_public_key", _) => dev.public_key = Some(hex_key(v)?),
            ("private_key", _) => dev.public_key = Some(hex_key(v)?.get_public()),
            ("listen_port", _) => {
                dev.listen_port = Some(v.parse().map_err(|_| format!("bad port {v:?}"))?)
            }
            ("public_key", _) => dev.peers.push(PeerState {
                public_key: hex_key(v)?,
                endpoint: None,
                allowed_ips: Vec::new(),
            }),
            ("endpoint", Some(p)) => {
                p.endpoint = Some(v.parse().map_err(|_| format!("bad endpoint {v:?}"))?)
            }
            ("allowed_ip", Some(p)) => {
                let (ip, len) = v
                    .split_once('/')
                    .and_then(|(ip, len)| Some((ip.parse().ok()?, len.parse().ok()?)))
                    .ok_or_else(|| format!("bad allowed ip {v:?}"))?;
                p.allowed_ips.push((ip, len));
            }
            _ => {}
        }
    }
    Ok(dev)
}

enum LinkKind {
    Missing,
    WireGuard,
    Tun,
    Other(String),
}

async fn link_kind(iface: &str) -> Result<LinkKind, WgError> {
    Ok(match host()?.link_kind(iface).await? {
        None => LinkKind::Missing,
        Some(k) if k == "wireguard" => LinkKind::WireGuard,
        Some(k) if k == "tun" => LinkKind::Tun,
        Some(k) => LinkKind::Other(format!("a link of kind {k:?}")),
    })
}

/// The process's netlink connection to the host's namespace.
fn host() -> Result<std::sync::Arc<NetlinkHostNet>, WgError> {
    Ok(NetlinkHostNet::shared()?)
}

/// Sets the interface's MTU (and queue length) and brings it up, over netlink.
async fn link_up(iface: &str, mtu: u32, txqlen: Option<u32>) -> Result<(), WgError> {
    let set = NetOp::SetLink {
        name: iface.to_string(),
        set: LinkSet {
            up: Some(true),
            mtu: Some(mtu),
            txqlen,
            ..Default::default()
        },
    };
    Ok(host()?.apply(&Ns::Host, &[set]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Key {
        Key([n; 32])
    }

    fn cur(n: u8, ep: &str, ips: &[(&str, u8)]) -> PeerState {
        PeerState {
            public_key: key(n),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: ips.iter().map(|(i, l)| (i.parse().unwrap(), *l)).collect(),
        }
    }

    fn want(n: u8, ep: &str, ips: &[(&str, u8)]) -> Wanted {
        Wanted {
            key: key(n),
            endpoint: ep.parse().unwrap(),
            allowed_ips: ips.iter().map(|(i, l)| (i.parse().unwrap(), *l)).collect(),
        }
    }

    #[test]
    fn plan_peers_cases() {
        let a = "192.168.0.1:51820";
        let b = "192.168.0.2:51820";
        let none = HashMap::new();
        struct Case {
            name: &'static str,
            current: Vec<PeerState>,
            wanted: Vec<Wanted>,
            applied: HashMap<Key, SocketAddr>,
            remove: Vec<u8>,
            add: Vec<u8>,
        }
        let cases = vec![
            Case {
                name: "empty to one",
                current: vec![],
                wanted: vec![want(1, a, &[("10.0.1.0", 24)])],
                applied: none.clone(),
                remove: vec![],
                add: vec![1],
            },
            Case {
                name: "unchanged is untouched",
                current: vec![cur(1, a, &[("10.0.1.0", 24)])],
                wanted: vec![want(1, a, &[("10.0.1.0", 24)])],
                applied: none.clone(),
                remove: vec![],
                add: vec![],
            },
            Case {
                name: "unwanted is removed",
                current: vec![cur(1, a, &[("10.0.1.0", 24)]), cur(2, b, &[])],
                wanted: vec![want(1, a, &[("10.0.1.0", 24)])],
                applied: none.clone(),
                remove: vec![2],
                add: vec![],
            },
            Case {
                name: "changed allowed ips: remove then add",
                current: vec![cur(1, a, &[("10.0.1.0", 24)])],
                wanted: vec![want(1, a, &[("10.0.1.0", 24), ("10.0.9.0", 24)])],
                applied: none.clone(),
                remove: vec![1],
                add: vec![1],
            },
            Case {
                name: "changed endpoint: remove then add",
                current: vec![cur(1, a, &[])],
                wanted: vec![want(1, b, &[])],
                applied: HashMap::from([(key(1), a.parse().unwrap())]),
                remove: vec![1],
                add: vec![1],
            },
            Case {
                name: "roamed endpoint we did not change is untouched",
                current: vec![cur(1, "172.16.0.9:40000", &[])],
                wanted: vec![want(1, a, &[])],
                applied: HashMap::from([(key(1), a.parse().unwrap())]),
                remove: vec![],
                add: vec![],
            },
            Case {
                name: "an IPv6 allowed ip we do not want counts as a change",
                current: vec![cur(1, a, &[("10.0.1.0", 24), ("fd00::", 64)])],
                wanted: vec![want(1, a, &[("10.0.1.0", 24)])],
                applied: none.clone(),
                remove: vec![1],
                add: vec![1],
            },
        ];
        for c in cases {
            let plan = plan_peers(&c.current, &c.wanted, &c.applied);
            let remove: Vec<u8> = plan.remove.iter().map(|k| k.0[0]).collect();
            let add: Vec<u8> = plan.add.iter().map(|w| w.key.0[0]).collect();
            assert_eq!(remove, c.remove, "{}: remove", c.name);
            assert_eq!(add, c.add, "{}: add", c.name);
        }
    }

    #[test]
    fn parse_peers_normalizes_and_rejects() {
        let k = KeyPair::generate().public.to_base64();
        let p = |ips: Vec<(Ipv4Addr, u8)>| WgPeer {
            public_key: k.clone(),
            endpoint: "10.0.0.1:51820".parse().unwrap(),
            allowed_ips: ips,
        };
        let w = parse_peers(&[p(vec![(Ipv4Addr::new(10, 1, 2, 3), 24)])]).unwrap();
        assert_eq!(
            w[0].allowed_ips,
            BTreeSet::from([(Ipv4Addr::new(10, 1, 2, 0), 24)])
        );
        assert!(matches!(
            parse_peers(&[p(vec![(Ipv4Addr::new(10, 1, 2, 3), 33)])]),
            Err(WgError::BadPeer { .. })
        ));
        assert!(matches!(
            parse_peers(&[p(vec![]), p(vec![])]),
            Err(WgError::BadPeer { .. })
        ));
        let mut bad = p(vec![]);
        bad.public_key = "nope".into();
        assert!(matches!(parse_peers(&[bad]), Err(WgError::BadPeerKey(_))));
    }

    #[test]
    fn parse_get_reads_boringtun_answer() {
        let me = KeyPair::generate();
        let peer = KeyPair::generate();
        let lines: Vec<String> = [
            format!("own_public_key={}", hex::encode(me.public.as_bytes())),
            "listen_port=51820".into(),
            format!("public_key={}", hex::encode(peer.public.as_bytes())),
            "endpoint=192.168.0.2:51820".into(),
            "allowed_ip=10.0.2.0/24".into(),
            "rx_bytes=10".into(),
            "tx_bytes=20".into(),
        ]
        .into();
        let dev = parse_get(&lines).unwrap();
        assert_eq!(dev.public_key, Some(me.public));
        assert_eq!(dev.listen_port, Some(51820));
        assert_eq!(
            dev.peers,
            vec![PeerState {
                public_key: peer.public,
                endpoint: Some("192.168.0.2:51820".parse().unwrap()),
                allowed_ips: vec![("10.0.2.0".parse().unwrap(), 24)],
            }]
        );
    }

    #[test]
    fn key_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wg.key");
        let k1 = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create_key(&path).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(k1.public, k1.private.get_public());
        assert!(!format!("{k1:?}").contains(&k1.private.to_base64()));
        // Loosened permissions are tightened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k3 = generate_key(&path).unwrap();
        assert_ne!(k1, k3);
        assert_eq!(load_or_create_key(&path).unwrap(), k3);
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(WgError::BadKeyFile(_))
        ));
    }

    #[test]
    fn iface_names() {
        assert!(parse_iface("rwg0123abcd").is_ok());
        for bad in ["", "-x", "a/b", "a b", "sixteen-chars-xx"] {
            assert!(parse_iface(bad).is_err(), "{bad:?}");
        }
    }
}
