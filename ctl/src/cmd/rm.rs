//! `rctl rm SERVICE…`: removes services; their containers are stopped and removed by the agents.

use rudder_proto::v1::RemoveServiceRequest;

use crate::context::Context;

pub async fn run(ctx: &Context, services: &[String]) -> anyhow::Result<()> {
    let mut client = crate::connect(ctx).await?;
    for name in services {
        client
            .remove_service(RemoveServiceRequest { name: name.clone() })
            .await
            .map_err(crate::status_err)?;
        println!("service/{name} removed");
    }
    Ok(())
}
