//! Autolock: a controller whose keyring file is wrapped with the cluster's unlock key and that
//! started without it is LOCKED. It opens nothing of its state (the raft log and snapshots are
//! under the keyring); over mutual TLS with its node certificate (never wrapped) it serves
//! only `Lock/Unlock` to admins, and refuses every other call with `failed_precondition`.
//! The right key unwraps the keyring and the controller finishes starting; a wrong one is
//! refused and it stays locked. The other controllers keep the cluster available meanwhile.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rudder_proto::v1::lock_server::{Lock, LockServer};
use rudder_proto::v1::{UnlockRequest, UnlockResponse};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::crypt::{CryptError, DataKeys, UnlockKey};
use crate::tls::{self, NodeCerts};
use crate::ControllerError;

/// What every call but `Unlock` gets from a locked controller.
pub const LOCKED_MSG: &str = "this controller is locked (autolock): unlock it with \
     `rctl cluster unlock --controller <its address>` and the cluster's unlock key";

/// Serves `Lock/Unlock` on `listen` until the right key arrives (its keyring, opened), or
/// `shutdown` completes (`None`).
pub async fn wait_for_unlock(
    listen: std::net::SocketAddr,
    advertise: &str,
    certs_dir: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Option<DataKeys>, ControllerError> {
    let certs = NodeCerts::load_if_present(certs_dir)
        .map_err(|e| ControllerError::Config(format!("locked: {e}")))?
        .ok_or_else(|| {
            ControllerError::Config(
                "locked: the keyring is wrapped (autolock) but there is no node certificate \
                 to serve `rctl cluster unlock` with"
                    .into(),
            )
        })?;
    error!(
        "locked: run `rctl cluster unlock --controller {advertise}` with the cluster's unlock \
         key (autolock is on: this controller's keyring is wrapped); serving nothing else"
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel::<DataKeys>(1);
    let api = Arc::new(LockApi {
        certs_dir: certs_dir.to_owned(),
        done: tx,
        busy: Mutex::new(()),
    });
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .tls_config(tls::server_tls(&certs))?
        .add_service(InterceptedService::new(
            LockServer::from_arc(api),
            tls::guard(
                Arc::new(certs.ca().clone()),
                &[crate::ca::Role::Admin],
                "Lock",
            ),
        ))
        .add_service(Refuse::<ControlName>::default())
        .add_service(Refuse::<ClusterName>::default())
        .add_service(Refuse::<DispatcherName>::default())
        .add_service(Refuse::<RaftPeerName>::default())
        .add_service(Refuse::<RegistryGcName>::default())
        .serve_with_shutdown(listen, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(server);
    let keys = tokio::select! {
        k = rx.recv() => k,
        _ = shutdown => None,
    };
    let _ = stop_tx.send(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ControllerError::Config(format!("locked: server task: {e}"))),
    }
    if keys.is_some() {
        info!("unlocked: the keyring is open; starting");
    }
    Ok(keys)
}

struct LockApi {
    certs_dir: PathBuf,
    done: tokio::sync::mpsc::Sender<DataKeys>,
    /// One unlock attempt at a time.
    busy: Mutex<()>,
}

#[tonic::async_trait]
impl Lock for LockApi {
    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let key = UnlockKey::parse(&req.into_inner().unlock_key)
            .map_err(|e| Status::invalid_argument(format!("unlock: {e}")))?;
        let keys = {
            let _one = self.busy.lock().expect("unlock lock");
            DataKeys::load_or_create_with(&self.certs_dir, Some(key))
        };
        match keys {
            Ok(keys) => {
                self.done
                    .send(keys)
                    .await
                    .map_err(|_| Status::unavailable("unlock: already unlocked"))?;
                Ok(Response::new(UnlockResponse {}))
            }
            Err(e @ CryptError::WrongUnlockKey(_)) => {
                warn!(%e, "unlock refused: a wrong unlock key");
                Err(Status::permission_denied(
                    "unlock: refused: that unlock key does not open this controller's keyring \
                     (a wrong or rotated key); it stays locked",
                ))
            }
            Err(e) => Err(Status::internal(format!("unlock: {e}"))),
        }
    }
}

/// Names of the services a locked controller refuses.
pub trait ServiceName {
    const NAME: &'static str;
}
macro_rules! names {
    ($($t:ident = $n:literal),*) => {$(
        #[derive(Clone, Copy, Default)]
        pub struct $t;
        impl ServiceName for $t {
            const NAME: &'static str = $n;
        }
    )*};
}
names!(
    ControlName = "rudder.v1.Control",
    ClusterName = "rudder.v1.Cluster",
    DispatcherName = "rudder.v1.Dispatcher",
    RaftPeerName = "rudder.v1.RaftPeer",
    RegistryGcName = "rudder.v1.RegistryGc"
);

/// Answers every call of service `N` with [`LOCKED_MSG`].
#[derive(Clone, Copy, Default)]
pub struct Refuse<N>(PhantomData<N>);

impl<N: ServiceName> NamedService for Refuse<N> {
    const NAME: &'static str = N::NAME;
}

impl<N, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Refuse<N> {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<B>) -> Self::Future {
        std::future::ready(Ok(Status::failed_precondition(LOCKED_MSG).into_http()))
    }
}
