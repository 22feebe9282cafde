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

type Client = ControlClient<Channel>;

/// Every service, as the controller summarises it.
pub async fn services(c: &mut Client) -> anyhow::Result<Vec<rudder_proto::v1::ServiceSummary>> {
    Ok(c.list_services(rudder_proto::v1::ListServicesRequest {})
        .await
        .map_err(status_err)?
        .into_inner()
        .services)
}

/// The tasks of one service (`""`: of every service), history included.
pub async fn tasks(
    c: &mut Client,
    service: &str,
) -> anyhow::Result<Vec<rudder_proto::v1::TaskSummary>> {
    Ok(c.list_tasks(rudder_proto::v1::ListTasksRequest {
        service: service.to_string(),
    })
    .await
    .map_err(status_err)?
    .into_inner()
    .tasks)
}

pub async fn nodes(c: &mut Client) -> anyhow::Result<Vec<rudder_proto::v1::NodeSummary>> {
    Ok(c.list_nodes(rudder_proto::v1::ListNodesRequest {})
        .await
        .map_err(status_err)?
        .into_inner()
        .nodes)
}
