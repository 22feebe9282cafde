//! Certificates renew on their own: a node asks a controller (`Cluster/Renew`, authenticated
//! with its current certificate) for a new certificate with a fresh key at a random point
//! between 50 % and 80 % of the current one's lifetime, saves it, and publishes it on a
//! `watch` channel. Clients build their TLS from the latest certificate on every new
//! connection; servers restart their listener with it (see the agent and the controller).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rudder_proto::v1::cluster_client::ClusterClient;
use rudder_proto::v1::RenewRequest;
use tokio::sync::watch;
use tonic::transport::Endpoint;
use tracing::{error, info, warn};

use crate::ca::{self, Role, CLOCK_SKEW};
use crate::tls::{self, NodeCerts};

/// When the certificate in `certs` should be renewed. Certificates are backdated by
/// [`CLOCK_SKEW`]; that margin is not part of the lifetime being divided.
pub fn due(certs: &NodeCerts) -> Result<SystemTime, tls::TlsError> {
    let (nb, na) = ca::cert_validity(certs.cert_pem())?;
    let start = (nb + CLOCK_SKEW).min(na);
    Ok(ca::renew_at(start, na, &mut rand::rng()))
}

/// Renews forever: waits until due, asks one of `controllers` (`host:port`), saves the result
/// in `dir` and publishes it on `tx`. Failures are retried every `retry` until the old
/// certificate expires (and after: a node whose certificate expired must join again).
pub async fn run(
    dir: PathBuf,
    controllers: impl Fn() -> Vec<String> + Send + 'static,
    tx: watch::Sender<NodeCerts>,
    retry: Duration,
) {
    loop {
        let current = tx.borrow().clone();
        let at = match due(&current) {
            Ok(t) => t,
            Err(e) => {
                warn!(%e, "cannot read the node certificate's validity; not renewing");
                return;
            }
        };
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        loop {
            match renew_once(&current, &controllers()).await {
                Ok(next) => {
                    if let Err(e) = next.save(&dir) {
                        warn!(%e, "renewed certificate not saved");
                    }
                    info!("node certificate renewed");
                    tx.send_replace(next);
                    break;
                }
                Err(e) => {
                    if current.identity(SystemTime::now()).is_err() {
                        // Nobody accepts an expired certificate, not even for renewal: only
                        // a join token re-admits this node (it keeps its id, see join.rs).
                        error!(
                            %e,
                            "the node certificate expired; restart with a join token \
                             (RUDDER_JOIN_TOKEN) to be re-admitted"
                        );
                        return;
                    }
                    let left = ca::cert_validity(current.cert_pem())
                        .ok()
                        .and_then(|(_, na)| na.duration_since(SystemTime::now()).ok());
                    let pause = retry_delay(retry, left);
                    warn!(%e, ?pause, "certificate renewal failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// How long to wait before the next renewal attempt: `retry`, but never more than a quarter
/// of the certificate's remaining life (`left`), so a node that comes up close to expiry (a
/// controller restarted just before its renewal was due, its own API not yet listening) gets
/// several more tries before the certificate lapses; never less than 100 ms.
pub fn retry_delay(retry: Duration, left: Option<Duration>) -> Duration {
    let floor = Duration::from_millis(100);
    match left {
        Some(left) => retry.min(left / 4).max(floor),
        None => retry.max(floor),
    }
}

/// One renewal against the first controller that answers.
pub async fn renew_once(current: &NodeCerts, controllers: &[String]) -> Result<NodeCerts, String> {
    let (_, node) = current
        .identity(SystemTime::now())
        .map_err(|e| e.to_string())?;
    let (key, csr) = ca::node_csr(&node).map_err(|e| e.to_string())?;
    let mut last = String::from("no controller known");
    for addr in controllers {
        let addr = addr
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let endpoint = match Endpoint::from_shared(format!("https://{addr}")) {
            Ok(e) => e.connect_timeout(Duration::from_secs(2)),
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let endpoint = match endpoint.tls_config(tls::client_tls(current, Role::Manager)) {
            Ok(e) => e,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        match ClusterClient::new(channel)
            .renew(RenewRequest {
                csr_pem: csr.clone(),
            })
            .await
        {
            Ok(r) => {
                return current
                    .renewed(&r.into_inner().cert_pem, &key)
                    .map_err(|e| e.to_string())
            }
            Err(s) => last = format!("{addr}: {}", s.message()),
        }
    }
    Err(last)
}

/// Serves gRPC on `addr` with mutual TLS (see [`tls::server_tls`]) until `stop` turns true,
/// restarting the listener whenever a renewed certificate is published on `certs`. `routes`
/// adds the services for the current certificate (interceptors check callers against its CA).
/// A bind that fails right after a restart (the old listener lingering) is retried for ~2 s.
pub async fn serve_renewing(
    addr: std::net::SocketAddr,
    mut certs: watch::Receiver<NodeCerts>,
    stop: watch::Receiver<bool>,
    mut routes: impl FnMut(
        &NodeCerts,
        &mut tonic::transport::Server,
    ) -> tonic::transport::server::Router,
) -> Result<(), tonic::transport::Error> {
    let mut failures = 0;
    loop {
        let current = certs.borrow_and_update().clone();
        let mut server =
            tonic::transport::Server::builder().tls_config(tls::server_tls(&current))?;
        let (mut stopped, mut renewed) = (stop.clone(), certs.clone());
        let r = routes(&current, &mut server)
            .serve_with_shutdown(addr, async move {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => {}
                    _ = renewed.changed() => {}
                }
            })
            .await;
        match r {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures > 20 || *stop.borrow() {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if *stop.borrow() {
            return Ok(());
        }
        info!(%addr, "grpc server restarting with the renewed certificate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_quicken_as_expiry_nears() {
        let five = Duration::from_secs(5);
        let cases = [
            (Some(Duration::from_secs(3600)), five),
            (Some(Duration::from_secs(20)), five),
            (Some(Duration::from_secs(8)), Duration::from_secs(2)),
            (Some(Duration::from_millis(200)), Duration::from_millis(100)),
            (Some(Duration::ZERO), Duration::from_millis(100)),
            (None, five),
        ];
        for (left, want) in cases {
            assert_eq!(retry_delay(five, left), want, "left {left:?}");
        }
    }
}
