//! `rctl cluster join-token worker|manager [--rotate]`: the token a new host joins with (the
//! token pins the cluster CA; rotating makes the old one useless for new joins).
//! `rctl cluster info`: the controller group as the controller asked sees it (like the MANAGER
//! STATUS column of `docker node ls`): who leads, the term, each member and its addresses.
//! `rctl cluster rotate-data-key`: a new data-encryption key on each controller in turn (each
//! has its own; the RPC rotates the key of the controller asked).

use rudder_proto::v1::cluster_client::ClusterClient;
use rudder_proto::v1::{
    ClusterInfoRequest, JoinTokenRequest, RemoveManagerRequest, RotateDataKeyRequest,
    SetManagerRoleRequest,
};

use crate::context::Context;
use crate::output::{self, OutputFormat};

pub async fn info(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let i = client
        .cluster_info(ClusterInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    // Each controller says its own version: asked one by one (an unreachable one shows none).
    let mut versions = Vec::with_capacity(i.managers.len());
    for m in &i.managers {
        versions.push(if m.raft_id == i.raft_id {
            i.version.clone()
        } else {
            controller_version(ctx, &m.addr).await.unwrap_or_default()
        });
    }
    let managers: Vec<_> = i
        .managers
        .iter()
        .zip(&versions)
        .map(|(m, version)| {
            serde_json::json!({
                "raft_id": m.raft_id, "addr": m.addr, "registry": m.registry,
                "voter": m.voter, "leader": m.leader, "version": version,
            })
        })
        .collect();
    let v = serde_json::json!({
        "raft_id": i.raft_id, "leader_id": i.leader_id, "term": i.term,
        "applied": i.applied, "registry": i.registry, "managers": managers,
        "version": i.version,
    });
    output::print(output, &v, |w| {
        writeln!(
            w,
            "asked controller {} (term {}, applied {})",
            i.raft_id, i.term, i.applied
        )?;
        if i.leader_id == 0 {
            writeln!(
                w,
                "no leader: a majority of the controllers cannot be reached"
            )?;
        }
        let rows: Vec<Vec<String>> = i
            .managers
            .iter()
            .zip(&versions)
            .map(|(m, version)| {
                let status = match (m.leader, m.voter) {
                    (true, _) => "leader",
                    (false, true) => "voter",
                    (false, false) => "learner",
                };
                vec![
                    m.raft_id.to_string(),
                    m.addr.clone(),
                    m.registry.clone(),
                    status.to_string(),
                    super::node::version_cell(version),
                ]
            })
            .collect();
        output::write_table(
            w,
            &["ID", "ADDRESS", "REGISTRY", "STATUS", "VERSION"],
            &rows,
        )
    })
}

/// The version the controller at `addr` (`host:port`) reports, `None` when it cannot be asked
/// within a few seconds (down, or too old to report one).
async fn controller_version(ctx: &Context, addr: &str) -> Option<String> {
    let mut one = ctx.clone();
    one.controllers = vec![addr.to_string()];
    one.controller = addr.to_string();
    let ask = async {
        crate::connect(&one)
            .await
            .ok()?
            .cluster_info(ClusterInfoRequest {})
            .await
            .ok()
            .map(|r| r.into_inner().version)
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), ask)
        .await
        .ok()
        .flatten()
}

pub async fn join_token(
    ctx: &Context,
    role: &str,
    rotate: bool,
    ttl: Option<&str>,
    quiet: bool,
) -> anyhow::Result<()> {
    let ttl_seconds = match ttl {
        None => 0,
        Some(_) if !rotate => anyhow::bail!("--ttl applies to a new token: use it with --rotate"),
        Some(t) => rudder_model::duration::parse(t)
            .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
            .div_ceil(1000)
            .max(1),
    };
    let mut client = ClusterClient::new(crate::channel(ctx).await?);
    let token = client
        .join_token(JoinTokenRequest {
            role: match role {
                "manager" => rudder_proto::v1::NodeRole::Manager,
                _ => rudder_proto::v1::NodeRole::Worker,
            }
            .into(),
            rotate,
            ttl_seconds,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .token;
    if quiet {
        println!("{token}");
        return Ok(());
    }
    if rotate {
        println!("Rotated the {role} join token; the previous one no longer admits new hosts.");
    }
    // The token goes in the environment: a command line is readable by every local user
    // (`/proc/<pid>/cmdline`) for as long as the process runs.
    let command = if role == "manager" {
        "rudder-controller --join CONTROLLER:4243"
    } else {
        "rudder-agent --controller https://CONTROLLER:4243"
    };
    println!(
        "To add a {role} to this cluster, run on the new host:\n\n    RUDDER_JOIN_TOKEN={token} {command}\n"
    );
    Ok(())
}

/// `rctl node promote|demote NODE`: the controller on NODE votes, or only replicates.
pub async fn set_voter(ctx: &Context, node: &str, voter: bool) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    client
        .set_manager_role(SetManagerRoleRequest {
            node: node.to_string(),
            voter,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!(
        "{node}: {}",
        if voter {
            "promoted: its controller votes (a host without one starts a controller that \
             joins; `rctl cluster info` lists it once it has)"
        } else {
            "demoted: its controller replicates but does not vote"
        }
    );
    Ok(())
}

/// `rctl cluster rm-manager RAFT_ID`.
/// The removed controller's address leaves the context file (`context_file`, when the context
/// came from one): its certificate is revoked, but a copy of it could still answer there, and
/// rctl would hand it the admin's requests.
pub async fn remove_manager(
    ctx: &Context,
    raft_id: u64,
    context_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let before = client
        .cluster_info(ClusterInfoRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    client
        .remove_manager(RemoveManagerRequest { raft_id })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("controller {raft_id} removed from the group; its certificates are revoked");
    let addr = before
        .managers
        .iter()
        .find(|m| m.raft_id == raft_id)
        .map(|m| m.addr.clone());
    if let (Some(addr), Some(path)) = (addr, context_file) {
        if let Ok(mut saved) = crate::context::load(path) {
            if crate::context::forget_controller(&mut saved, &addr) {
                crate::context::save(path, &saved)?;
                println!("{addr} removed from the context {}", path.display());
            }
        }
    }
    Ok(())
}

/// `rctl cluster rotate-data-key [--no-wait]`: asks every controller of the group (from
/// `cluster info`) to rotate its own data key; with `wait`, each answers once its old records
/// are re-encrypted and its old key deleted. Fails naming the controllers that did not rotate.
pub async fn rotate_data_key(ctx: &Context, wait: bool) -> anyhow::Result<()> {
    let info = crate::connect(ctx)
        .await?
        .cluster_info(ClusterInfoRequest {})
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut failed = Vec::new();
    for m in &info.managers {
        let url = format!("http://{}", m.addr);
        let one = Context {
            controller: url.clone(),
            controllers: vec![url],
            ..ctx.clone()
        };
        let r = async {
            crate::connect(&one)
                .await?
                .rotate_data_key(RotateDataKeyRequest { wait })
                .await
                .map_err(crate::status_err)
                .map(|r| r.into_inner())
        }
        .await;
        match r {
            Ok(r) if r.old_key_deleted => println!(
                "controller {}: data key {} in use; every record re-encrypted, the old key deleted",
                r.raft_id, r.key_id
            ),
            Ok(r) => println!(
                "controller {}: data key {} in use; re-encrypting the old records in the background",
                r.raft_id, r.key_id
            ),
            Err(e) => {
                eprintln!("controller {} ({}): {e}", m.raft_id, m.addr);
                failed.push(m.raft_id.to_string());
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "rotate-data-key: controllers {} did not rotate; run it again once they are up",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `rctl cluster autolock on|off`: on prints the unlock key once.
pub async fn autolock(ctx: &Context, on: bool) -> anyhow::Result<()> {
    let key = crate::connect(ctx)
        .await?
        .set_autolock(rudder_proto::v1::SetAutolockRequest { on })
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .unlock_key;
    if on {
        eprintln!(
            "autolock is on. Keep this unlock key safe: a restarted controller stays locked \
             until `rctl cluster unlock --controller <its address>` is given it."
        );
        println!("{key}");
    } else {
        eprintln!("autolock is off: controllers keep their keyrings unwrapped");
    }
    Ok(())
}

/// `rctl cluster unlock-key [--rotate]`.
pub async fn unlock_key(ctx: &Context, rotate: bool, quiet: bool) -> anyhow::Result<()> {
    let key = crate::connect(ctx)
        .await?
        .unlock_key(rudder_proto::v1::UnlockKeyRequest { rotate })
        .await
        .map_err(crate::status_err)?
        .into_inner()
        .unlock_key;
    if !quiet && rotate {
        eprintln!("new unlock key (the old one no longer unlocks any controller); keep it safe:");
    }
    println!("{key}");
    Ok(())
}

/// Largest unlock key input read (a key is 71 characters).
const MAX_UNLOCK_INPUT: u64 = 1024;

/// `rctl cluster unlock [--key-file F]`: sends the unlock key to the (locked) controller of
/// the context (`--controller`).
pub async fn unlock(ctx: &Context, key_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::Read as _;
    let mut key = String::new();
    match key_file {
        Some(f) => {
            std::fs::File::open(f)
                .map_err(|e| anyhow::anyhow!("unlock: {}: {e}", f.display()))?
                .take(MAX_UNLOCK_INPUT)
                .read_to_string(&mut key)?;
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("unlock key: ");
            }
            std::io::stdin()
                .take(MAX_UNLOCK_INPUT)
                .read_to_string(&mut key)?;
        }
    }
    let key = key.trim().to_string();
    anyhow::ensure!(!key.is_empty(), "unlock: no unlock key given");
    let mut client = rudder_proto::v1::lock_client::LockClient::new(crate::channel(ctx).await?);
    client
        .unlock(rudder_proto::v1::UnlockRequest { unlock_key: key })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    eprintln!("unlocked {}: it is starting", ctx.controller);
    Ok(())
}

/// `rctl cluster backup FILE [--key-file K]`: a consistent, encrypted copy of the whole store
/// written to FILE (0600, atomically). Without `--key-file` a fresh key is made and printed once.
pub async fn backup(
    ctx: &Context,
    file: &std::path::Path,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use rudder_pki::backup::{self, BackupKey};
    let (key, fresh) = match key_file {
        Some(k) => (BackupKey::read_file(k)?, false),
        None => (BackupKey::generate()?, true),
    };
    let started = std::time::Instant::now();
    let mut client = crate::connect(ctx).await?;
    let mut stream = client
        .backup(rudder_proto::v1::BackupRequest {
            key: key.bytes().to_vec(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("backup: {}", s.message()))?
        .into_inner();
    let (mut data, mut index, mut total) = (Vec::new(), 0, 0);
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("backup: {}", s.message()))?
    {
        if data.is_empty() {
            (index, total) = (chunk.index, chunk.total);
            anyhow::ensure!(
                total <= backup::MAX_BACKUP,
                "backup: the controller offers {total} bytes, more than {} accepted",
                backup::MAX_BACKUP
            );
            data.reserve(total as usize);
        }
        data.extend_from_slice(&chunk.data);
        anyhow::ensure!(
            data.len() as u64 <= total,
            "backup: the controller sent more than the {total} bytes it announced"
        );
    }
    anyhow::ensure!(
        data.len() as u64 == total,
        "backup: the stream ended after {} of {total} bytes; nothing written",
        data.len()
    );
    // Check it opens before it replaces anything.
    backup::open(&key, data.clone())?;
    rudder_pki::ca::write_atomic(file, &data, 0o600)?;
    eprintln!(
        "backup of the store at raft index {index} written to {} ({total} bytes, {:.2}s)",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    if fresh {
        eprintln!(
            "keep this key apart from the file; restore with it in the environment:\n  \
             RUDDER_BACKUP_KEY=<key> rudder-controller --restore {} --data-dir <empty dir> ...",
            file.display()
        );
        println!("{}={}", backup::KEY_ENV, key.to_hex());
    }
    Ok(())
}
