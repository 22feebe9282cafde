//! `rctl dashboard token [--ttl 1h]`: a short-lived login token for the controller's web
//! dashboard (admin only); `rctl dashboard open`: the URL that logs a browser in with a new
//! one. A token logs in once (per controller) and a session ends with its token.

use rudder_proto::v1::DashboardTokenRequest;

use crate::context::Context;

/// `rctl dashboard …`.
#[derive(Debug, clap::Subcommand)]
pub enum DashboardCmd {
    /// Print a login token for the dashboard (paste it into its login page).
    Token {
        /// How long the token may be used to log in, and the session lasts (at most 24h).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Print the URL that logs a browser into the dashboard with a new token.
    Open {
        /// How long the URL may be used to log in, and the session lasts (at most 24h).
        #[arg(long, default_value = "10m")]
        ttl: String,
    },
}

/// The token request for `--ttl`.
pub fn request(ttl: &str) -> anyhow::Result<DashboardTokenRequest> {
    let ms = rudder_model::duration::parse(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    anyhow::ensure!(ms >= 1000, "--ttl: at least 1s");
    Ok(DashboardTokenRequest {
        ttl_seconds: ms / 1000,
    })
}

/// `https://HOST:PORT/login?token=…` for the controller at `controller_url`.
pub fn login_url(controller_url: &str, port: u32, token: &str) -> anyhow::Result<String> {
    let rest = controller_url
        .split_once("://")
        .map_or(controller_url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    anyhow::ensure!(!host.is_empty(), "no host in {controller_url:?}");
    // Tokens are `rdt1.HEX.HEX`: nothing to escape in a query.
    anyhow::ensure!(
        token.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'),
        "unexpected characters in the token"
    );
    Ok(format!("https://{host}:{port}/login?token={token}"))
}

pub async fn run(ctx: &Context, cmd: &DashboardCmd) -> anyhow::Result<()> {
    let ttl = match cmd {
        DashboardCmd::Token { ttl } | DashboardCmd::Open { ttl } => ttl,
    };
    let mut client = crate::connect(ctx).await?;
    let resp = client
        .dashboard_token(request(ttl)?)
        .await
        .map_err(crate::status_err)?
        .into_inner();
    match cmd {
        DashboardCmd::Token { .. } => println!("{}", resp.token),
        DashboardCmd::Open { .. } => {
            anyhow::ensure!(
                resp.dashboard_port != 0,
                "the controller serves no dashboard: start it with --dashboard-listen ADDR"
            );
            let first = ctx
                .controller_urls()
                .into_iter()
                .next()
                .ok_or_else(|| anyhow::anyhow!("no controller in the context"))?;
            println!("{}", login_url(&first, resp.dashboard_port, &resp.token)?);
            eprintln!("(logs in once; the session ends with the token)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_a_duration_of_a_second_or_more() {
        assert_eq!(request("1h").unwrap().ttl_seconds, 3600);
        assert_eq!(request("90s").unwrap().ttl_seconds, 90);
        assert!(request("500ms").is_err());
        assert!(request("soon").is_err());
    }

    #[test]
    fn the_login_url_uses_the_controller_host() {
        let u = login_url("http://10.213.1.1:4243", 4249, "rdt1.ab.cd").unwrap();
        assert_eq!(u, "https://10.213.1.1:4249/login?token=rdt1.ab.cd");
        let u = login_url("https://ctl.example:4243/", 4249, "rdt1.ab.cd").unwrap();
        assert_eq!(u, "https://ctl.example:4249/login?token=rdt1.ab.cd");
        assert!(login_url("http://h:1", 2, "a&b").is_err());
    }
}
