//! `rctl build -t NAME[:TAG] [-f Dockerfile] [--build-arg K=V]… [--secret id=X,src=FILE]…
//! [--no-cache] [--target STAGE] [--node HOST] CONTEXT`: builds an image from a Dockerfile on a host of the cluster and
//! stores it in the cluster registry, like `docker build`.
//!
//! The Dockerfile is parsed here first, so a malformed one is refused with its line before any
//! byte is sent. The context directory goes as a tar, without what `.dockerignore` excludes
//! (the Dockerfile and `.dockerignore` always go). Progress is printed as the host reports it:
//! each step, `---> Using cache` for a step reused from the host's build cache, a RUN's
//! output, and the new layers; then the stored image's digest.

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rudder_image::Reference;
use rudder_proto::v1::build_input::Msg as In;
use rudder_proto::v1::build_output::Msg as Out;
use rudder_proto::v1::{BuildInput, BuildParams, BuildSecret};

use crate::context::Context;

/// What `rctl build` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// NAME[:TAG] to store the image under (tag `latest` when none is given).
    #[arg(short = 't', long = "tag")]
    pub tag: String,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// A build argument (`ARG`): KEY=VALUE, or KEY to take it from the environment.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// A secret for `RUN --mount=type=secret,id=X`: `id=X,src=FILE` (a local file),
    /// `id=X,env=VAR` (a variable of this shell), `id=X,name=NAME` (the cluster's secret
    /// NAME), or `id=X` (the variable X). Sent with the build only; never stored, never in a
    /// layer.
    #[arg(long = "secret", value_name = "id=X,src=FILE")]
    pub secrets: Vec<String>,
    /// Rebuild every step instead of reusing the build cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Build this stage (its `AS` name) instead of the last.
    #[arg(long)]
    pub target: Option<String>,
    /// The host to build on (default: the controller picks one, the same one each time).
    #[arg(long)]
    pub node: Option<String>,
    /// Let `ADD <url>` fetch from the cluster's own hosts and controllers (refused otherwise,
    /// so a Dockerfile cannot bake what only the cluster can reach into an image).
    #[arg(long)]
    pub allow_cluster_urls: bool,
    /// Print only the image digest.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The build context: a directory.
    #[arg(value_name = "CONTEXT")]
    pub dir: PathBuf,
}

const CHUNK: usize = 1 << 20;

/// `--build-arg` values: KEY=VALUE, or KEY taken from the environment (skipped when unset).
fn build_args(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(a) {
                Ok(v) => (a.clone(), v),
                Err(_) => continue,
            },
        };
        if k.is_empty() {
            anyhow::bail!("--build-arg {a:?}: the name is empty");
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// `--secret` values: each read from its file or variable, within the secret size limit.
fn secrets(raw: &[String]) -> anyhow::Result<Vec<BuildSecret>> {
    let mut out: Vec<BuildSecret> = Vec::new();
    for spec in raw {
        let (mut id, mut src, mut env, mut name) = (None, None, None, None);
        for field in spec.split(',') {
            match field.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("name", v)) if !v.is_empty() => name = Some(v.to_string()),
                Some(("type", "file" | "env")) => {}
                _ => anyhow::bail!(
                    "--secret {spec:?}: expected id=X,src=FILE or id=X,env=VAR (unknown {field:?})"
                ),
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .with_context(|| format!("--secret {spec:?}: an id is required (id=X)"))?;
        if out.iter().any(|s| s.id == id) {
            anyhow::bail!("--secret {id}: given twice");
        }
        if let Some(name) = name {
            // The controller fills in the cluster's value.
            out.push(BuildSecret {
                id,
                data: Vec::new(),
                name,
            });
            continue;
        }
        let data = match (src, env) {
            (Some(path), _) => {
                let len = std::fs::metadata(&path)
                    .with_context(|| format!("--secret {id}: {}", path.display()))?
                    .len();
                rudder_model::secret::check_size(&format!("--secret {id}"), len as usize)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                std::fs::read(&path)
                    .with_context(|| format!("--secret {id}: read {}", path.display()))?
            }
            (None, var) => {
                let var = var.unwrap_or_else(|| id.clone());
                std::env::var(&var)
                    .with_context(|| format!("--secret {id}: the variable {var} is not set"))?
                    .into_bytes()
            }
        };
        rudder_model::secret::check_size(&format!("--secret {id}"), data.len())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push(BuildSecret {
            id,
            data,
            name: String::new(),
        });
    }
    Ok(out)
}

pub async fn run(ctx: &Context, args: &BuildArgs) -> anyhow::Result<()> {
    if let Err(rudder_image::ImageError::InvalidReference { reference, reason }) =
        Reference::parse(&args.tag)
    {
        anyhow::bail!("-t: invalid reference {reference:?}: {reason}");
    }
    let context = &args.dir;
    if !context.is_dir() {
        anyhow::bail!("build context {}: not a directory", context.display());
    }
    let dockerfile = args
        .file
        .clone()
        .unwrap_or_else(|| context.join("Dockerfile"));
    let text = std::fs::read_to_string(&dockerfile)
        .with_context(|| format!("read the Dockerfile {}", dockerfile.display()))?;
    let shown = dockerfile.display().to_string();
    rudder_image::dockerfile::parse(&text).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let build_args = build_args(&args.build_args)?;
    let secrets = secrets(&args.secrets)?;

    // The context as a tar, in a scratch file (it may be large).
    let inside = dockerfile
        .canonicalize()
        .ok()
        .zip(context.canonicalize().ok())
        .and_then(|(f, c)| f.strip_prefix(&c).ok().map(Path::to_path_buf));
    let mut file = tempfile::tempfile().context("create a scratch file")?;
    let summary = rudder_image::build_context::pack_context(context, inside.as_deref(), &mut file)
        .with_context(|| format!("pack the build context {}", context.display()))?;
    let context_size = file.stream_position()?;
    file.rewind()?;
    let _ = summary;

    let mut client = crate::connect(ctx).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<BuildInput>(4);
    let params = BuildParams {
        reference: args.tag.clone(),
        dockerfile: text,
        dockerfile_name: shown.clone(),
        build_args: build_args.into_iter().collect(),
        no_cache: args.no_cache,
        node: args.node.clone().unwrap_or_default(),
        target: args.target.clone().unwrap_or_default(),
        registry: String::new(),
        context_size,
        allow_cluster_urls: args.allow_cluster_urls,
        cluster_addresses: Vec::new(),
        secrets,
    };
    tx.send(BuildInput {
        msg: Some(In::Params(params)),
    })
    .await
    .ok();
    // The upload's bar (a terminal only), cleared once the whole context is sent.
    let upload = if args.quiet {
        crate::progress::Progress::quiet()
    } else {
        crate::progress::Progress::start("sending the build context", Some(context_size))
    };
    let counted = upload.clone();
    let sender = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                counted.finish();
                return Ok::<_, std::io::Error>(());
            }
            let msg = BuildInput {
                msg: Some(In::Context(buf[..n].to_vec())),
            };
            if tx.blocking_send(msg).is_err() {
                counted.finish();
                return Ok(());
            }
            counted.inc(n as u64);
        }
    });
    let mut outputs = client
        .build(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let mut result = None;
    while let Some(m) = outputs.message().await.map_err(crate::status_err)? {
        match m.msg {
            Some(Out::Progress(line)) if !args.quiet => upload.println(&line),
            Some(Out::Result(r)) => result = Some(r),
            _ => {}
        }
    }
    sender.await??;
    upload.finish();
    let r = result.context("the build ended without a result")?;
    if args.quiet {
        println!("{}", r.digest);
    } else {
        println!(
            "Successfully built {} on {}: {} steps, {} from the cache, {} bytes of new layers sent",
            r.digest, r.node, r.steps, r.cached, r.bytes_sent
        );
        println!("Successfully tagged {}", r.reference);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_args_take_values_or_the_environment() {
        std::env::set_var("RUDDER_TEST_BUILD_ARG", "from-env");
        let a = build_args(&[
            "A=1".into(),
            "B==2".into(),
            "RUDDER_TEST_BUILD_ARG".into(),
            "RUDDER_TEST_UNSET_ARG".into(),
        ])
        .unwrap();
        assert_eq!(a["A"], "1");
        assert_eq!(a["B"], "=2");
        assert_eq!(a["RUDDER_TEST_BUILD_ARG"], "from-env");
        assert!(!a.contains_key("RUDDER_TEST_UNSET_ARG"));
        assert!(build_args(&["=x".into()]).is_err());
    }

    #[test]
    fn secrets_come_from_files_or_variables_within_the_limit() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("token");
        std::fs::write(&f, "s3cret").unwrap();
        std::env::set_var("RUDDER_TEST_SECRET", "from-env");
        let s = secrets(&[
            format!("id=tok,src={}", f.display()),
            "id=e,env=RUDDER_TEST_SECRET".into(),
            "id=RUDDER_TEST_SECRET".into(),
        ])
        .unwrap();
        assert_eq!(s[0].data, b"s3cret");
        assert_eq!(s[1].data, b"from-env");
        assert_eq!(s[2].data, b"from-env");
        let big = t.path().join("big");
        std::fs::write(&big, vec![0u8; 600 << 10]).unwrap();
        let e = secrets(&[format!("id=big,src={}", big.display())]).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        let s = secrets(&["id=db,name=dbpw".into()]).unwrap();
        assert_eq!((s[0].name.as_str(), s[0].data.len()), ("dbpw", 0));
        assert!(secrets(&["src=/x".into()]).is_err());
        assert!(secrets(&["id=a,color=red".into()]).is_err());
    }
}
