//! systemd readiness notification (`sd_notify(3)`) for `rudder-controller` and `rudder-agent`
//! under `Type=notify` units.
//!
//! Invariants:
//! - Without `NOTIFY_SOCKET` (the lab, a shell, any other supervisor) every call is a no-op.
//! - [`Notifier::from_env`] removes `NOTIFY_SOCKET` from the environment, so no child (shim,
//!   runc, crun, a container) ever talks to the service manager in the daemon's name: runc in
//!   particular would otherwise forward it into containers.
//! - A message is one datagram of `KEY=VALUE` lines; a status is one line of at most
//!   [`STATUS_MAX`] bytes (newlines become spaces), so no input can forge another key.
//! - Readiness is observed, not assumed: [`Notifier::ready_when_listening`] sends `READY=1`
//!   once the daemon's API port accepts a TCP connection, i.e. once it really serves.
//!
//! [`journal`]: the log line format for a stdout that systemd connected to the journal.

pub mod journal;

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Longest `STATUS=` text sent (bytes); longer text is cut at a character boundary.
pub const STATUS_MAX: usize = 512;
/// Pause between two connection attempts of [`Notifier::ready_when_listening`].
const PROBE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("sd_notify: NOTIFY_SOCKET {0:?} is neither an absolute path nor an @abstract name")]
    Unsupported(String),
    #[error("sd_notify: socket name {0:?} is too long for a unix socket")]
    Name(String, #[source] std::io::Error),
    #[error("sd_notify: send to {0:?}")]
    Send(String, #[source] std::io::Error),
}

/// One state change told to the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Startup is finished: the daemon serves.
    Ready,
    /// The daemon begins its shutdown.
    Stopping,
    /// Free text shown by `systemctl status`.
    Status(String),
}

/// The datagram for `states`: one `KEY=VALUE` line each. Pure.
pub fn message(states: &[State]) -> String {
    let mut out = String::new();
    for s in states {
        match s {
            State::Ready => out.push_str("READY=1\n"),
            State::Stopping => out.push_str("STOPPING=1\n"),
            State::Status(text) => {
                out.push_str("STATUS=");
                out.push_str(&one_line(text));
                out.push('\n');
            }
        }
    }
    out
}

/// `text` on one line and at most [`STATUS_MAX`] bytes.
fn one_line(text: &str) -> String {
    let mut end = text.len().min(STATUS_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\n', '\r'], " ")
}

/// Where notifications go: nowhere (no `NOTIFY_SOCKET`) or the service manager's socket.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<String>,
}

impl Notifier {
    /// Takes `NOTIFY_SOCKET` out of the environment. Call it before the process starts any
    /// thread (the environment is not thread-safe to change). An unsupported value is logged
    /// and ignored: the daemon runs, only without readiness.
    pub fn from_env() -> Self {
        let value = std::env::var_os(NOTIFY_SOCKET);
        std::env::remove_var(NOTIFY_SOCKET);
        match value {
            None => Self::default(),
            Some(v) => Self::for_socket(&v).unwrap_or_else(|e| {
                tracing::warn!(%e, "readiness notification off");
                Self::default()
            }),
        }
    }

    /// A notifier for the socket `name`: an absolute path, or `@name` for an abstract-namespace
    /// socket. Empty means none.
    pub fn for_socket(name: &OsStr) -> Result<Self, NotifyError> {
        let name = name.to_string_lossy().into_owned();
        if name.is_empty() {
            return Ok(Self::default());
        }
        // Refused now, not at the first send: the daemon says so once, at start.
        unix_addr(&name)?;
        Ok(Self { socket: Some(name) })
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `states` in one datagram; a no-op without a socket.
    pub fn notify(&self, states: &[State]) -> Result<(), NotifyError> {
        let Some(name) = &self.socket else {
            return Ok(());
        };
        let addr = unix_addr(name)?;
        let sock = UnixDatagram::unbound().map_err(|e| NotifyError::Send(name.clone(), e))?;
        sock.send_to_addr(message(states).as_bytes(), &addr)
            .map_err(|e| NotifyError::Send(name.clone(), e))?;
        Ok(())
    }

    /// [`Self::notify`], logging a failure instead of returning it: a daemon keeps running
    /// when its supervisor cannot be told.
    pub fn notify_or_warn(&self, states: &[State]) {
        if let Err(e) = self.notify(states) {
            tracing::warn!(%e, "could not notify the service manager");
        }
    }

    /// `STOPPING=1` with a status.
    pub fn stopping(&self) {
        self.notify_or_warn(&[State::Stopping, State::Status("stopping".into())]);
    }

    /// Sends `READY=1` and `status` from a thread once `listen` accepts a TCP connection (an
    /// unspecified address is probed on loopback). Nothing happens without a socket.
    pub fn ready_when_listening(&self, listen: SocketAddr, status: String) {
        if !self.is_enabled() {
            return;
        }
        let this = self.clone();
        let probe = probe_addr(listen);
        let spawned = std::thread::Builder::new()
            .name("sd-notify-ready".into())
            .spawn(move || {
                while TcpStream::connect_timeout(&probe, Duration::from_secs(1)).is_err() {
                    std::thread::sleep(PROBE_EVERY);
                }
                this.notify_or_warn(&[State::Ready, State::Status(status)]);
            });
        if let Err(e) = spawned {
            tracing::warn!(%e, "sd_notify: cannot start the readiness probe; telling ready now");
            self.notify_or_warn(&[State::Ready]);
        }
    }
}

/// The address a readiness probe connects to for a listener on `listen`.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

fn unix_addr(name: &str) -> Result<UnixAddr, NotifyError> {
    if let Some(abs) = name.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        UnixAddr::from_abstract_name(abs.as_bytes()).map_err(|e| NotifyError::Name(name.into(), e))
    } else if name.starts_with('/') {
        UnixAddr::from_pathname(name).map_err(|e| NotifyError::Name(name.into(), e))
    } else {
        Err(NotifyError::Unsupported(name.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn message_lines() {
        assert_eq!(
            message(&[
                State::Ready,
                State::Status("serving on 0.0.0.0:4243".into())
            ]),
            "READY=1\nSTATUS=serving on 0.0.0.0:4243\n"
        );
        assert_eq!(message(&[State::Stopping]), "STOPPING=1\n");
    }

    #[test]
    fn status_cannot_forge_a_key_and_is_bounded() {
        let m = message(&[State::Status("x\nREADY=1".into())]);
        assert_eq!(m, "STATUS=x READY=1\n");
        let long = "é".repeat(STATUS_MAX);
        let m = message(&[State::Status(long)]);
        assert!(m.len() <= "STATUS=\n".len() + STATUS_MAX);
        assert!(m.ends_with("é\n"));
    }

    #[test]
    fn no_socket_is_a_no_op() {
        let n = Notifier::for_socket(OsStr::new("")).unwrap();
        assert!(!n.is_enabled());
        n.notify(&[State::Ready]).unwrap();
        n.ready_when_listening("127.0.0.1:1".parse().unwrap(), "x".into());
    }

    #[test]
    fn refuses_relative_and_vsock_names() {
        for bad in ["notify.sock", "vsock:2:1234"] {
            let e = Notifier::for_socket(OsStr::new(bad)).unwrap_err();
            assert!(e.to_string().starts_with("sd_notify: "), "{e}");
        }
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::for_socket(path.as_os_str()).unwrap();
        n.notify(&[State::Ready, State::Status("up".into())])
            .unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up\n");
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=stopping\n");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("rudder-sdnotify-test-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::for_socket(OsStr::new(&format!("@{name}"))).unwrap();
        n.notify(&[State::Stopping]).unwrap();
        assert_eq!(recv(&sock), "STOPPING=1\n");
    }

    #[test]
    fn ready_only_once_the_port_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        // A free port, closed again: the probe finds nothing there at first.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let n = Notifier::for_socket(path.as_os_str()).unwrap();
        n.ready_when_listening(SocketAddr::from(([0, 0, 0, 0], port)), "serving".into());
        sock.set_nonblocking(true).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 64];
        assert!(
            sock.recv(&mut buf).is_err(),
            "ready before the port listened"
        );
        sock.set_nonblocking(false).unwrap();
        let _listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=serving\n");
    }

    #[test]
    fn probes_loopback_for_an_unspecified_address() {
        assert_eq!(
            probe_addr("0.0.0.0:4243".parse().unwrap()),
            "127.0.0.1:4243".parse().unwrap()
        );
        assert_eq!(
            probe_addr("[::]:4245".parse().unwrap()),
            "[::1]:4245".parse().unwrap()
        );
        assert_eq!(
            probe_addr("10.0.0.5:4245".parse().unwrap()),
            "10.0.0.5:4245".parse().unwrap()
        );
    }
}
