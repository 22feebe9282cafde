//! `rctl get KIND [-o table|json|yaml]`: one verb for every listing, with kubectl's singular,
//! plural and short names (`get svc`, `get node`, `get net`). Each kind prints what its own
//! listing prints (`rctl network ls`, `rctl ps`, ...); services are listed here.

use std::io::Write;

use rudder_proto::v1::ServiceSummary;

use crate::context::Context;
use crate::output::{self, OutputFormat};

/// What `rctl get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "node", alias = "no")]
    Nodes,
    #[value(alias = "task", alias = "ps")]
    Tasks,
    #[value(alias = "network", alias = "net")]
    Networks,
    #[value(alias = "volume", alias = "vol")]
    Volumes,
    #[value(alias = "secret")]
    Secrets,
    #[value(alias = "config", alias = "cm")]
    Configs,
    #[value(alias = "stack")]
    Stacks,
}

pub async fn run(ctx: &Context, kind: Kind, output: OutputFormat) -> anyhow::Result<()> {
    match kind {
        Kind::Services => services(ctx, output).await,
        Kind::Nodes => super::node::ls(ctx, output).await,
        Kind::Tasks => super::ps::run(ctx, None, output).await,
        Kind::Networks => super::network::ls(ctx, output).await,
        Kind::Volumes => super::volume::ls(ctx, output).await,
        Kind::Secrets => super::secret::ls(ctx, "secret", output).await,
        Kind::Configs => super::secret::ls(ctx, "config", output).await,
        Kind::Stacks => super::stack::ls(ctx, output).await,
    }
}

/// A service as `-o json|yaml` shows it: its spec in full, replicas and rollout state.
pub fn to_json(s: &ServiceSummary) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "id": s.id, "name": s.name, "image": s.image,
        "replicas": {"desired": s.desired, "running": s.running},
        "version": s.version,
        "update": {
            "state": crate::convert::update_state_name(s.update_state),
            "message": s.update_message,
        },
        "spec": crate::convert::from_json::<serde_json::Value>("service spec", &s.spec_json)?,
    }))
}

fn write_services(w: &mut dyn Write, list: &[ServiceSummary]) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{}/{}", s.running, s.desired),
                s.image.clone(),
                s.id[..s.id.len().min(12)].to_string(),
            ]
        })
        .collect();
    output::write_table(w, &["NAME", "REPLICAS", "IMAGE", "ID"], &rows)
}

pub async fn services(ctx: &Context, output: OutputFormat) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let list = crate::services(&mut client).await?;
    let v = list
        .iter()
        .map(to_json)
        .collect::<anyhow::Result<Vec<_>>>()?;
    output::print(output, &v, |w| write_services(w, &list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn kinds_take_singular_plural_and_short_names() {
        for (name, kind) in [
            ("services", Kind::Services),
            ("service", Kind::Services),
            ("svc", Kind::Services),
            ("node", Kind::Nodes),
            ("nodes", Kind::Nodes),
            ("tasks", Kind::Tasks),
            ("ps", Kind::Tasks),
            ("net", Kind::Networks),
            ("network", Kind::Networks),
            ("volumes", Kind::Volumes),
            ("vol", Kind::Volumes),
            ("secret", Kind::Secrets),
            ("configs", Kind::Configs),
            ("stack", Kind::Stacks),
        ] {
            assert_eq!(Kind::from_str(name, false), Ok(kind), "{name}");
        }
        assert!(Kind::from_str("pods", false).is_err());
    }

    #[test]
    fn a_service_as_json_carries_its_spec_and_the_table_its_replicas() {
        let s = ServiceSummary {
            id: "0123456789abcdef".into(),
            name: "web".into(),
            image: "busybox".into(),
            desired: 3,
            running: 2,
            spec_json: crate::convert::to_json(
                "service",
                &serde_json::json!({"name": "web", "image": "busybox"}),
            )
            .unwrap(),
            ..Default::default()
        };
        let v = to_json(&s).unwrap();
        assert_eq!(v["spec"]["image"], "busybox");
        assert_eq!(v["replicas"]["running"], 2);
        let mut out = Vec::new();
        write_services(&mut out, &[s]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("web   2/3       busybox  0123456789ab"),
            "{text}"
        );
    }
}
