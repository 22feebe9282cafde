//! `rctl apply -f FILE…`: declarative and idempotent. Every file is parsed and validated before
//! anything is sent, so a bad file changes nothing.

use std::path::PathBuf;

use rudder_model::manifest::{self, Manifest};
use rudder_proto::v1::ApplyRequest;

use crate::context::Context;

pub async fn run(ctx: &Context, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut specs = Vec::new();
    for f in files {
        let (name, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            ("<stdin>".to_string(), s)
        } else {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            (f.display().to_string(), text)
        };
        for m in manifest::parse(&name, &text)? {
            match m {
                Manifest::Service(s) => specs.push(serde_json::to_string(&s)?),
            }
        }
    }
    if specs.is_empty() {
        anyhow::bail!("nothing to apply: the files hold no documents");
    }
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .apply(ApplyRequest {
            service_specs_json: specs,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    for r in resp.results {
        println!("{}/{} {}", r.kind.to_lowercase(), r.name, r.action);
    }
    Ok(())
}
