//! Where a build's `ADD <url>` may fetch from. The download runs in the agent's own network
//! namespace, so without checks a Dockerfile could bake into an image what only this host can
//! reach: its loopback services, the cloud metadata service (169.254.169.254), services bound
//! to the host's own addresses.
//!
//! Refused, for the URL and for every redirect hop: loopback, link-local (169.254/16,
//! fe80::/10), unspecified, multicast and broadcast addresses, and every address of this host's
//! interfaces (IPv4-mapped IPv6 forms too). A name is resolved by the client's own resolver,
//! which drops refused addresses, and the connection goes only to the addresses it kept (no
//! second lookup to rebind). At most [`MAX_REDIRECTS`] redirects, and [`TIMEOUT`] for a whole
//! download.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How many redirects one ADD URL may take.
pub const MAX_REDIRECTS: usize = 5;
/// The longest one ADD URL's download may take, from connecting to its last byte.
pub const TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AddUrlError {
    #[error("add: {host} is {why}, which a build may not fetch from")]
    Refused { host: String, why: &'static str },
    #[error("add: cannot make the web client: {0}")]
    Client(String),
}

/// Why a build may not fetch from `ip`, if it may not; `own`: this host's addresses.
pub fn refused(ip: IpAddr, own: &[IpAddr]) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let why = match ip {
        IpAddr::V4(v4) if v4.is_loopback() => "a loopback address",
        IpAddr::V4(v4) if v4.is_link_local() => "a link-local address",
        IpAddr::V4(v4) if v4.is_unspecified() => "the unspecified address",
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => "a multicast address",
        IpAddr::V6(v6) if v6.is_loopback() => "a loopback address",
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => "a link-local address",
        IpAddr::V6(v6) if v6.is_unspecified() => "the unspecified address",
        IpAddr::V6(v6) if v6.is_multicast() => "a multicast address",
        _ if own.contains(&ip) => "an address of this cluster's hosts",
        _ => return None,
    };
    Some(why)
}

/// The IP literal a URL's host is, if it is one.
fn literal(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// What says whether an address is refused ([`refused`]; tests use narrower ones).
type Refuse = fn(IpAddr, &[IpAddr]) -> Option<&'static str>;

/// Refuses a URL whose host is a refused address written as such (names are checked when
/// resolved).
pub fn check_url(url: &reqwest::Url, own: &[IpAddr]) -> Result<(), AddUrlError> {
    check_url_with(url, own, refused)
}

fn check_url_with(url: &reqwest::Url, own: &[IpAddr], refuse: Refuse) -> Result<(), AddUrlError> {
    match literal(url).and_then(|ip| refuse(ip, own).map(|why| (ip, why))) {
        Some((ip, why)) => Err(AddUrlError::Refused {
            host: ip.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// The addresses of this host's interfaces (in the agent's network namespace).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we walk read-only and free once; every
    // sockaddr is read as the type its family says.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Resolves names for ADD downloads, dropping refused addresses.
struct Resolver {
    own: Arc<Vec<IpAddr>>,
    refuse: Refuse,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (own, refused) = (self.own.clone(), self.refuse);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = all
                .iter()
                .filter(|a| refused(a.ip(), &own).is_none())
                .copied()
                .collect();
            if kept.is_empty() {
                if let Some(a) = all.first() {
                    let why = refused(a.ip(), &own).unwrap_or("refused");
                    return Err(Box::new(AddUrlError::Refused {
                        host: format!("{host} ({})", a.ip()),
                        why,
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The web client for ADD downloads: the image crate's (system roots for https), with the
/// address checks, redirect limit and total timeout above. `own`: this host's addresses.
pub fn client(own: Vec<IpAddr>) -> Result<reqwest::Client, AddUrlError> {
    client_with(own, refused)
}

fn client_with(own: Vec<IpAddr>, refuse: Refuse) -> Result<reqwest::Client, AddUrlError> {
    let own = Arc::new(own);
    let for_redirects = own.clone();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("add: more than {MAX_REDIRECTS} redirects"));
        }
        if !matches!(attempt.url().scheme(), "http" | "https") {
            let scheme = attempt.url().scheme().to_string();
            return attempt.error(format!("add: a redirect to a {scheme}: URL"));
        }
        match check_url_with(attempt.url(), &for_redirects, refuse) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    });
    rudder_image::RegistryClient::web_builder()
        .map_err(|e| AddUrlError::Client(e.to_string()))?
        .dns_resolver(Arc::new(Resolver { own, refuse }))
        // Never through a proxy from the agent's environment: the proxy would resolve the
        // name itself, past the resolver's checks.
        .no_proxy()
        .redirect(policy)
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| AddUrlError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_metadata_addresses_are_refused() {
        let own: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap()];
        let cases = [
            ("127.0.0.1", Some("a loopback address")),
            ("127.8.9.1", Some("a loopback address")),
            ("::1", Some("a loopback address")),
            ("::ffff:127.0.0.1", Some("a loopback address")),
            ("169.254.169.254", Some("a link-local address")),
            ("fe80::1", Some("a link-local address")),
            ("febf::1", Some("a link-local address")),
            ("0.0.0.0", Some("the unspecified address")),
            ("::", Some("the unspecified address")),
            ("224.0.0.1", Some("a multicast address")),
            ("10.1.2.3", Some("an address of this cluster's hosts")),
            (
                "::ffff:10.1.2.3",
                Some("an address of this cluster's hosts"),
            ),
            ("10.1.2.4", None),
            ("93.184.216.34", None),
            ("2001:db8::1", None),
            ("fec0::1", None),
        ];
        for (ip, want) in cases {
            assert_eq!(refused(ip.parse().unwrap(), &own), want, "{ip}");
        }
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(check_url(&url("http://[::1]:8000/x"), &own).is_err());
        let e = check_url(&url("http://169.254.169.254/latest/meta-data/"), &own)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "add: 169.254.169.254 is a link-local address, which a build may not fetch from"
        );
        assert!(check_url(&url("http://example.com/x"), &own).is_ok());
        assert!(host_addresses().iter().any(|a| a.is_loopback()));
    }

    /// A local server that redirects `/r/N` to `/r/N-1`, `/r/0` to `/ok`, and `/loop` to
    /// 127.0.0.1; serves "ok" at `/ok`. Bound to a loopback address the client is told is not
    /// refused (the check is the point of the other test).
    fn server() -> SocketAddr {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = [0u8; 2048];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp = if path == "/ok" {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".into()
                } else if let Some(n) = path.strip_prefix("/r/") {
                    let n: usize = n.parse().unwrap_or(0);
                    let to = if n == 0 {
                        "/ok".to_string()
                    } else {
                        format!("/r/{}", n - 1)
                    };
                    format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                } else {
                    "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/x\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = c.write_all(resp.as_bytes());
            }
        });
        addr
    }

    /// Refuses link-local addresses only, so the test server on loopback is reachable.
    fn link_local_only(ip: IpAddr, _: &[IpAddr]) -> Option<&'static str> {
        refused(ip, &[]).filter(|w| *w == "a link-local address")
    }

    #[tokio::test]
    async fn redirects_are_counted_and_checked() {
        let addr = server();
        // The real client: a name resolving to loopback is refused by its resolver, and a
        // redirect hop to a loopback literal by its redirect check.
        let c = client(vec![]).unwrap();
        let chain = |e: reqwest::Error| rudder_proto::error_chain(&e);
        let e = c
            .get(format!("http://localhost:{}/ok", addr.port()))
            .send()
            .await
            .unwrap_err();
        assert!(chain(e).contains("is a loopback address"));
        let e = c
            .get(format!("http://{addr}/r/0"))
            .send()
            .await
            .unwrap_err();
        assert!(chain(e).contains("127.0.0.1 is a loopback address"));

        // Counting hops, with loopback allowed for the test server.
        let c = client_with(vec![], link_local_only).unwrap();
        let get = |p: &str| c.get(format!("http://{addr}{p}")).send();
        let ok = get("/r/4").await.unwrap();
        assert_eq!(ok.text().await.unwrap(), "ok");
        let e = chain(get("/r/6").await.unwrap_err());
        assert!(e.contains("more than 5 redirects"), "{e}");
        let e = chain(get("/loop").await.unwrap_err());
        assert!(e.contains("169.254.169.254 is a link-local address"), "{e}");
    }
}
