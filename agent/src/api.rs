//! The agent's own API, called by controllers: container logs; exec, cp and inspect live in
//! `exec` and `copy`.
//!
//! Logs are the container's output file, written by its shim as `<time> <stream> <line>`
//! lines. `tail` starts at the last N lines; `follow` keeps reading what the container appends
//! (across rotations: a new `log` is noticed by its inode) until it has exited (its shim wrote
//! `exit`) and the file is drained, or the caller goes away. Lines go out as the container
//! wrote them, or with their time first for `timestamps`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use rudder_proto::v1::agent_api_server::AgentApi;
use rudder_proto::v1::{LogChunk, TaskLogsRequest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status};

use crate::exec::AccessError;
use crate::shim::ContainerDir;

pub struct AgentApiImpl {
    pub containers: PathBuf,
    /// Exec, cp and inspect (`exec`, `copy`).
    pub access: crate::exec::ContainerAccess,
    /// The content store, for the base image of a commit (`commit`).
    pub images: rudder_image::ImageStore,
    /// Builds from a Dockerfile (`build`).
    pub builder: std::sync::Arc<crate::build::Builder>,
    /// Live usage of tasks (`stats`), and their processes (`top`).
    pub live: std::sync::Arc<dyn crate::stats::LiveSource>,
    pub procs: std::sync::Arc<dyn crate::top::ProcessSource>,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;
/// A live stats stream (`task_stats`).
type FrameStream = Pin<Box<dyn Stream<Item = Result<rudder_proto::v1::StatsFrame, Status>> + Send>>;

/// How often a followed log is checked for new output where the container directory cannot
/// be watched (inotify instances are a per-user limit).
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// A watched directory is still checked this often, in case an event was lost (a full
/// inotify queue drops events).
const FOLLOW_FALLBACK: Duration = Duration::from_secs(1);

/// Wakes a log follower when anything in a container directory changes: output appended to
/// `log`, a rotation, the shim recording `exit`. Without it a follower polls, and a caller
/// waiting for a short container's end (`rctl run`) waits for the next poll.
struct DirWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
}

/// An inotify instance as a raw fd, for `AsyncFd`.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl DirWatch {
    /// A watch on `dir`, or `None` where inotify is unavailable (then the caller polls).
    fn new(dir: &Path) -> Option<DirWatch> {
        use nix::sys::inotify::{AddWatchFlags as W, InitFlags, Inotify};
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| tracing::debug!(%e, "inotify unavailable: logs are polled"))
            .ok()?;
        ino.add_watch(
            dir,
            W::IN_MODIFY | W::IN_CREATE | W::IN_MOVED_TO | W::IN_CLOSE_WRITE,
        )
        .ok()?;
        // SAFETY: the inotify instance owns its fd, which stays open (and the same) for as
        // long as the AsyncFd holds it, and `as_raw_fd` returns that fd.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(ino)) }.ok()?;
        Some(DirWatch { fd })
    }

    /// Returns once something changed in the directory (events are drained), or after `max`.
    async fn changed(&mut self, max: Duration) {
        let wait = async {
            let Ok(mut ready) = self.fd.readable().await else {
                return;
            };
            loop {
                match ready.get_inner().0.read_events() {
                    Ok(events) if !events.is_empty() => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    _ => {
                        ready.clear_ready();
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(max, wait).await;
    }
}

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
    ContainerDir::new(dir).has_exited()
}

/// A build's failure: the user's to fix (invalid), a step's (aborted), or the host's.
impl From<crate::build::BuildError> for Status {
    fn from(e: crate::build::BuildError) -> Status {
        use crate::build::BuildError as E;
        match e {
            E::Invalid(m) => Status::invalid_argument(m),
            E::Step(m) => Status::aborted(m),
            other => Status::internal(other.to_string()),
        }
    }
}

/// Why a container cannot be reached, as the caller should read it.
impl From<AccessError> for Status {
    fn from(e: AccessError) -> Status {
        use AccessError as E;
        match e {
            E::BadId
            | E::NoStart
            | E::NoCommand
            | E::UserTooLong
            | E::User(_)
            | E::Env(_)
            | E::Workdir(_) => Status::invalid_argument(e.to_string()),
            E::NoContainer(_) | E::NotRunning(_) | E::Pause { .. } | E::Resume { .. } => {
                Status::failed_precondition(e.to_string())
            }
            E::Input(m) => Status::aborted(m),
            E::Internal { .. } | E::Start { .. } => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl AgentApi for AgentApiImpl {
    type TaskLogsStream = LogStream;
    type ExecStream = crate::exec::ExecStream;
    type CopyFromStream = crate::copy::TarStream;
    type CommitStream = crate::commit::CommitStream;

    async fn commit(
        &self,
        req: Request<rudder_proto::v1::CommitLayerRequest>,
    ) -> Result<Response<Self::CommitStream>, Status> {
        let req = req.into_inner();
        crate::commit::commit(&self.access, &self.images, &req.task_id, !req.no_pause).await
    }

    async fn list_host_images(
        &self,
        _req: Request<rudder_proto::v1::ListImagesRequest>,
    ) -> Result<Response<rudder_proto::v1::ListImagesResponse>, Status> {
        let (images, containers) = (self.images.clone(), self.containers.clone());
        tokio::task::spawn_blocking(move || crate::images::list(&images, &containers))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }

    async fn prune_host_images(
        &self,
        req: Request<rudder_proto::v1::PruneImagesRequest>,
    ) -> Result<Response<rudder_proto::v1::PruneResult>, Status> {
        crate::images::prune(&self.images, &self.containers, req.into_inner().grace_ms)
            .await
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }

    type BuildStream = crate::build::BuildStream;

    async fn build(
        &self,
        req: Request<tonic::Streaming<rudder_proto::v1::BuildInput>>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        crate::build::build(self.builder.clone(), req.into_inner()).await
    }

    async fn exec(
        &self,
        req: Request<tonic::Streaming<rudder_proto::v1::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Ok(crate::exec::exec(&self.access, req.into_inner()).await?)
    }

    async fn copy_from(
        &self,
        req: Request<rudder_proto::v1::CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        crate::copy::copy_from(&self.access, req.into_inner()).await
    }

    async fn copy_to(
        &self,
        req: Request<tonic::Streaming<rudder_proto::v1::CopyToInput>>,
    ) -> Result<Response<rudder_proto::v1::CopyToResponse>, Status> {
        crate::copy::copy_to(&self.access, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn inspect_container(
        &self,
        req: Request<rudder_proto::v1::InspectContainerRequest>,
    ) -> Result<Response<rudder_proto::v1::ContainerInfo>, Status> {
        self.access
            .info(&req.into_inner().task_id)
            .map(Response::new)
            .map_err(Status::from)
    }

    type TaskStatsStream = FrameStream;

    async fn task_stats(
        &self,
        req: Request<rudder_proto::v1::TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        let req = req.into_inner();
        let interval = Duration::from_millis(u64::from(req.interval_ms));
        let rx = crate::stats::live(self.live.clone(), req.task_ids, interval, req.once)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        use futures::StreamExt;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok),
        )))
    }

    async fn task_top(
        &self,
        req: Request<rudder_proto::v1::TaskTopRequest>,
    ) -> Result<Response<rudder_proto::v1::TopResponse>, Status> {
        let id = req.into_inner().task_id;
        let procs = self.procs.clone();
        tokio::task::spawn_blocking(move || crate::top::top(procs.as_ref(), &id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
            .map_err(|e| match e {
                crate::top::TopError::BadId(_) => Status::invalid_argument(e.to_string()),
                crate::top::TopError::NoCgroup(_) => Status::failed_precondition(e.to_string()),
                _ => Status::internal(e.to_string()),
            })
    }

    async fn task_logs(
        &self,
        req: Request<TaskLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let TaskLogsRequest {
            task_id: id,
            tail,
            follow,
            timestamps,
        } = req.into_inner();
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(Status::invalid_argument("bad task id"));
        }
        let dir = self.containers.join(&id);
        log_stream(dir, id, tail, follow, timestamps).await
    }
}

/// The log of the container in `dir` (task `id`) as a stream of chunks: from the last `tail`
/// lines (all when 0), to its end, or, with `follow`, until the container has exited and its
/// output is drained; then a last chunk carries the exit code.
async fn log_stream(
    dir: PathBuf,
    id: String,
    tail: u32,
    follow: bool,
    timestamps: bool,
) -> Result<Response<LogStream>, Status> {
    let path = ContainerDir::new(&dir).log();
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
    // Watch before the first read, so nothing written after it goes unnoticed.
    let mut wake = if follow { DirWatch::new(&dir) } else { None };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut lines = Lines::new(timestamps);
        loop {
            match file.read(&mut buf).await {
                Ok(0) if !follow => break,
                Ok(0) => {
                    // Rotated: finish the old file (done: at EOF), go on with the new one.
                    if rotated(&path, &file).await {
                        if let Ok(f) = tokio::fs::File::open(&path).await {
                            file = f;
                            continue;
                        }
                    }
                    // Drained: done once the container is gone (read once more after
                    // seeing `exit`, for output written just before it). The last
                    // chunk carries the exit code.
                    if exited(&dir) {
                        match file.read(&mut buf).await {
                            Ok(n) if n > 0 => {
                                let out = lines.push(&buf[..n]);
                                let _ = tx.send(Ok(chunk(&id, &out))).await;
                                continue;
                            }
                            _ => {
                                if let Some(code) = ContainerDir::new(&dir).read_exit_code() {
                                    let _ = tx.send(Ok(last_chunk(&id, code))).await;
                                }
                                break;
                            }
                        }
                    }
                    if tx.is_closed() {
                        break;
                    }
                    match wake.as_mut() {
                        Some(w) => w.changed(FOLLOW_FALLBACK).await,
                        None => tokio::time::sleep(FOLLOW_POLL).await,
                    }
                }
                Ok(n) => {
                    let out = lines.push(&buf[..n]);
                    if !out.is_empty() && tx.send(Ok(chunk(&id, &out))).await.is_err() {
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

/// Whether the file at `path` is no longer the one open (the shim rotated it).
async fn rotated(path: &Path, open: &tokio::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (tokio::fs::metadata(path).await, open.metadata().await) {
        (Ok(now), Ok(ours)) => now.ino() != ours.ino(),
        _ => false,
    }
}

/// Turns the shim's `<time> <stream> <line>` records into output lines.
pub struct Lines {
    timestamps: bool,
    partial: Vec<u8>,
}

impl Lines {
    pub fn new(timestamps: bool) -> Self {
        Lines {
            timestamps,
            partial: Vec::new(),
        }
    }

    /// The complete lines in `data` (plus what was held back), rendered.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.partial.extend_from_slice(data);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let whole: Vec<u8> = self.partial.drain(..=end).collect();
        let mut out = Vec::with_capacity(whole.len());
        for line in whole.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(&self.render(line));
        }
        out
    }

    fn render(&self, line: &[u8]) -> Vec<u8> {
        // Records from before the shim wrote timestamps pass through as they are.
        let mut parts = line.splitn(3, |b| *b == b' ');
        let (Some(ts), Some(stream), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            return line.to_vec();
        };
        let is_ts = ts.len() >= 20 && ts.ends_with(b"Z") && ts[0].is_ascii_digit();
        if !is_ts || !(stream == b"stdout" || stream == b"stderr") {
            return line.to_vec();
        }
        if self.timestamps {
            let mut v = ts.to_vec();
            v.push(b' ');
            v.extend_from_slice(rest);
            v
        } else {
            rest.to_vec()
        }
    }
}

fn chunk(task: &str, data: &[u8]) -> LogChunk {
    LogChunk {
        task: task.to_string(),
        data: data.to_vec(),
        ..Default::default()
    }
}

/// The last chunk of a followed log: the container exited with `code`.
fn last_chunk(task: &str, code: i32) -> LogChunk {
    LogChunk {
        task: task.to_string(),
        has_exit_code: true,
        exit_code: code,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn records_render_with_or_without_time() {
        let rec = b"2026-11-23T16:55:00.000000001Z stdout hello world\n2026-11-23T16:55:01.000000000Z stderr oops\nold style line\npart";
        assert_eq!(
            Lines::new(false).push(rec),
            b"hello world\noops\nold style line\n".to_vec()
        );
        let mut l = Lines::new(true);
        assert_eq!(
            l.push(rec),
            b"2026-11-23T16:55:00.000000001Z hello world\n2026-11-23T16:55:01.000000000Z oops\nold style line\n".to_vec()
        );
        assert_eq!(l.push(b"ial\n"), b"partial\n".to_vec());
    }

    /// A follower wakes when the shim records the exit (no poll interval in between), drains
    /// what was written before it, and ends with the exit code.
    #[tokio::test]
    async fn a_followed_log_ends_with_the_exit_code_as_soon_as_the_exit_is_recorded() {
        use futures::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = ContainerDir::new(tmp.path());
        std::fs::write(dir.log(), b"2026-11-23T16:55:00.000000001Z stdout one\n").unwrap();
        let mut stream = log_stream(tmp.path().to_path_buf(), "t1".into(), 0, true, false)
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.data, b"one\n");
        assert!(!first.has_exit_code);
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.log())
            .unwrap();
        log.write_all(b"2026-11-23T16:55:01.000000001Z stderr two\n")
            .unwrap();
        dir.write_exit_code(3).unwrap();
        // Well under the fallback check of a watched directory: the watch woke it.
        let rest = tokio::time::timeout(FOLLOW_FALLBACK / 2, async {
            let mut v = Vec::new();
            while let Some(c) = stream.next().await {
                v.push(c.unwrap());
            }
            v
        })
        .await
        .expect("the follower ends once the exit is recorded");
        let data: Vec<u8> = rest.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, b"two\n");
        let last = rest.last().unwrap();
        assert!(last.has_exit_code);
        assert_eq!(last.exit_code, 3);
    }

    /// Without `follow` the stream ends at the end of the file, with no exit code.
    #[tokio::test]
    async fn an_unfollowed_log_ends_at_its_end() {
        use futures::StreamExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = ContainerDir::new(tmp.path());
        std::fs::write(dir.log(), b"2026-11-23T16:55:00.000000001Z stdout one\n").unwrap();
        let chunks: Vec<LogChunk> =
            log_stream(tmp.path().to_path_buf(), "t1".into(), 0, false, false)
                .await
                .unwrap()
                .into_inner()
                .map(|c| c.unwrap())
                .collect()
                .await;
        assert_eq!(chunks.len(), 1);
        assert!(!chunks[0].has_exit_code);
    }

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
