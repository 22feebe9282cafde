//! `rctl logs SERVICE|TASK [-f] [--tail N] [-t]`: the containers' output, fetched by the controller
//! from each host; `-f` keeps streaming until the containers exit.
//! An unreachable host yields a warning on stderr, never a hang.

use std::io::Write;

use rudder_proto::v1::LogsRequest;

use crate::context::Context;

pub async fn run(
    ctx: &Context,
    target: &str,
    prefix: bool,
    tail: u32,
    follow: bool,
    timestamps: bool,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let mut stream = client
        .logs(LogsRequest {
            target: target.to_string(),
            tail,
            follow,
            timestamps,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let stdout = std::io::stdout();
    let mut pending: std::collections::HashMap<String, Vec<u8>> = Default::default();
    while let Some(chunk) = stream.message().await.map_err(crate::status_err)? {
        if !chunk.warning.is_empty() {
            eprintln!("warning: {}", chunk.warning);
            continue;
        }
        let mut out = stdout.lock();
        if !prefix {
            out.write_all(&chunk.data)?;
            continue;
        }
        // Prefix whole lines with the task name, as `docker service logs` does.
        let buf = pending.entry(chunk.task.clone()).or_default();
        buf.extend_from_slice(&chunk.data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            write!(out, "{} | ", chunk.task)?;
            out.write_all(&line)?;
        }
    }
    let mut out = stdout.lock();
    for (task, rest) in pending {
        if !rest.is_empty() {
            write!(out, "{task} | ")?;
            out.write_all(&rest)?;
            writeln!(out)?;
        }
    }
    Ok(())
}
