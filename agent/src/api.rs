//! The agent's own API, called by controllers: container logs (and later exec, cp).

use std::path::PathBuf;
use std::pin::Pin;

use futures::Stream;
use rudder_proto::v1::agent_api_server::AgentApi;
use rudder_proto::v1::{LogChunk, TaskLogsRequest};
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

pub struct AgentApiImpl {
    pub containers: PathBuf,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentApiImpl {
    type TaskLogsStream = LogStream;

    async fn task_logs(
        &self,
        req: Request<TaskLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let id = req.into_inner().task_id;
        if id.is_empty() || id.contains('/') || id.contains("..") {
            return Err(Status::invalid_argument("bad task id"));
        }
        let path = self.containers.join(&id).join("log");
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Response::new(Box::pin(futures::stream::empty())))
            }
            Err(e) => return Err(Status::internal(format!("open log: {e}"))),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = LogChunk {
                            task: id.clone(),
                            data: buf[..n].to_vec(),
                            warning: String::new(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
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
