//! `rctl scale SERVICE=N…`: changes only the replica count of replicated services.

use rudder_proto::v1::ScaleRequest;

use crate::context::Context;

/// Parses `SERVICE=N`.
pub fn parse(arg: &str) -> anyhow::Result<(String, u64)> {
    let (name, n) = arg
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{arg:?}: expected SERVICE=REPLICAS"))?;
    let n = n
        .parse()
        .map_err(|_| anyhow::anyhow!("{arg:?}: replicas must be a whole number"))?;
    Ok((name.to_string(), n))
}

pub async fn run(ctx: &Context, args: &[String]) -> anyhow::Result<()> {
    let parsed = args
        .iter()
        .map(|a| parse(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = crate::connect(ctx).await?;
    for (service, replicas) in parsed {
        client
            .scale(ScaleRequest {
                service: service.clone(),
                replicas,
            })
            .await
            .map_err(crate::status_err)?;
        println!("service/{service} scaled to {replicas}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_service_eq_n() {
        assert_eq!(super::parse("web=3").unwrap(), ("web".to_string(), 3));
        assert!(super::parse("web").is_err());
        assert!(super::parse("web=x").is_err());
    }
}
