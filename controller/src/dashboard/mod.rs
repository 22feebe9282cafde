//! The web dashboard: a page served by the controller over HTTPS (`--dashboard-listen`, off by
//! default) that shows services with their replicas and rollouts, tasks with their reasons,
//! nodes as columns of task cards, networks, volumes, secrets and configs (metadata only),
//! live over server-sent events, with streamed logs and three actions (scale, roll back,
//! drain a node).
//!
//! Parts: [`auth`] (tokens, sessions, CSRF: pure), [`view`] (the page's JSON from the store:
//! pure), `listen` (TLS with an optional client certificate), `routes` (axum), and the
//! embedded assets (`assets/`: HTML, CSS and plain JavaScript, no build step, no CDN).
//!
//! Login: an admin client certificate on the connection, or a token from `rctl dashboard
//! token` ([`token_rpc`]) exchanged once for an `HttpOnly; Secure; SameSite=Strict` session
//! cookie. See `docs/ARCHITECTURE.md`, "Dashboard".

pub mod auth;
mod listen;
mod routes;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use rudder_model::Store;
use rudder_pki::ca::{PeerIdentity, Role};
use rudder_pki::tls::NodeCerts;
use rudder_proto::v1::{DashboardTokenRequest, DashboardTokenResponse};
use tokio::sync::watch;
use tonic::Status;
use tracing::info;

pub use routes::Dash;

/// Why the dashboard could not be served.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// Listening or serving failed (what, error).
    #[error("dashboard: {0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The TLS configuration could not be built from the node certificate.
    #[error("dashboard: tls: {0}")]
    Tls(#[from] rudder_pki::ca::CaError),
}

/// The signer of the cluster whose CA key `store` holds; `None` before the CA exists.
pub fn signer(store: &Store) -> Option<auth::Signer> {
    store
        .secrets
        .as_ref()
        .filter(|s| !s.ca_key_pem.is_empty())
        .map(|s| auth::Signer::from_ca_key(&s.ca_key_pem))
}

/// `DashboardToken`: a login token for the admin `caller` (the gRPC guard already required an
/// admin certificate that is not revoked), valid for the requested lifetime.
pub fn token_rpc(
    store: &Store,
    caller: Option<&PeerIdentity>,
    req: DashboardTokenRequest,
    dashboard_port: Option<u16>,
    now_ms: u64,
) -> Result<DashboardTokenResponse, Status> {
    let caller = caller
        .filter(|c| c.role == Role::Admin)
        .ok_or_else(|| Status::permission_denied("dashboard: tokens are for admins only"))?;
    let ttl = auth::token_ttl(req.ttl_seconds).map_err(Status::invalid_argument)?;
    let signer = signer(store).ok_or_else(|| {
        Status::unavailable("dashboard: the cluster ca is not initialised yet; try again")
    })?;
    let (token, claims) = auth::issue(&signer, &caller.node, ttl, now_ms, rand::random());
    info!(who = %caller.node, expires_ms = claims.exp_ms, "dashboard: token issued");
    Ok(DashboardTokenResponse {
        token,
        expires_at_ms: claims.exp_ms,
        dashboard_port: dashboard_port.map_or(0, u32::from),
    })
}

/// Serves the dashboard at `addr` with the latest of `certs` until `stop` turns true, in a
/// task of its own. A listener that cannot be bound is logged: the cluster runs without it.
pub async fn spawn(
    addr: SocketAddr,
    certs: watch::Receiver<NodeCerts>,
    dash: Arc<Dash>,
    mut stop: watch::Receiver<bool>,
) {
    let serve = async move {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| DashboardError::Io("listen", e))?;
        let listener = listen::DashListener::new(tcp, certs)?;
        info!(%addr, "dashboard listening (https)");
        let app = routes::router(dash).into_make_service_with_connect_info::<listen::Client>();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| DashboardError::Io("serve", e))
    };
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(%e, "dashboard not served");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn identity(role: Role) -> PeerIdentity {
        PeerIdentity {
            role,
            node: "admin-1".into(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::now() + Duration::from_secs(60),
        }
    }

    fn store() -> Store {
        let mut s = Store::default();
        s.secrets = Some(rudder_model::store::ClusterSecrets {
            ca_key_pem: "key".into(),
            ..Default::default()
        });
        s
    }

    #[test]
    fn tokens_are_for_admins_and_verify() {
        let req = |ttl| DashboardTokenRequest { ttl_seconds: ttl };
        let admin = identity(Role::Admin);
        let r = token_rpc(&store(), Some(&admin), req(0), Some(4249), 1_000).unwrap();
        assert_eq!(r.dashboard_port, 4249);
        assert_eq!(
            r.expires_at_ms,
            1_000 + auth::DEFAULT_TTL.as_millis() as u64
        );
        let claims = signer(&store())
            .unwrap()
            .verify(auth::Kind::Token, &r.token, 1_000)
            .unwrap();
        assert_eq!(claims.sub, "admin-1");

        let worker = identity(Role::Worker);
        let e = token_rpc(&store(), Some(&worker), req(0), None, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(token_rpc(&store(), None, req(0), None, 0).is_err());
        let e = token_rpc(&store(), Some(&admin), req(10 * 24 * 3600), None, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = token_rpc(&Store::default(), Some(&admin), req(0), None, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
