//! `rctl cp` on the host: tars stream between the API and an `fs-helper` child chrooted into
//! the running container's root (see `fs_helper`), so the agent itself never opens a path
//! inside a container.
//!
//! A missing path is reported before any byte of a tar is sent (`not_found` whose message is
//! the path as the container sees it); any other failure of the helper carries its message.

use std::pin::Pin;
use std::process::Stdio;

use futures::{Stream, StreamExt};
use rudder_proto::v1::copy_to_input::Msg as In;
use rudder_proto::v1::{CopyFromRequest, CopyToInput, CopyToResponse, TarChunk};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Response, Status};
use tracing::info;

use crate::exec::{AccessError, ContainerAccess};
use crate::fs_helper::{HelperArgs, Op, EXIT_NOT_FOUND};

pub type TarStream = Pin<Box<dyn Stream<Item = Result<TarChunk, Status>> + Send>>;

const CHUNK: usize = 64 * 1024;

fn helper(
    access: &ContainerAccess,
    task: &str,
    op: Op,
) -> Result<tokio::process::Command, AccessError> {
    let pid = access.running_pid(task)?;
    let args = HelperArgs {
        root: format!("/proc/{pid}/root").into(),
        expect: access.dir(task)?.rootfs(),
        op,
    };
    let mut cmd = tokio::process::Command::from(args.command(&access.agent_exe));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// The helper's failure as a status: a missing path is `not_found` with the path.
fn failure(status: std::process::ExitStatus, stderr: &str) -> Status {
    let msg = stderr.trim();
    match status.code() {
        Some(EXIT_NOT_FOUND) => Status::not_found(msg),
        _ if msg.is_empty() => Status::internal(format!("copy: the helper failed ({status})")),
        _ => Status::failed_precondition(msg),
    }
}

/// Reads the helper's stderr to its end, off the data path.
fn collect(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s).await;
        }
        s
    })
}

/// Streams a tar of `req.path` in task `req.task`'s container.
pub async fn copy_from(
    access: &ContainerAccess,
    req: CopyFromRequest,
) -> Result<Response<TarStream>, Status> {
    let op = Op::Pack {
        path: req.path.clone(),
        follow_link: req.follow_link,
    };
    let mut child = helper(access, &req.task, op)?
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Status::internal(format!("copy: start the helper: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stderr = collect(child.stderr.take());
    // The first bytes, or the helper's verdict: a missing path fails the call itself.
    let mut first = vec![0u8; CHUNK];
    let n = stdout
        .read(&mut first)
        .await
        .map_err(|e| Status::internal(format!("copy: read the helper: {e}")))?;
    if n == 0 {
        let status = child
            .wait()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let msg = stderr.await.unwrap_or_default();
        return Err(failure(status, &msg));
    }
    first.truncate(n);
    info!(task = %req.task, path = %req.path, "copy from container");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        if tx.send(Ok(TarChunk { data: first })).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    if tx.send(Ok(TarChunk { data })).await.is_err() {
                        // The caller went away: the helper dies with `child`.
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("copy: read the helper: {e}"))))
                        .await;
                    return;
                }
            }
        }
        match child.wait().await {
            Ok(s) if s.success() => {}
            Ok(s) => {
                let msg = stderr.await.unwrap_or_default();
                let _ = tx.send(Err(failure(s, &msg))).await;
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e.to_string()))).await;
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// Unpacks the streamed tar in the container named by the first input.
pub async fn copy_to<S>(access: &ContainerAccess, mut input: S) -> Result<CopyToResponse, Status>
where
    S: Stream<Item = Result<CopyToInput, Status>> + Unpin + Send + 'static,
{
    let start = match input.next().await {
        Some(Ok(CopyToInput {
            msg: Some(In::Start(s)),
        })) => s,
        Some(Err(e)) => return Err(e),
        _ => {
            return Err(Status::invalid_argument(
                "copy: the first message must name the task and the destination",
            ))
        }
    };
    if start.contents && start.raw {
        return Err(Status::invalid_argument(
            "copy: contents and raw exclude each other",
        ));
    }
    let op = Op::Unpack {
        dest: start.path.clone(),
        contents: start.contents,
        raw: start.raw,
        owners: false,
    };
    let mut child = helper(access, &start.task, op)?
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| Status::internal(format!("copy: start the helper: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stderr = collect(child.stderr.take());
    info!(task = %start.task, path = %start.path, "copy into container");
    while let Some(msg) = input.next().await {
        match msg {
            Ok(CopyToInput {
                msg: Some(In::Data(data)),
            }) => {
                // A helper that stopped reading has failed: its verdict follows.
                if stdin.write_all(&data).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill().await;
                return Err(Status::aborted(format!(
                    "copy: the upload broke off: {}",
                    e.message()
                )));
            }
        }
    }
    drop(stdin);
    let status = child
        .wait()
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    if !status.success() {
        let msg = stderr.await.unwrap_or_default();
        return Err(failure(status, &msg));
    }
    Ok(CopyToResponse {})
}
