//! `rctl rollback SERVICE`: back to the previous spec, with the service's rollback_config, then
//! wait (as `apply` does) until that has converged.

use rudder_proto::v1::RollbackRequest;

use crate::context::Context;

pub async fn run(
    ctx: &Context,
    service: &str,
    detach: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    client
        .rollback(RollbackRequest {
            service: service.to_string(),
        })
        .await
        .map_err(crate::status_err)?;
    println!("service/{service} rolling back");
    if detach {
        return Ok(());
    }
    // The rollback is the change this command made; its completion is success here.
    super::apply::wait_converged(ctx, &[(service.to_string(), false)], timeout).await
}
