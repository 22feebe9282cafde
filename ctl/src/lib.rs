//! `rctl`, the Rudder command line, as a library: one module per command under `cmd` and the
//! cluster context. The local multi-host lab behind `rctl local` is the `rudder-lab` crate.

pub mod cmd;
pub mod context;
pub mod convert;
pub mod output;
pub mod progress;

use std::time::Duration;

use rudder_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

/// How long `connect` waits for each controller before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects to the first controller of the context that answers: any controller serves the
/// Control API (reads locally, writes forwarded to the leader).
pub async fn connect(ctx: &context::Context) -> anyhow::Result<ControlClient<Channel>> {
    Ok(ControlClient::new(channel(ctx).await?))
}

/// A mutual-TLS channel to the first controller of the context that answers. The context's
/// admin certificate is renewed on the way when it is in the last third of its lifetime.
pub async fn channel(ctx: &context::Context) -> anyhow::Result<Channel> {
    cmd::admin::check_not_expired(ctx)?;
    let ch = dial_any(ctx).await?;
    if let Err(e) = cmd::admin::renew_if_due(ctx, ch.clone()).await {
        eprintln!("warning: {e}");
    }
    Ok(ch)
}

async fn dial_any(ctx: &context::Context) -> anyhow::Result<Channel> {
    let urls = ctx.controller_urls();
    if urls.is_empty() {
        anyhow::bail!("the context names no controller; run `rctl local up` or pass --controller");
    }
    let tls = match ctx.credentials()? {
        Some(c) => Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(c.ca))
                .identity(tonic::transport::Identity::from_pem(c.cert, c.key))
                .domain_name(rudder_pki::ca::Role::Manager.server_name()),
        ),
        None => None,
    };
    let mut failures = Vec::new();
    for url in &urls {
        match dial(url, tls.as_ref()).await {
            Ok(ch) => {
                tracing::debug!(controller = %url, "connected");
                return Ok(ch);
            }
            Err(e) => {
                tracing::debug!(controller = %url, %e, "cannot connect");
                failures.push(format!("{url}: {e}"));
            }
        }
    }
    Err(unreachable(&failures))
}

async fn dial(
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel, String> {
    let url = match (tls, url.strip_prefix("http://")) {
        (Some(_), Some(rest)) => format!("https://{rest}"),
        _ => url.to_string(),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| rudder_proto::error_chain(&e))?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = tls {
        endpoint = endpoint
            .tls_config(t.clone())
            .map_err(|e| rudder_proto::error_chain(&e))?;
    }
    // The connect timeout covers TCP only; bound the whole attempt too.
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect()).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(rudder_proto::error_chain(&e)),
        Err(_) => Err("timed out".to_string()),
    }
}

/// One error naming every address tried (`failures`: `url: reason` each).
fn unreachable(failures: &[String]) -> anyhow::Error {
    match failures {
        [one] => anyhow::anyhow!("cannot reach the controller at {one}"),
        _ => anyhow::anyhow!(
            "cannot reach any of the {} controllers:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ),
    }
}

/// Turns a gRPC status into an error whose message is the server's sentence. A controller
/// without a leader or quorum says so in words meant for the user, so that is printed as it is;
/// other `unavailable`s come from the transport and get said to be about the controller.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    let msg = s.message();
    let from_raft = msg.contains("leader") || msg.contains("quorum");
    if s.code() == tonic::Code::Unavailable && !from_raft {
        anyhow::anyhow!("the controller is unavailable: {msg}")
    } else {
        anyhow::anyhow!("{msg}")
    }
}

type Client = ControlClient<Channel>;

/// Every service, as the controller summarises it.
pub async fn services(c: &mut Client) -> anyhow::Result<Vec<rudder_proto::v1::ServiceSummary>> {
    Ok(
        c.list_services(rudder_proto::v1::ListServicesRequest::default())
            .await
            .map_err(status_err)?
            .into_inner()
            .services,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_quorum_prints_the_server_sentence() {
        let msg = "raft: no leader: a majority of the controllers cannot be reached, so the \
                   cluster refuses writes until quorum returns";
        let e = status_err(tonic::Status::unavailable(msg));
        assert_eq!(e.to_string(), msg);
        let e = status_err(tonic::Status::unavailable("transport error"));
        assert_eq!(
            e.to_string(),
            "the controller is unavailable: transport error"
        );
        let e = status_err(tonic::Status::not_found("service \"web\" not found"));
        assert_eq!(e.to_string(), "service \"web\" not found");
    }

    #[test]
    fn the_error_names_every_controller_tried() {
        let e = unreachable(&["http://a:4243: refused".into()]);
        assert_eq!(
            e.to_string(),
            "cannot reach the controller at http://a:4243: refused"
        );
        let e = unreachable(&[
            "http://a:4243: refused".into(),
            "http://b:4243: timed out".into(),
        ]);
        assert_eq!(
            e.to_string(),
            "cannot reach any of the 2 controllers:\n  http://a:4243: refused\n  http://b:4243: timed out"
        );
    }

    #[tokio::test]
    async fn connect_tries_every_controller_in_order() {
        // Two ports nothing listens on: bind, note the port, close.
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (a, b) = (free(), free());
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = live.local_addr().unwrap().port();
        let ctx = context::Context {
            name: String::new(),
            controller: String::new(),
            controllers: vec![format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}")],
            registry: String::new(),
            ca: None,
            cert: None,
            key: None,
        };
        let e = connect(&ctx).await.unwrap_err().to_string();
        assert!(e.contains(&format!("http://127.0.0.1:{a}")), "{e}");
        assert!(e.contains(&format!("http://127.0.0.1:{b}")), "{e}");
        let ctx = context::Context {
            controllers: vec![format!("127.0.0.1:{a}"), format!("127.0.0.1:{c}")],
            ..ctx
        };
        // An accepting socket is enough for the channel to connect; the first controller is
        // skipped.
        let (client, accepted) = tokio::join!(connect(&ctx), live.accept());
        accepted.unwrap();
        client.unwrap();
    }
}
