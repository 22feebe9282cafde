//! Bearer-token authentication against Debian's `docker-registry` (the reference distribution
//! registry 2.8), no lab needed: the registry runs on 127.0.0.1 with `auth: token`, trusting
//! one self-signed ECDSA P-256 certificate (`rootcertbundle`), and a token service in this test
//! hands out ES256 JWTs carrying that certificate in `x5c`. So it is the real registry, not a
//! fake, that checks our tokens' signature, issuer, audience, lifetime and access claims.
//!
//! Shown: without a token the registry answers 401 with a `Bearer realm=…,service=…`
//! challenge, and refuses a garbage token; Rudder's registry client ([`RegistryClient`]) pings,
//! pushes an image (config, one layer, manifest) and a fresh client pulls it back byte for byte,
//! fetching tokens from the realm with the basic credentials and the scopes the registry asked
//! for; a token signed by another key (with the trusted certificate in `x5c`), a token whose
//! certificate the registry does not trust, and a wrong password are all refused, and the
//! client's push fails with an authentication error.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rudder_image::oci::{self, Descriptor, Manifest};
use rudder_image::{digest, AuthError, Credentials, ImageError, RegistryClient};
use rudder_tests::DistributionRegistry;

const SERVICE: &str = "test-registry";
const ISSUER: &str = "test-issuer";
const PASS: &str = "t0ken-pw";
/// Gets honest tokens.
const USER: &str = "tester";
/// Gets tokens carrying the trusted certificate but signed by another key.
const FORGER: &str = "forger";
/// Gets tokens signed by another key and carrying that key's own (untrusted) certificate.
const STRANGER: &str = "stranger";
const REPO: &str = "team/app";

/// An ES256 signing key and the self-signed certificate for it.
struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl Signer {
    fn generate() -> anyhow::Result<Signer> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert =
            rcgen::CertificateParams::new(vec![ISSUER.to_string()])?.self_signed(&key_pair)?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("load the rcgen P-256 key into ring: {e}"))?;
        Ok(Signer {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
        })
    }

    /// `r || s` (64 bytes, the JWS form) over `message`.
    fn sign(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let sig = self
            .key
            .sign(&SystemRandom::new(), message)
            .map_err(|e| anyhow::anyhow!("ES256 signing: {e}"))?;
        Ok(sig.as_ref().to_vec())
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS the way the distribution token spec wants it: `x5c` names the certificate the
/// registry must chain to its `rootcertbundle`, `signer` signs (normally the same key).
fn jwt(
    cert: &Signer,
    signer: &Signer,
    subject: &str,
    access: &[(String, Vec<String>)],
) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let header = serde_json::json!({
        "alg": "ES256",
        "typ": "JWT",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&cert.cert_der)],
    });
    let access: Vec<serde_json::Value> = access
        .iter()
        .map(|(name, actions)| {
            serde_json::json!({"type": "repository", "name": name, "actions": actions})
        })
        .collect();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{subject}-{now}-{}", std::process::id()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(&serde_json::to_vec(&header)?),
        b64url(&serde_json::to_vec(&claims)?)
    );
    let sig = signer.sign(input.as_bytes())?;
    Ok(format!("{input}.{}", b64url(&sig)))
}

/// One request the token service answered: who asked (basic user name, if any), for which
/// scopes, and whether it handed out a token.
#[derive(Debug, Clone)]
struct TokenRequest {
    user: Option<String>,
    service: Option<String>,
    scopes: Vec<String>,
    granted: bool,
}

/// The token service (the registry's `realm`): one thread, one request per connection
/// (`Connection: close`). Stopped and joined when dropped, also when the test panics.
struct TokenServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    fn start(trusted: Signer, rogue: Signer) -> anyhow::Result<TokenServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = stop.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = serve_token(conn, &trusted, &rogue, &log) {
                        eprintln!("token service: {e:#}");
                    }
                }
            })
        };
        Ok(TokenServer {
            addr,
            stop,
            log,
            thread: Some(thread),
        })
    }

    fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("token requests: {:#?}", self.requests());
        }
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one `GET /token?service=…&scope=…` the way a docker token service does: 401 for a
/// wrong password, otherwise a JWT granting exactly the asked-for repository actions (signed
/// honestly or not, by user name).
fn serve_token(
    mut conn: TcpStream,
    trusted: &Signer,
    rogue: &Signer,
    log: &Mutex<Vec<TokenRequest>>,
) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("bad request line {request_line:?}"))?;
    let url = reqwest::Url::parse(&format!("http://token{target}"))?;
    if url.path() != "/token" {
        return respond(&mut conn, "404 Not Found", "{}");
    }
    let mut service = None;
    let mut scopes = Vec::new();
    for (k, v) in url.query_pairs() {
        match &*k {
            "service" => service = Some(v.into_owned()),
            "scope" => scopes.push(v.into_owned()),
            _ => {}
        }
    }
    let credentials = authorization
        .as_deref()
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(Credentials::decode);
    let user = credentials.as_ref().map(|c| c.username.clone());
    let known = credentials
        .as_ref()
        .is_some_and(|c| c.password == PASS && [USER, FORGER, STRANGER].contains(&&*c.username));
    let entry = TokenRequest {
        user: user.clone(),
        service,
        scopes: scopes.clone(),
        granted: known,
    };
    log.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
    if !known {
        return respond(
            &mut conn,
            "401 Unauthorized",
            r#"{"details":"bad credentials"}"#,
        );
    }
    let user = user.unwrap_or_default();
    // `repository:NAME:pull,push` (NAME may hold no colon in this test).
    let access: Vec<(String, Vec<String>)> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("repository"), Some(name), Some(actions)) => Some((
                    name.to_string(),
                    actions.split(',').map(str::to_string).collect(),
                )),
                _ => None,
            }
        })
        .collect();
    let token = match &*user {
        FORGER => jwt(trusted, rogue, &user, &access)?,
        STRANGER => jwt(rogue, rogue, &user, &access)?,
        _ => jwt(trusted, trusted, &user, &access)?,
    };
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    respond(&mut conn, "200 OK", &body.to_string())
}

fn respond(conn: &mut TcpStream, status: &str, body: &str) -> anyhow::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()?;
    Ok(())
}

/// A `docker-registry` with token auth trusting `root_cert_pem`, tokens from `realm`.
fn start_registry(realm: &str, root_cert_pem: &str) -> anyhow::Result<DistributionRegistry> {
    DistributionRegistry::start(
        &format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n\
             \x20   rootcertbundle: {{dir}}/token-root.pem\n"
        ),
        &[("token-root.pem", root_cert_pem.as_bytes())],
    )
}

/// Is this the client's "the registry refused our credentials/token" error?
fn is_auth_failure(e: &ImageError) -> bool {
    matches!(e, ImageError::Auth(AuthError::Failed { .. }))
}

/// A tiny image: a config blob, one (uncompressed tar) layer holding `/hello`, and the manifest.
fn small_image() -> anyhow::Result<(Vec<u8>, Vec<u8>, Manifest)> {
    let mut layer = tar::Builder::new(Vec::new());
    let data = b"hello through a bearer token\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    layer.append_data(&mut header, "hello", &data[..])?;
    let layer = layer.into_inner()?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci::host_architecture(),
        "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [digest::of_bytes(&layer)]},
    }))?;
    let manifest = Manifest::oci(
        Descriptor::new(
            oci::OCI_CONFIG,
            digest::of_bytes(&config),
            config.len() as u64,
        ),
        vec![Descriptor::new(
            oci::OCI_LAYER_TAR,
            digest::of_bytes(&layer),
            layer.len() as u64,
        )],
    );
    Ok((config, layer, manifest))
}

/// Pushes the image as `REPO:v1` through `client`.
async fn push(
    client: &RegistryClient,
    config: &[u8],
    layer: &[u8],
    manifest: &Manifest,
) -> Result<String, ImageError> {
    client
        .push_blob(REPO, &manifest.config.digest, config.to_vec())
        .await?;
    client
        .push_blob(REPO, &manifest.layers[0].digest, layer.to_vec())
        .await?;
    client
        .push_manifest(REPO, "v1", oci::OCI_MANIFEST, manifest.to_bytes())
        .await
}

#[test]
fn bearer_tokens_from_a_token_service_get_through_docker_registry() -> anyhow::Result<()> {
    let trusted = Signer::generate()?;
    let rogue = Signer::generate()?;
    let root_pem = trusted.cert_pem.clone();
    let tokens = TokenServer::start(trusted, rogue)?;
    let registry = start_registry(&tokens.realm(), &root_pem)?;
    let base = format!("http://{}", registry.host());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(scenario(&tokens, &registry, &base));
    if result.is_err() {
        eprintln!(
            "token requests: {:#?}\nregistry log:\n{}",
            tokens.requests(),
            registry.log()
        );
    }
    result
}

async fn scenario(
    tokens: &TokenServer,
    registry: &DistributionRegistry,
    base: &str,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();

    // Without a token: 401 and a challenge naming our realm and service.
    let resp = http.get(format!("{base}/v2/")).send().await?;
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let challenge = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .context("401 without WWW-Authenticate")?
        .to_str()?
        .to_string();
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains(&format!("realm=\"{}\"", tokens.realm()))
            && challenge.contains(&format!("service=\"{SERVICE}\"")),
        "{challenge}"
    );
    // A token that is not a JWT at all is refused as such.
    let resp = http
        .get(format!("{base}/v2/"))
        .bearer_auth("not.a.token")
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let challenge = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(challenge.contains("invalid_token"), "{challenge}");

    let (config, layer, manifest) = small_image()?;
    let host = registry.host();

    // Refused tokens first, while the repository is still empty: none of them may write.
    for (user, password, why) in [
        (FORGER, PASS, "signed by a key other than the certificate's"),
        (STRANGER, PASS, "certificate not in rootcertbundle"),
        (USER, "wrong", "wrong password at the token service"),
    ] {
        let client = RegistryClient::remote(&host, true, Some(Credentials::new(user, password)))?;
        match push(&client, &config, &layer, &manifest).await {
            Ok(d) => panic!("push as {user} ({why}) succeeded: {d}"),
            Err(e) => assert!(is_auth_failure(&e), "push as {user} ({why}): {e}"),
        }
    }
    let refused = registry.log();
    assert!(
        refused.contains("unable to verify token signature"),
        "forged signature not what the registry refused:\n{refused}"
    );
    assert!(
        refused.contains("unable to verify certificate chain"),
        "untrusted certificate not what the registry refused:\n{refused}"
    );

    // The honest user: ping, push, and a fresh client (new token cache) pulls it back.
    let pusher = RegistryClient::remote(&host, true, Some(Credentials::new(USER, PASS)))?;
    pusher.ping().await?;
    assert!(
        !pusher.blob_exists(REPO, &manifest.config.digest).await?,
        "a refused client got a blob in"
    );
    let pushed = push(&pusher, &config, &layer, &manifest).await?;
    assert_eq!(pushed, digest::of_bytes(&manifest.to_bytes()));

    let puller = RegistryClient::remote(&host, true, Some(Credentials::new(USER, PASS)))?;
    let (media_type, bytes, got) = puller.get_manifest(REPO, "v1").await?;
    assert_eq!(media_type, oci::OCI_MANIFEST);
    assert_eq!(got, pushed);
    assert_eq!(bytes, manifest.to_bytes());
    let dir = tempfile::tempdir()?;
    for (desc, want) in [(&manifest.config, &config), (&manifest.layers[0], &layer)] {
        let dest = dir.path().join(digest::hex_of(&desc.digest)?);
        let n = puller.get_blob_to_file(REPO, &desc.digest, &dest).await?;
        assert_eq!(n, want.len() as u64);
        assert_eq!(&std::fs::read(&dest)?, want, "{}", desc.digest);
    }

    // Without credentials the token service says no, and so does the client.
    let anonymous = RegistryClient::remote(&host, true, None)?;
    let e = anonymous.get_manifest(REPO, "v1").await.unwrap_err();
    assert!(
        matches!(e, ImageError::Auth(AuthError::Required { .. })),
        "anonymous pull: {e}"
    );

    // The tokens came from our service, for the service and scopes the registry asked for.
    let asked = tokens.requests();
    let honest: Vec<&TokenRequest> = asked
        .iter()
        .filter(|r| r.granted && r.user.as_deref() == Some(USER))
        .collect();
    assert!(
        honest.iter().all(|r| r.service.as_deref() == Some(SERVICE)),
        "{asked:#?}"
    );
    let push_scope = format!("repository:{REPO}:pull,push");
    let pull_scope = format!("repository:{REPO}:pull");
    assert!(
        honest.iter().any(|r| r.scopes == [push_scope.clone()]),
        "{asked:#?}"
    );
    assert!(
        honest.iter().any(|r| r.scopes == [pull_scope.clone()]),
        "{asked:#?}"
    );
    assert!(
        honest.iter().any(|r| r.scopes.is_empty()),
        "ping token: {asked:#?}"
    );
    Ok(())
}
