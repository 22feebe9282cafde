//! `rctl`, the Rudder command line, as a library: one module per command under `cmd`, the
//! cluster context, and the local multi-host lab (`lab`) that tests use too.

pub mod cmd;
pub mod context;
pub mod lab;

use std::time::Duration;

use rudder_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

/// Connects to the controller named by the context.
pub async fn connect(ctx: &context::Context) -> anyhow::Result<ControlClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(ctx.controller.clone())?
        .connect_timeout(Duration::from_secs(3));
    let ch = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the controller at {}: {e}", ctx.controller))?;
    Ok(ControlClient::new(ch))
}

/// Turns a gRPC status into an error whose message is the server's sentence.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
