//! `rctl cp TASK:PATH LOCAL` and `rctl cp LOCAL TASK:PATH`: files and directories between
//! this machine and a running task's container, placed as `docker cp` places them (into a
//! directory that exists, else under the new name; `DIR/.` copies a directory's contents;
//! `-` is a tar on stdout or stdin).
//!
//! A tar travels through the controller to the task's host, where the agent reads or writes
//! it inside the container's root (see `rudder_image::copy`). Here, an archive coming from a
//! container is unpacked without ever writing through a symlink it contains, and nothing is
//! written when the source does not exist. It is not trusted further than that (the agent,
//! or whoever answers in its place, picks its bytes): its one top-level member must be named
//! after the path asked for, setuid/setgid bits are dropped and no device node is made
//! (`copy::unpack_untrusted`).

use std::io::{Read, Write};
use std::path::PathBuf;

use rudder_image::copy::{self, Layout};
use rudder_proto::v1::copy_to_input::Msg as In;
use rudder_proto::v1::{CopyFromRequest, CopyToInput, CopyToStart};
use tokio::sync::mpsc;

use crate::context::Context;

const CHUNK: usize = 64 * 1024;

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Side<'a> {
    Local(&'a str),
    Task { task: &'a str, path: &'a str },
}

/// `TASK:PATH`, or a local path: one that starts with `/` or `.`, is `-`, or has no `:`
/// before its first `/` (as `docker cp` tells them apart).
pub fn side(arg: &str) -> Side<'_> {
    if arg == "-" || arg.starts_with('/') || arg.starts_with('.') {
        return Side::Local(arg);
    }
    match arg.split_once(':') {
        Some((task, path)) if !task.is_empty() && !task.contains('/') => Side::Task { task, path },
        _ => Side::Local(arg),
    }
}

pub async fn run(ctx: &Context, src: &str, dest: &str, follow_link: bool) -> anyhow::Result<()> {
    match (side(src), side(dest)) {
        (Side::Task { task, path }, Side::Local(local)) => {
            copy_from(ctx, task, path, local, follow_link).await
        }
        (Side::Local(local), Side::Task { task, path }) => {
            copy_to(ctx, local, task, path, follow_link).await
        }
        (Side::Task { .. }, Side::Task { .. }) => {
            anyhow::bail!("cannot copy between two tasks directly; copy through a local path")
        }
        (Side::Local(_), Side::Local(_)) => {
            anyhow::bail!("one of SRC and DEST must be TASK:PATH (a task as `rctl ps` shows it)")
        }
    }
}

/// Reads the chunks a channel delivers, as one stream of bytes (for a blocking unpacker).
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Sends what is written as `CopyToInput` data chunks (for a blocking packer).
struct ChannelWriter {
    tx: mpsc::Sender<CopyToInput>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(CopyToInput {
                msg: Some(In::Data(data)),
            })
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

async fn copy_from(
    ctx: &Context,
    task: &str,
    path: &str,
    local: &str,
    follow_link: bool,
) -> anyhow::Result<()> {
    if path.is_empty() {
        anyhow::bail!("{task}: no path given (TASK:PATH)");
    }
    let mut client = crate::connect(ctx).await?;
    let mut stream = client
        .copy_from(CopyFromRequest {
            task: task.to_string(),
            path: path.to_string(),
            follow_link,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    // The first chunk, or the reason there is none: nothing is written before it.
    let Some(first) = stream.message().await.map_err(crate::status_err)? else {
        anyhow::bail!("{task}: the copy ended before it began");
    };
    if local == "-" {
        let mut out = std::io::stdout().lock();
        out.write_all(&first.data)?;
        while let Some(c) = stream.message().await.map_err(crate::status_err)? {
            out.write_all(&c.data)?;
        }
        out.flush()?;
        return Ok(());
    }
    let layout = if copy::wants_contents(path) {
        Layout::Contents
    } else {
        Layout::Named
    };
    let (tx, rx) = mpsc::channel(8);
    let dest = PathBuf::from(local);
    // The name the agent gives the path it packs: the archive must be exactly that.
    let top = copy::top_name_in_root(path);
    let unpacker = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        copy::unpack_untrusted(reader, &dest, layout, &top)
    });
    let mut streamed = Ok(());
    if tx.send(first.data).await.is_ok() {
        loop {
            match stream.message().await {
                Ok(Some(c)) => {
                    // A closed channel: the unpacker stopped, and says why below.
                    if tx.send(c.data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    streamed = Err(crate::status_err(s));
                    break;
                }
            }
        }
    }
    drop(tx);
    let unpacked = unpacker.await?;
    streamed?;
    unpacked?;
    Ok(())
}

async fn copy_to(
    ctx: &Context,
    local: &str,
    task: &str,
    path: &str,
    follow_link: bool,
) -> anyhow::Result<()> {
    if path.is_empty() {
        anyhow::bail!("{task}: no path given (TASK:PATH)");
    }
    let raw = local == "-";
    let src = PathBuf::from(local);
    if !raw {
        let found = if follow_link {
            std::fs::metadata(&src)
        } else {
            std::fs::symlink_metadata(&src)
        };
        if found.is_err() {
            anyhow::bail!("no such file or directory: {local}");
        }
    }
    let mut client = crate::connect(ctx).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(CopyToInput {
        msg: Some(In::Start(CopyToStart {
            task: task.to_string(),
            path: path.to_string(),
            contents: !raw && copy::wants_contents(local),
            raw,
        })),
    })
    .await?;
    let packer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut w = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        };
        if raw {
            std::io::copy(&mut std::io::stdin().lock(), &mut w)?;
            w.flush()?;
        } else {
            copy::pack(&src, &copy::top_name(&src), follow_link, w)?;
        }
        Ok(())
    });
    let call = client.copy_to(tokio_stream::wrappers::ReceiverStream::new(rx));
    tokio::pin!(call);
    tokio::pin!(packer);
    tokio::select! {
        packed = &mut packer => {
            // A failed packer: the call is dropped (reset), so no half archive looks whole.
            packed??;
            call.await.map_err(crate::status_err)?;
        }
        done = &mut call => {
            // The agent answered before everything was sent: it failed, or it is done.
            done.map_err(crate::status_err)?;
            packer.await??;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_told_apart_like_docker_cp() {
        assert_eq!(
            side("web.1.abc:/etc/hosts"),
            Side::Task {
                task: "web.1.abc",
                path: "/etc/hosts"
            }
        );
        assert_eq!(side("./a:b"), Side::Local("./a:b"));
        assert_eq!(side("/tmp/a:b"), Side::Local("/tmp/a:b"));
        assert_eq!(side("dir/a:b"), Side::Local("dir/a:b"));
        assert_eq!(side("-"), Side::Local("-"));
        assert_eq!(side("plain"), Side::Local("plain"));
        assert_eq!(
            side("t:rel/p"),
            Side::Task {
                task: "t",
                path: "rel/p"
            }
        );
    }
}
