//! `rctl rebalance SERVICE`: move a replicated service's tasks so they spread evenly over the
//! nodes that may run them (after a node joined or came back), as a rolling update under the
//! service's `update_config`; then wait until the moved slots run again (`--detach` skips it).

use rudder_proto::v1::RebalanceRequest;

use crate::context::Context;

pub async fn run(
    ctx: &Context,
    service: &str,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .rebalance(RebalanceRequest {
            service: service.to_string(),
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    println!("service/{service}: {}", resp.message);
    if detach || resp.slots.is_empty() {
        return Ok(());
    }
    let start = std::time::Instant::now();
    loop {
        let list = crate::services(&mut client).await?;
        let svc = list
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| anyhow::anyhow!("service {service:?} was removed"))?;
        if svc.rebalance_completed_ms != 0 {
            println!("service/{service}: {}", svc.rebalance_message);
            return Ok(());
        }
        if start.elapsed() > timeout {
            anyhow::bail!(
                "service/{service}: rebalance not completed after {}s (see `rctl describe {service}`)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
