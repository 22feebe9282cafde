//! Joining a cluster with a token: dial a controller over TLS that accepts it only if its chain
//! carries the CA the token pins, send a CSR with the token, and check the CA that comes back
//! against the pin as well. Used by agents and by joining controllers.

use std::time::Duration;

use rudder_proto::v1::cluster_client::ClusterClient;
use rudder_proto::v1::JoinRequest;
use tonic::transport::Endpoint;
use tracing::info;

use crate::ca::{self, Role, Token};
use crate::tls::{self, NodeCerts};

/// Why a node could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The join token is malformed, for another cluster, or refused.
    #[error("join token: {0}")]
    Token(#[from] ca::TokenError),
    /// A key, CSR or certificate could not be made or checked.
    #[error("{0}")]
    Ca(#[from] ca::CaError),
    /// The node's TLS files could not be written or used.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// The controller refused the join.
    #[error("joining via {addr}: {msg}")]
    Refused {
        /// The controller asked.
        addr: String,
        /// Its answer.
        msg: String,
    },
}

/// Joins the cluster of the controller at `url` (`https://host:port`) with `token`, returning
/// a fresh key and the certificate for the role the token grants.
pub async fn join_cluster(url: &str, token: &str, node_id: &str) -> Result<NodeCerts, JoinError> {
    join_with(url, token, node_id, None, None)
        .await
        .map(|(certs, _)| certs)
}

/// [`join_cluster`] asking for a certificate of `role` rather than the token's own: an agent
/// asks for [`Role::Worker`] whatever token its host joined with, because controllers dial
/// agents as workers. The cluster refuses a role above the token's. Also returns the role the
/// token admits (the certificate's, from a controller too old to say).
pub async fn join_cluster_as(
    url: &str,
    token: &str,
    node_id: &str,
    role: Role,
) -> Result<(NodeCerts, Role), JoinError> {
    join_with(url, token, node_id, None, Some(role)).await
}

/// Re-admission of a node whose certificate expired (it was off longer than the certificate's
/// lifetime): a join token plus proof that it holds the key of its `previous` certificate,
/// so that it keeps its node id. Its key is replaced at the next renewal.
pub async fn rejoin_cluster(
    url: &str,
    token: &str,
    previous: &NodeCerts,
) -> Result<NodeCerts, JoinError> {
    // The node keeps the role it had, whichever token re-admits it.
    let names = previous.names()?;
    join_with(url, token, &names.node, Some(previous), Some(names.role))
        .await
        .map(|(certs, _)| certs)
}

async fn join_with(
    url: &str,
    token: &str,
    node_id: &str,
    previous: Option<&NodeCerts>,
    role: Option<Role>,
) -> Result<(NodeCerts, Role), JoinError> {
    let parsed = Token::parse(token)?;
    let err = |msg: String| JoinError::Refused {
        addr: url.to_string(),
        msg,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(2));
    let endpoint = tls::join_endpoint(endpoint, &parsed)?;
    let channel = endpoint.connect().await.map_err(|e| err(e.to_string()))?;
    let (key, csr, previous_cert_pem) = match previous {
        Some(p) => (
            p.key_pem().to_string(),
            ca::node_csr_with_key(node_id, p.key_pem())?,
            p.cert_pem().to_string(),
        ),
        None => {
            let (key, csr) = ca::node_csr(node_id)?;
            (key, csr, String::new())
        }
    };
    let reply = ClusterClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr_pem: csr,
            node_id: node_id.to_string(),
            previous_cert_pem,
            role: match role {
                None | Some(Role::Admin) => rudder_proto::v1::NodeRole::Unspecified,
                Some(Role::Worker) => rudder_proto::v1::NodeRole::Worker,
                Some(Role::Manager) => rudder_proto::v1::NodeRole::Manager,
            }
            .into(),
        })
        .await
        .map_err(|s| err(s.message().to_string()))?
        .into_inner();
    ca::verify_ca_pin(&reply.ca_pem, &parsed.fingerprint)?;
    let certs = NodeCerts::new(&reply.ca_pem, &reply.cert_pem, &key, None)?;
    let role = rudder_proto::v1::NodeRole::try_from(reply.role);
    info!(?role, via = url, "joined the cluster: certificate issued");
    let token_role = match rudder_proto::v1::NodeRole::try_from(reply.token_role) {
        Ok(rudder_proto::v1::NodeRole::Manager) => Role::Manager,
        Ok(rudder_proto::v1::NodeRole::Worker) => Role::Worker,
        _ => certs.names()?.role,
    };
    Ok((certs, token_role))
}
