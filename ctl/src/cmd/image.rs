//! `rctl image import ROOTFS.tar NAME:TAG` and `rctl image load FILE`: put images into the
//! cluster's registry without internet access.

use std::path::Path;

use rudder_image::archive::PushReport;
use rudder_image::{Reference, RegistryClient};

use crate::context::Context;

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
    print(&rudder_image::import_rootfs(&client, tar, &reference).await?);
    Ok(())
}

pub async fn load(ctx: &Context, file: &Path, tag: Option<&str>) -> anyhow::Result<()> {
    let client = registry_client(ctx)?;
    let default = tag.map(Reference::parse).transpose()?;
    for r in rudder_image::load_archive(&client, file, default.as_ref()).await? {
        print(&r);
    }
    Ok(())
}
