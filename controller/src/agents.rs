//! Reaching agents: the one dialer every relay (logs, exec, cp, inspect, commit, build,
//! images) uses to call a host's `AgentApi`.
//!
//! Invariants: the agent must present a certificate for the node id the store records (C1: a
//! node that registered another's address cannot answer); dialling an unreachable host fails
//! within [`CONNECT`] × 2 with an error naming the host, never hangs; kept-alive connections
//! notice a host that vanishes mid-stream; a connection is reused only for the same node id,
//! address, per-call bound and this controller's same certificate (a renewal or a node that
//! moved dials afresh), so reuse never widens whom a call reaches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rudder_proto::v1::agent_api_client::AgentApiClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// How long dialling a host may take (the whole dial is bounded by twice this).
pub const CONNECT: Duration = Duration::from_secs(2);

/// Which agent to dial: the node id its certificate must name, its address, its hostname.
#[derive(Debug, Clone)]
pub struct AgentAt {
    pub id: String,
    pub addr: String,
    pub host: String,
}

impl From<&rudder_model::Node> for AgentAt {
    fn from(n: &rudder_model::Node) -> Self {
        AgentAt {
            id: n.id.clone(),
            addr: n.addr.clone(),
            host: n.hostname.clone(),
        }
    }
}

/// This controller's certificates, replaced when they are renewed; `None` only in tests
/// without TLS.
pub type SharedCerts = Arc<RwLock<Option<rudder_pki::tls::NodeCerts>>>;

/// Dials agents with this controller's current certificate.
/// How often a kept connection is pinged, and how long an answer may take: a dead or frozen
/// host is given up within their sum (8 s).
const KEEPALIVE: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The most connections kept open; past it the pool starts again empty (a fleet larger than
/// this dials more often, nothing breaks).
const POOL_MAX: usize = 1024;

/// A connection kept for reuse: which node, at which address, with which per-call bound.
type PoolKey = (String, String, Option<Duration>);

/// An open connection and the certificate (PEM) this controller presented on it.
struct Kept {
    cert: String,
    channel: Channel,
}

#[derive(Clone)]
pub struct AgentDialer {
    certs: SharedCerts,
    /// Open connections, reused by the next [`Self::dial_kept`] of the same agent.
    pool: Arc<Mutex<HashMap<PoolKey, Kept>>>,
}

impl AgentDialer {
    pub fn new(certs: SharedCerts) -> Self {
        AgentDialer {
            certs,
            pool: Default::default(),
        }
    }

    /// The certificates in use now (also for calls to other controllers).
    pub fn certs(&self) -> Option<rudder_pki::tls::NodeCerts> {
        self.certs.read().expect("agent tls lock").clone()
    }

    /// A client of the agent `at` for calls the caller bounds itself (streams that follow,
    /// exec sessions), or an error naming the host.
    pub async fn dial(&self, at: &AgentAt) -> Result<AgentApiClient<Channel>, Status> {
        self.connect(at, None, false).await
    }

    /// As [`Self::dial`] (every call bounded by `per_call` when given), over a connection kept
    /// open for the next caller: the relays a user waits on interactively (logs, so `rctl
    /// run`; exec, cp, inspect) then cost one request, not a TCP and mutual-TLS handshake.
    /// Their errors name the task (and exec's the host): a call on a kept connection to a
    /// host that froze fails with the transport's error after the keep-alive, not with
    /// "cannot reach host" at dial time; a host that restarted is redialled by the channel.
    pub async fn dial_kept(
        &self,
        at: &AgentAt,
        per_call: Option<Duration>,
    ) -> Result<AgentApiClient<Channel>, Status> {
        self.connect(at, per_call, true).await
    }

    async fn connect(
        &self,
        at: &AgentAt,
        per_call: Option<Duration>,
        keep: bool,
    ) -> Result<AgentApiClient<Channel>, Status> {
        let (addr, host) = (&at.addr, &at.host);
        // Not `unavailable`: that would read as this controller being down.
        let unreachable = |e: String| {
            Status::failed_precondition(format!("cannot reach host {host} ({addr}): {e}"))
        };
        let certs = self.certs();
        let cert = certs
            .as_ref()
            .map(|c| c.cert_pem().to_string())
            .unwrap_or_default();
        let key: PoolKey = (at.id.clone(), at.addr.clone(), per_call);
        if keep {
            let pool = self.pool.lock().expect("agent pool lock");
            if let Some(kept) = pool.get(&key).filter(|k| k.cert == cert) {
                return Ok(AgentApiClient::new(kept.channel.clone()));
            }
        }
        let mut endpoint = endpoint(certs.as_ref(), at)
            .map_err(&unreachable)?
            .connect_timeout(CONNECT)
            .tcp_keepalive(Some(Duration::from_secs(5)))
            // Kept connections are pinged while idle too: a host that died or froze between
            // two relays is noticed within KEEPALIVE + KEEPALIVE_TIMEOUT (the next call dials
            // afresh, bounded by CONNECT), and so is one that stops mid-stream.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(t) = per_call {
            endpoint = endpoint.timeout(t);
        }
        match tokio::time::timeout(CONNECT * 2, endpoint.connect()).await {
            Ok(Ok(channel)) => {
                if keep {
                    let mut pool = self.pool.lock().expect("agent pool lock");
                    if pool.len() >= POOL_MAX {
                        pool.clear();
                    }
                    pool.insert(
                        key,
                        Kept {
                            cert,
                            channel: channel.clone(),
                        },
                    );
                }
                Ok(AgentApiClient::new(channel))
            }
            Ok(Err(e)) => Err(unreachable(rudder_proto::error_chain(&e))),
            Err(_) => Err(unreachable("timed out".into())),
        }
    }
}

/// The error of a relayed call to the agent `at` about `what` (a task's name). A transport
/// failure (on a kept connection, a host that froze or vanished shows only once the call is
/// made: tonic reports it, keep-alive timeouts included, as `unavailable`, which an agent's
/// API never answers itself) reads as a dial failure does, naming the host; any other error
/// is the agent's answer, prefixed with `what`.
pub fn relay_error(at: &AgentAt, what: &str, s: Status) -> Status {
    if s.code() == tonic::Code::Unavailable {
        Status::failed_precondition(format!(
            "cannot reach host {} ({}): {}",
            at.host,
            at.addr,
            s.message()
        ))
    } else {
        Status::new(s.code(), format!("{what}: {}", s.message()))
    }
}

/// An endpoint for the agent `at`: mutual TLS that accepts only `at.id`'s certificate (plain
/// http only in tests that run without certificates).
fn endpoint(certs: Option<&rudder_pki::tls::NodeCerts>, at: &AgentAt) -> Result<Endpoint, String> {
    let scheme = if certs.is_some() { "https" } else { "http" };
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{}", at.addr)).map_err(|e| e.to_string())?;
    match certs {
        Some(c) => {
            rudder_pki::tls::node_endpoint(endpoint, c, rudder_pki::ca::Role::Worker, &at.id)
                .map_err(|e| e.to_string())
        }
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> AgentAt {
        AgentAt {
            id: "n2".into(),
            addr: "10.0.0.2:4244".into(),
            host: "h2".into(),
        }
    }

    /// A transport failure on a kept connection reads as an unreachable host; the agent's own
    /// answers keep their code, prefixed with the task.
    #[test]
    fn relay_errors_name_the_host_only_for_transport_failures() {
        let e = relay_error(&at(), "web.1", Status::unavailable("keep-alive timed out"));
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            e.message(),
            "cannot reach host h2 (10.0.0.2:4244): keep-alive timed out"
        );
        let e = relay_error(&at(), "web.1", Status::not_found("no such container"));
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(e.message(), "web.1: no such container");
    }
}
