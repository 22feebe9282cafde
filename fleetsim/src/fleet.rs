//! The hollow fleet: `n` [`HollowHost`]s in this process, each joined with the worker token
//! (its own key, CSR and node certificate, as a real agent's first start) and each with its
//! own session to the leader. Hosts can be cut off and brought back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::{self, StreamExt as _};
use rudder_agent::hollow::{Behaviour, HollowHost, HostSpec};

/// Joins done at once (each is a key generation, a TLS handshake and a signature).
const JOIN_PARALLELISM: usize = 16;
/// Each host's capacity: big enough that the scheduler never runs out.
const HOST_CPUS_MILLI: u64 = 256_000;
const HOST_MEMORY: u64 = 1 << 40;

/// The fleet.
pub struct Fleet {
    /// The hosts, `sim-00000` first.
    pub hosts: Vec<HollowHost>,
}

/// The node id of host `i` (16 hex digits, as agents make them).
pub fn node_id(i: usize) -> String {
    format!("f1ee75e0{i:08x}")
}

impl Fleet {
    /// Joins `n` hosts through `controllers` with `token`, then opens their sessions.
    pub async fn join(
        n: usize,
        controllers: &[String],
        token: &str,
        behaviour: &Behaviour,
        dir: &Path,
    ) -> anyhow::Result<Fleet> {
        let controllers = Arc::new(controllers.to_vec());
        let joined: Vec<anyhow::Result<HollowHost>> = stream::iter(0..n)
            .map(|i| {
                let controllers = controllers.clone();
                let token = token.to_string();
                let mut behaviour = behaviour.clone();
                behaviour.seed = behaviour.seed.wrapping_add(i as u64);
                let dir = dir.join(format!("h{i}"));
                async move {
                    let id = node_id(i);
                    let certs = join_one(&controllers, &token, &id).await?;
                    let spec = HostSpec {
                        node_id: id,
                        hostname: format!("sim-{i:05}"),
                        addr: host_addr(i),
                        cpus_milli: HOST_CPUS_MILLI,
                        memory_bytes: HOST_MEMORY,
                    };
                    let host = HollowHost::new(spec, certs, controllers.to_vec(), behaviour, &dir);
                    host.connect();
                    Ok(host)
                }
            })
            .buffered(JOIN_PARALLELISM)
            .collect()
            .await;
        let hosts = joined.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Fleet { hosts })
    }
}

/// Host `i`'s address: one loopback address per host, as the controllers want one address
/// per node (the overlay's endpoint). Nothing listens there: controllers dial it only for
/// logs, exec and copies, which the simulator does not use.
pub fn host_addr(i: usize) -> String {
    let j = i + 1;
    format!(
        "127.{}.{}.{}:4245",
        100 + (j >> 16),
        (j >> 8) & 255,
        j & 255
    )
}

/// Joins one host, trying each controller in turn for a while (the group may still be
/// settling its leader).
async fn join_one(
    controllers: &[String],
    token: &str,
    node_id: &str,
) -> anyhow::Result<rudder_pki::tls::NodeCerts> {
    let mut last = String::new();
    for _ in 0..40 {
        for url in controllers {
            let url = url.replacen("http://", "https://", 1);
            match rudder_pki::join::join_cluster(&url, token, node_id).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(anyhow::anyhow!(last)).with_context(|| format!("fleetsim: joining host {node_id}"))
}
