//! `rctl image import ROOTFS.tar NAME:TAG` and `rctl image load FILE`: put images into the
//! cluster's registry without internet access. `rctl image tag SRC DST`, `push HOST/REPO:TAG`
//! and `pull HOST/REPO:TAG [--insecure]`: name images within the cluster registry and copy
//! them to and from any OCI registry (credentials from `rctl login`; see the section below).

use std::path::Path;

use rudder_image::archive::PushReport;
use rudder_image::{Reference, RegistryClient};

use crate::context::Context;
use crate::progress::during;

fn print(r: &PushReport) {
    println!(
        "{} {} ({} bytes uploaded in {} blobs, {} already present)",
        r.reference, r.manifest_digest, r.bytes_uploaded, r.blobs_uploaded, r.blobs_skipped
    );
}

/// A client for the cluster registry: mutual TLS with the context's admin certificate.
pub fn registry_client(ctx: &Context) -> anyhow::Result<RegistryClient> {
    Ok(match ctx.credentials()? {
        Some(c) => RegistryClient::with_tls(
            &ctx.registry,
            &rudder_image::ClientTls {
                ca_pem: c.ca,
                cert_pem: c.cert,
                key_pem: c.key,
                server_name: rudder_pki::ca::Role::Manager.server_name().to_string(),
            },
        )?,
        None => RegistryClient::new(&ctx.registry)?,
    })
}

pub async fn import(ctx: &Context, tar: &Path, name: &str) -> anyhow::Result<()> {
    let reference = Reference::parse(name)?;
    let client = registry_client(ctx)?;
    let label = format!("importing {}", tar.display());
    print(&during(label, rudder_image::import_rootfs(&client, tar, &reference)).await?);
    Ok(())
}

pub async fn load(ctx: &Context, file: &Path, tag: Option<&str>) -> anyhow::Result<()> {
    let client = registry_client(ctx)?;
    let default = tag.map(Reference::parse).transpose()?;
    let label = format!("loading {}", file.display());
    for r in during(
        label,
        rudder_image::load_archive(&client, file, default.as_ref()),
    )
    .await?
    {
        print(&r);
    }
    Ok(())
}

// ---- tag, push, pull: images between the cluster registry and any other ----
//
// Like docker: `rctl image tag SRC DST` names an image anew within the cluster registry (one
// namespace keyed by repository path; a registry host in DST is kept only in the name the user
// types, `10.0.0.9:5001/team/app:v1` is stored as `team/app:v1`), `rctl image push
// HOST/REPO:TAG` copies `REPO:TAG` from the cluster registry to HOST, and `rctl image pull
// HOST/REPO:TAG` copies it from HOST into the cluster registry as `REPO:TAG` (for a
// multi-platform image, this host's linux/<arch> one). rctl moves the bytes itself, streaming
// each blob the other side lacks; agents then pull from the cluster registry as for any image.

/// `N bytes in K blobs, M already there`.
fn transfer_summary(r: &rudder_image::TransferReport) -> String {
    format!(
        "{} bytes in {} blobs, {} already there",
        r.bytes, r.blobs_moved, r.blobs_skipped
    )
}

/// Rewords errors from a registry outside the cluster into what the user can do about them:
/// log in, or pass `--insecure` to a registry that speaks plain HTTP.
pub fn explain_remote(err: rudder_image::ImageError, host: &str, insecure: bool) -> anyhow::Error {
    use rudder_image::{AuthError, ImageError};
    match err {
        ImageError::Auth(AuthError::Failed { .. }) => {
            anyhow::anyhow!("{host}: authentication failed (run rctl login {host})")
        }
        ImageError::Auth(AuthError::Required { .. }) => {
            anyhow::anyhow!("{host}: authentication required (run rctl login {host})")
        }
        ImageError::Tls { detail, .. } if !insecure => {
            anyhow::anyhow!("{host}: tls {detail}; if {host} serves plain http, pass --insecure")
        }
        e => e.into(),
    }
}

/// A client for the registry `host` names, with the credentials `rctl login` stored for it.
fn remote_client(host: &str, insecure: bool) -> anyhow::Result<RegistryClient> {
    let credentials = super::login::stored_credentials(host)?;
    let dial = if is_docker_hub(host) {
        DOCKER_HUB_API
    } else {
        host
    };
    Ok(RegistryClient::remote(dial, insecure, credentials)?)
}

/// Where `docker.io` names are served from (the name itself serves only a website).
const DOCKER_HUB_API: &str = "registry-1.docker.io";

fn is_docker_hub(host: &str) -> bool {
    matches!(host, "docker.io" | "index.docker.io")
}

/// The reference as the remote registry names it: on Docker Hub, one-component names are
/// official images under `library/` (`docker.io/busybox` is `library/busybox` there), as
/// docker does it.
fn remote_name(reference: &Reference) -> Reference {
    let mut r = reference.clone();
    if r.registry.as_deref().is_some_and(is_docker_hub) && !r.repository.contains('/') {
        r.repository = format!("library/{}", r.repository);
    }
    r
}

/// The reference with the registry host dropped: how the cluster registry names it.
fn in_cluster(reference: &Reference) -> Reference {
    Reference {
        registry: None,
        ..reference.clone()
    }
}

pub async fn tag(ctx: &Context, src: &str, dst: &str) -> anyhow::Result<()> {
    let src_ref = in_cluster(&Reference::parse(src)?);
    let dst_ref = in_cluster(&Reference::parse(dst)?);
    anyhow::ensure!(
        dst_ref.digest.is_none(),
        "tag {dst}: the new name needs a tag, not a digest"
    );
    let cluster = registry_client(ctx)?;
    let r = during(
        format!("tagging {}", dst_ref.short()),
        rudder_image::copy_image(
            &cluster,
            &src_ref,
            &cluster,
            &dst_ref,
            rudder_image::CopyOptions::default(),
        ),
    )
    .await
    .map_err(|e| match e {
        rudder_image::TransferError::Source(e) if e.is_not_found() => {
            anyhow::anyhow!("image {src} not found in the cluster registry")
        }
        e => e.into(),
    })?;
    println!(
        "{} {} (tagged from {})",
        dst_ref.short(),
        r.digest,
        src_ref.short()
    );
    Ok(())
}

pub async fn push(ctx: &Context, reference: &str, insecure: bool) -> anyhow::Result<()> {
    let target = Reference::parse(reference)?;
    let Some(host) = target.registry.clone() else {
        anyhow::bail!(
            "push {reference}: name the registry to push to, e.g. 10.0.0.9:5001/{} \
             (rctl image tag {} HOST/{} first)",
            target.short(),
            target.short(),
            target.short()
        );
    };
    anyhow::ensure!(
        target.digest.is_none(),
        "push {reference}: push a tag, not a digest"
    );
    let cluster = registry_client(ctx)?;
    let remote = remote_client(&host, insecure)?;
    let local = in_cluster(&target);
    let remote_ref = remote_name(&target);
    // The source manifest is read before the target is contacted at all.
    let r = during(
        format!("pushing {target}"),
        rudder_image::copy_image(
            &cluster,
            &local,
            &remote,
            &remote_ref,
            rudder_image::CopyOptions::default(),
        ),
    )
    .await
    .map_err(|e| match e {
        rudder_image::TransferError::Source(e) if e.is_not_found() => {
            anyhow::anyhow!("image {reference} not found in the cluster registry")
        }
        rudder_image::TransferError::Destination(e) => explain_remote(e, &host, insecure),
        e => e.into(),
    })?;
    println!("pushed {target} {} ({})", r.digest, transfer_summary(&r));
    Ok(())
}

pub async fn pull(ctx: &Context, reference: &str, insecure: bool) -> anyhow::Result<()> {
    let source = Reference::parse(reference)?;
    let Some(host) = source.registry.clone() else {
        anyhow::bail!(
            "pull {reference}: name the registry to pull from, e.g. 10.0.0.9:5001/{}",
            source.short()
        );
    };
    let remote = remote_client(&host, insecure)?;
    let cluster = registry_client(ctx)?;
    // Pinned by digest: stored under the tag it was named with, else `latest`.
    let mut local = in_cluster(&source);
    if local.digest.is_some() {
        local = local.with_tag(
            source
                .tag
                .as_deref()
                .unwrap_or(rudder_image::reference::DEFAULT_TAG),
        )?;
    }
    let r = during(
        format!("pulling {source}"),
        rudder_image::copy_image(
            &remote,
            &remote_name(&source),
            &cluster,
            &local,
            rudder_image::CopyOptions {
                pick_platform: true,
            },
        ),
    )
    .await
    .map_err(|e| match e {
        rudder_image::TransferError::Source(e) if e.is_not_found() => {
            let what = match (&source.digest, &source.tag) {
                (Some(d), _) => format!("manifest {d} not found"),
                (None, Some(t)) => format!("tag {t} not found"),
                (None, None) => "not found".to_string(),
            };
            anyhow::anyhow!("pull {reference}: manifest unknown ({what})")
        }
        rudder_image::TransferError::Source(e) => explain_remote(e, &host, insecure),
        e => e.into(),
    })?;
    println!(
        "pulled {source} as {} {} ({})",
        local.short(),
        r.digest,
        transfer_summary(&r)
    );
    Ok(())
}

#[cfg(test)]
mod transfer_tests {
    use super::*;

    #[test]
    fn names_on_each_side() {
        let r = Reference::parse("10.0.0.9:5001/team/app:v1").unwrap();
        assert_eq!(in_cluster(&r).to_string(), "team/app:v1");
        assert_eq!(remote_name(&r), r);
        let hub = Reference::parse("docker.io/busybox:1.36").unwrap();
        assert_eq!(remote_name(&hub).repository, "library/busybox");
        assert_eq!(in_cluster(&hub).to_string(), "busybox:1.36");
        let org = Reference::parse("docker.io/bitnami/redis").unwrap();
        assert_eq!(remote_name(&org).repository, "bitnami/redis");
    }

    #[test]
    fn remote_errors_say_what_to_do() {
        use rudder_image::{AuthError, ImageError};
        let failed = ImageError::Auth(AuthError::Failed {
            registry: "http://r:5000".into(),
        });
        assert_eq!(
            explain_remote(failed, "r:5000", true).to_string(),
            "r:5000: authentication failed (run rctl login r:5000)"
        );
        let tls = || ImageError::Tls {
            registry: "https://r:5000".into(),
            detail: "handshake failed: x".into(),
        };
        let hinted = explain_remote(tls(), "r:5000", false).to_string();
        assert!(hinted.ends_with("pass --insecure"), "{hinted}");
        let plain = explain_remote(tls(), "r:5000", true).to_string();
        assert!(!plain.contains("--insecure"), "{plain}");
    }
}
