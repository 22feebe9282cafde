//! The agent's own API, called by controllers: container logs (and later exec, cp).
//!
//! Logs are the container's output file. `tail` starts at the last N lines; `follow` keeps
//! reading what the container appends until it has exited (its shim wrote `exit`) and the file
//! is drained, or the caller goes away.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use rudder_proto::v1::agent_api_server::AgentApi;
use rudder_proto::v1::{LogChunk, TaskLogsRequest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status};

pub struct AgentApiImpl {
    pub containers: PathBuf,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Byte offset where the last `n` lines of the file start (0 when it has fewer).
pub fn tail_offset(file: &mut std::fs::File, n: u32) -> std::io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    if n == 0 || len == 0 {
        return Ok(if n == 0 { len } else { 0 });
    }
    let mut pos = len;
    let mut newlines = 0u32;
    let mut buf = vec![0u8; 64 * 1024];
    while pos > 0 {
        let step = (pos as usize).min(buf.len());
        pos -= step as u64;
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut buf[..step])?;
        for i in (0..step).rev() {
            if buf[i] != b'\n' {
                continue;
            }
            // A newline that ends the file closes the last line; it does not start one.
            if pos + i as u64 == len - 1 {
                continue;
            }
            newlines += 1;
            if newlines == n {
                return Ok(pos + i as u64 + 1);
            }
        }
    }
    Ok(0)
}

fn exited(dir: &Path) -> bool {
    dir.join("exit").exists()
}

#[tonic::async_trait]
impl AgentApi for AgentApiImpl {
    type TaskLogsStream = LogStream;

    async fn task_logs(
        &self,
        req: Request<TaskLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let TaskLogsRequest {
            task_id: id,
            tail,
            follow,
        } = req.into_inner();
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(Status::invalid_argument("bad task id"));
        }
        let dir = self.containers.join(&id);
        let path = dir.join("log");
        let start = if tail > 0 {
            let p = path.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&p).and_then(|mut f| tail_offset(&mut f, tail))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .unwrap_or(0)
        } else {
            0
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Response::new(Box::pin(futures::stream::empty())))
            }
            Err(e) => return Err(Status::internal(format!("open log: {e}"))),
        };
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| Status::internal(format!("seek log: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) if !follow => break,
                    Ok(0) => {
                        // Drained: done once the container is gone (read once more after
                        // seeing `exit`, for output written just before it).
                        if exited(&dir) {
                            match file.read(&mut buf).await {
                                Ok(n) if n > 0 => {
                                    let _ = tx.send(Ok(chunk(&id, &buf[..n]))).await;
                                    continue;
                                }
                                _ => break,
                            }
                        }
                        if tx.is_closed() {
                            break;
                        }
                        tokio::time::sleep(FOLLOW_POLL).await;
                    }
                    Ok(n) => {
                        if tx.send(Ok(chunk(&id, &buf[..n]))).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("read log: {e}"))))
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn chunk(task: &str, data: &[u8]) -> LogChunk {
    LogChunk {
        task: task.to_string(),
        data: data.to_vec(),
        warning: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_offsets() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"one\ntwo\nthree\n").unwrap();
        let text = |f: &mut std::fs::File, n| {
            let off = tail_offset(f, n).unwrap();
            f.seek(SeekFrom::Start(off)).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(text(&mut f, 1), "three\n");
        assert_eq!(text(&mut f, 2), "two\nthree\n");
        assert_eq!(text(&mut f, 3), "one\ntwo\nthree\n");
        assert_eq!(text(&mut f, 9), "one\ntwo\nthree\n");
        // An unfinished last line counts as a line.
        f.write_all(b"four").unwrap();
        assert_eq!(text(&mut f, 1), "four");
        assert_eq!(text(&mut f, 2), "three\nfour");
        let mut empty = tempfile::tempfile().unwrap();
        assert_eq!(text(&mut empty, 3), "");
    }
}
