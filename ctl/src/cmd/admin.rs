//! The admin's own identity (audit H5): `rctl` renews the context's admin certificate before it
//! runs out, `rctl cluster admin-cert NAME` issues further admin identities (each its own
//! certificate, revocable on its own with `rctl cluster revoke-admin NAME`), and the same
//! command with `--ca-dir` recovers a cluster whose every admin certificate expired, on a
//! manager host that keeps the CA key.
//!
//! Invariants:
//! - Keys are made here and never leave this machine; the CA sees a CSR.
//! - Key files are written 0600 (in 0700 directories when this creates them), by a temporary
//!   file renamed over the old one, so a crash never leaves half a key.
//! - Renewal happens at two thirds of the certificate's lifetime, on the next command that
//!   talks to a controller; a failure is a warning until the certificate is really expired.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rudder_pki::ca::{self, ClusterCa, Role};
use rudder_proto::v1::cluster_client::ClusterClient;
use rudder_proto::v1::{AdminCertRequest, RenewRequest};
use tonic::transport::Channel;

use crate::context::{self, Context};

/// Renew when less than this share of the lifetime is left.
const RENEW_REMAINING: f64 = 1.0 / 3.0;
/// Warn when a certificate has less than this left.
pub const WARN_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// Whether a certificate valid from `nb` to `na` is due for renewal at `now`.
pub fn renewal_due(nb: SystemTime, na: SystemTime, now: SystemTime) -> bool {
    let start = (nb + ca::CLOCK_SKEW).min(na);
    let lifetime = na.duration_since(start).unwrap_or_default();
    let left = na.duration_since(now).unwrap_or_default();
    left.as_secs_f64() < lifetime.as_secs_f64() * RENEW_REMAINING
}

/// Refuses early, with what to do, when the context's admin certificate has expired: the TLS
/// handshake would only say "certificate expired".
pub fn check_not_expired(ctx: &Context) -> anyhow::Result<()> {
    let (Some(cert), Some(creds)) = (&ctx.cert, ctx.credentials()?) else {
        return Ok(());
    };
    let (_, na) = ca::cert_validity(&creds.cert)?;
    if SystemTime::now() > na {
        anyhow::bail!(
            "the admin certificate {} expired {} ago: get a new identity from another admin \
             (`rctl cluster admin-cert NAME`), or on a manager host with \
             `rctl cluster admin-cert NAME --ca-dir <controller data dir>/certs`",
            cert.display(),
            crate::cmd::human_duration(SystemTime::now().duration_since(na).unwrap_or_default())
        );
    }
    Ok(())
}

/// Renews the context's admin certificate over `channel` when it is due; says so on stderr.
pub async fn renew_if_due(ctx: &Context, channel: Channel) -> anyhow::Result<()> {
    let (Some(cert_path), Some(key_path), Some(creds)) = (&ctx.cert, &ctx.key, ctx.credentials()?)
    else {
        return Ok(());
    };
    let (nb, na) = ca::cert_validity(&creds.cert)?;
    if !renewal_due(nb, na, SystemTime::now()) {
        return Ok(());
    }
    // One renewal at a time for these files: a second rctl started meanwhile keeps using the
    // still valid certificate (a race could otherwise pair one run's key with another's
    // certificate and lock the admin out).
    let lock_path = cert_path.with_extension("renew.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", lock_path.display()))?;
    let Ok(_held) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        return Ok(());
    };
    // Renewed by the run that held the lock before: nothing to do.
    let current = std::fs::read_to_string(cert_path)?;
    if current != creds.cert {
        return Ok(());
    }
    let who = rudder_pki::tls::NodeCerts::new(&creds.ca, &creds.cert, &creds.key, None)?.names()?;
    let (key, csr) = ca::node_csr(&who.node)?;
    let renewed = ClusterClient::new(channel)
        .renew(RenewRequest { csr_pem: csr })
        .await
        .map_err(|s| anyhow::anyhow!("renewing the admin certificate: {}", s.message()))?
        .into_inner();
    // The key first: a certificate without its key would lock this context out.
    write_private(key_path, key.as_bytes(), 0o600)?;
    write_private(cert_path, renewed.cert_pem.as_bytes(), 0o644)?;
    let (_, until) = ca::cert_validity(&renewed.cert_pem)?;
    eprintln!(
        "renewed the admin certificate {} ({}), valid for {}",
        cert_path.display(),
        who.node,
        crate::cmd::human_duration(until.duration_since(SystemTime::now()).unwrap_or_default())
    );
    Ok(())
}

/// Where `admin-cert` puts a new identity: `DIR/NAME.pem`, `DIR/NAME-key.pem`, `DIR/ca.pem`,
/// and `DIR/NAME.context.json` for `rctl --context`.
pub struct Issued {
    pub context: PathBuf,
}

/// `rctl cluster admin-cert NAME [--ttl T] [--out DIR] [--ca-dir D]`.
pub async fn admin_cert(
    ctx: Option<&Context>,
    name: &str,
    ttl: Option<&str>,
    out: &Path,
    ca_dir: Option<&Path>,
) -> anyhow::Result<Issued> {
    let ttl = match ttl {
        None => None,
        Some(t) => Some(Duration::from_millis(
            rudder_model::duration::parse(t).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?,
        )),
    };
    let (key, csr) = ca::node_csr(name)?;
    let (cert, ca_pem) = match ca_dir {
        // Offline recovery on a manager host: the CA key file signs directly.
        Some(dir) => {
            // A controller keeps its CA key sealed with its data key (`ca-key.sealed` and
            // `raft-dek` beside it); an older one kept `ca-key.pem`.
            let ca = match rudder_pki::crypt::load_sealed_ca(dir) {
                Ok(Some(ca)) => ca,
                Ok(None) => ClusterCa::load(dir).map_err(|e| {
                    anyhow::anyhow!(
                        "--ca-dir {}: {e} (the first controller keeps ca.pem and the sealed \
                         ca-key.sealed with its raft-dek in <data dir>/certs)",
                        dir.display()
                    )
                })?,
                Err(e) => anyhow::bail!("--ca-dir {}: {e}", dir.display()),
            };
            let ttl = ttl.unwrap_or(Duration::from_secs(90 * 24 * 3600));
            let cert = ca.issue(&csr, Role::Admin, name, SystemTime::now(), ttl)?;
            (cert, ca.cert_pem().to_string())
        }
        None => {
            let ctx = ctx.ok_or_else(|| anyhow::anyhow!("no context to ask a controller with"))?;
            let r = ClusterClient::new(crate::channel(ctx).await?)
                .admin_cert(AdminCertRequest {
                    name: name.to_string(),
                    csr_pem: csr,
                    ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
                    revoke: false,
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            (r.cert_pem, r.ca_pem)
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let (cert_path, key_path, ca_path) = (
        out.join(format!("{name}.pem")),
        out.join(format!("{name}-key.pem")),
        out.join("ca.pem"),
    );
    write_private(&key_path, key.as_bytes(), 0o600)?;
    write_private(&cert_path, cert.as_bytes(), 0o644)?;
    write_private(&ca_path, ca_pem.as_bytes(), 0o644)?;
    let base = ctx.cloned().unwrap_or(Context {
        name: String::new(),
        controller: String::new(),
        controllers: vec![],
        registry: String::new(),
        ca: None,
        cert: None,
        key: None,
    });
    let new_ctx = Context {
        name: name.to_string(),
        ca: Some(ca_path),
        cert: Some(cert_path),
        key: Some(key_path),
        ..base
    };
    let context = out.join(format!("{name}.context.json"));
    context::save(&context, &new_ctx)?;
    std::fs::set_permissions(&context, std::fs::Permissions::from_mode(0o600))?;
    Ok(Issued { context })
}

/// `rctl cluster revoke-admin NAME`: the identity is refused at its next request, everywhere.
pub async fn revoke_admin(ctx: &Context, name: &str) -> anyhow::Result<()> {
    ClusterClient::new(crate::channel(ctx).await?)
        .admin_cert(AdminCertRequest {
            name: name.to_string(),
            csr_pem: String::new(),
            ttl_seconds: 0,
            revoke: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("{name}: revoked; its certificates are refused from now on");
    Ok(())
}

/// Writes `data` to `path` with `mode`, by a temporary file renamed over it.
fn write_private(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    ca::write_atomic(path, data, mode)?;
    // `write_atomic` creates with `mode`, but an existing file renamed over keeps the new one;
    // set it anyway in case the umask took bits away.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn renewal_is_due_in_the_last_third() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let nb = t0 - ca::CLOCK_SKEW;
        let na = t0 + 90 * DAY;
        assert!(!renewal_due(nb, na, t0));
        assert!(!renewal_due(nb, na, t0 + 59 * DAY));
        assert!(renewal_due(nb, na, t0 + 61 * DAY));
        assert!(renewal_due(nb, na, t0 + 91 * DAY));
    }

    #[tokio::test]
    async fn offline_admin_cert_from_a_ca_dir_makes_a_private_context() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("t", SystemTime::now()).unwrap();
        let ca_dir = tmp.path().join("certs");
        std::fs::create_dir_all(&ca_dir).unwrap();
        ca.save(&ca_dir).unwrap();
        let out = tmp.path().join("ops");
        let got = admin_cert(None, "ops", Some("1h"), &out, Some(&ca_dir))
            .await
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("ops-key.pem")), 0o600);
        assert_eq!(mode(&got.context), 0o600);
        let ctx = context::load(&got.context).unwrap();
        let creds = ctx.credentials().unwrap().unwrap();
        let certs =
            rudder_pki::tls::NodeCerts::new(&creds.ca, &creds.cert, &creds.key, None).unwrap();
        let who = certs.names().unwrap();
        assert_eq!((who.role, who.node.as_str()), (Role::Admin, "ops"));
        assert!(who.not_after < SystemTime::now() + Duration::from_secs(3601));
    }
}
