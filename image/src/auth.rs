//! Authentication to registries outside the cluster, the way docker does it: the registry
//! answers a request with 401 and a `WWW-Authenticate` challenge, the client answers the
//! challenge and retries once.
//!
//! - `Basic realm="…"`: the request is retried with the stored user name and password.
//! - `Bearer realm="https://auth…",service="…",scope="repository:team/app:pull"`: the client
//!   GETs the realm with `service` and `scope` (sending the basic credentials when it has
//!   some, anonymously otherwise), takes `token` or `access_token` from the JSON answer, and
//!   retries with `Authorization: Bearer`. Tokens are cached per scope for the life of the
//!   [`Authenticator`] (one `rctl` command), so each repository costs one token request.
//!
//! Once a registry's scheme is known, later requests carry credentials up front (a bearer
//! token is fetched before the request that needs it), which matters for blob uploads: their
//! streamed bodies cannot be sent twice.
//!
//! Credentials live in a docker-style auth file ([`AuthFile`]: `{"auths": {"HOST": {"auth":
//! base64("user:password")}}}`); where it is kept is the caller's choice. The cluster's own
//! registry uses mutual TLS and never sees any of this.
//!
//! Invariants: a password is never logged or shown by `Debug`; a token is only sent to the
//! registry it was issued for (one [`Authenticator`] per registry); a request is sent at most
//! twice, and a 401 to the retry is [`AuthError::Failed`] (or [`AuthError::Required`] when
//! there are no credentials), never another round.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use serde::{Deserialize, Serialize};
use tracing::debug;

/// What can go wrong while authenticating to a registry or reading the auth file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Credentials were sent (or a token obtained) and the registry still said 401.
    #[error("image: {registry}: authentication failed")]
    Failed {
        /// The registry, `host[:port]`.
        registry: String,
    },

    /// The registry wants credentials and none are stored for it.
    #[error("image: {registry}: authentication required")]
    Required {
        /// The registry, `host[:port]`.
        registry: String,
    },

    /// A `WWW-Authenticate` header that is neither a usable Basic nor Bearer challenge.
    #[error("image: {registry}: unusable authentication challenge {header:?}: {reason}")]
    Challenge {
        /// The registry, `host[:port]`.
        registry: String,
        /// The header as received.
        header: String,
        /// Why.
        reason: String,
    },

    /// The bearer token service (the challenge's realm) failed or answered nonsense.
    #[error("image: {registry}: token from {realm}: {detail}")]
    Token {
        /// The registry, `host[:port]`.
        registry: String,
        /// The token service URL.
        realm: String,
        /// Why.
        detail: String,
    },

    /// The auth file could not be read, parsed or written.
    #[error("image: auth file {path}: {detail}")]
    File {
        /// The path concerned.
        path: String,
        /// Why.
        detail: String,
    },
}

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name, as stored in the auth file.
    pub username: String,
    /// The password or token; never printed (see the `Debug` impl).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Credentials from a user name and a password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// `base64(user:password)`, the value of a Basic `Authorization` header after `Basic `
    /// and of `auths.HOST.auth` in the auth file.
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.username, self.password))
    }

    /// The inverse of [`Credentials::encode`].
    pub fn decode(encoded: &str) -> Option<Credentials> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        Some(Credentials::new(user, password))
    }

    fn basic_header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Basic {}", self.encode()))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        v.set_sensitive(true);
        v
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`: send the stored user name and password.
    Basic {
        /// The token service URL.
        realm: Option<String>,
    },
    /// `Bearer realm=…`: get a token from the realm's service first.
    Bearer {
        /// The token service URL.
        realm: String,
        /// The `service` parameter to pass to the token service.
        service: Option<String>,
        /// What the refused request needed, e.g. `repository:team/app:pull,push`.
        scope: Option<String>,
    },
}

/// Parses one `WWW-Authenticate` value: a scheme, then comma-separated `key=value` parameters
/// whose values are tokens or quoted strings (which may contain commas, as scopes do). Scheme
/// and keys are case-insensitive. `Err` carries the reason.
pub fn parse_challenge(header: &str) -> Result<Challenge, String> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    let params = parse_params(rest)?;
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Ok(Challenge::Basic {
            realm: params.get("realm").cloned(),
        }),
        "bearer" => {
            let realm = params
                .get("realm")
                .filter(|r| !r.is_empty())
                .cloned()
                .ok_or("bearer challenge without a realm")?;
            Ok(Challenge::Bearer {
                realm,
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            })
        }
        "" => Err("empty challenge".into()),
        other => Err(format!(
            "unsupported scheme {other:?} (want Basic or Bearer)"
        )),
    }
}

fn parse_params(mut s: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    loop {
        s = s.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if s.is_empty() {
            return Ok(out);
        }
        let eq = s
            .find('=')
            .ok_or_else(|| format!("parameter without '=' at {s:?}"))?;
        let key = s[..eq].trim().to_ascii_lowercase();
        if key.is_empty() || key.contains([',', ' ', '"']) {
            return Err(format!("bad parameter name at {s:?}"));
        }
        s = s[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = s.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, next)) = chars.next() {
                            v.push(next);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end.ok_or_else(|| format!("unterminated quoted value for {key}"))?;
            value = v;
            s = &quoted[end + 1..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        out.insert(key, value);
    }
}

/// The challenge to answer from a 401's headers: a Bearer one when the registry offers both.
pub(crate) fn challenge_from(headers: &HeaderMap) -> Option<Result<Challenge, (String, String)>> {
    let values: Vec<&str> = headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let parsed: Vec<_> = values
        .iter()
        .map(|v| parse_challenge(v).map_err(|reason| (v.to_string(), reason)))
        .collect();
    let bearer = parsed
        .iter()
        .find(|c| matches!(c, Ok(Challenge::Bearer { .. })));
    let basic = parsed
        .iter()
        .find(|c| matches!(c, Ok(Challenge::Basic { .. })));
    bearer.or(basic).or(parsed.first()).cloned()
}

/// What one request needs: a repository and the actions on it (the bearer `scope`), or
/// nothing in particular (the `/v2/` ping).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The registry itself (the `/v2/` ping): no repository scope.
    Registry,
    /// Reading this repository.
    Pull(String),
    /// Writing this repository (pushes may also read it).
    Push(String),
}

impl Scope {
    /// The distribution token-spec scope string, `None` for the registry as a whole.
    pub fn as_token_scope(&self) -> Option<String> {
        match self {
            Scope::Registry => None,
            Scope::Pull(repo) => Some(format!("repository:{repo}:pull")),
            Scope::Push(repo) => Some(format!("repository:{repo}:pull,push")),
        }
    }
}

/// The largest token answer taken from a realm.
const MAX_TOKEN_ANSWER: usize = 1 << 20;

/// Answers one registry's challenges and remembers the answers: which scheme it wants, and a
/// bearer token per scope. Shared by the clones of one [`RegistryClient`](crate::RegistryClient).
pub struct Authenticator {
    registry: String,
    credentials: Option<Credentials>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last challenge the registry sent: how to authenticate from now on.
    challenge: Option<Challenge>,
    /// Bearer tokens by scope string ("" for the registry as a whole).
    tokens: HashMap<String, String>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("registry", &self.registry)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `registry` names the registry in errors (its base URL).
    pub fn new(registry: impl Into<String>, credentials: Option<Credentials>) -> Authenticator {
        Authenticator {
            registry: registry.into(),
            credentials,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `Authorization` header to send for `scope`, from what is already known: basic
    /// credentials, or a cached bearer token (fetched now when the registry is known to want
    /// bearer tokens and this scope has none yet). `None` before the first challenge.
    pub async fn header_for(
        &self,
        http: &reqwest::Client,
        scope: &Scope,
    ) -> Result<Option<HeaderValue>, AuthError> {
        let challenge = self.state().challenge.clone();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic { .. }) => {
                Ok(self.credentials.as_ref().map(Credentials::basic_header))
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let key = scope.as_token_scope().unwrap_or_default();
                let cached = self.state().tokens.get(&key).cloned();
                let token = match cached {
                    Some(t) => t,
                    None => {
                        let t = self
                            .fetch_token(http, &realm, service.as_deref(), scope.as_token_scope())
                            .await?;
                        self.state().tokens.insert(key, t.clone());
                        t
                    }
                };
                Ok(Some(bearer_header(&token)))
            }
        }
    }

    /// Learns from a 401 to a request for `scope`: records the challenge and returns the
    /// header to retry with (for Bearer, a fresh token: the one refused may have expired or
    /// lacked a right). `sent_basic` says whether the refused request carried the basic
    /// credentials already: sending them again is pointless, they are wrong.
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        scope: &Scope,
        headers: &HeaderMap,
        sent_basic: bool,
    ) -> Result<HeaderValue, AuthError> {
        let challenge = match challenge_from(headers) {
            Some(Ok(c)) => c,
            Some(Err((header, reason))) => {
                return Err(AuthError::Challenge {
                    registry: self.registry.clone(),
                    header,
                    reason,
                })
            }
            // A 401 without a challenge: nothing to answer.
            None => return Err(self.failed()),
        };
        debug!(registry = %self.registry, ?challenge, "authentication challenge");
        self.state().challenge = Some(challenge.clone());
        match challenge {
            Challenge::Basic { .. } => match &self.credentials {
                Some(c) if !sent_basic => Ok(c.basic_header()),
                _ => Err(self.failed()),
            },
            Challenge::Bearer {
                realm,
                service,
                scope: asked,
            } => {
                let key = scope.as_token_scope().unwrap_or_default();
                // The registry's own scope wins: it says exactly what it needs.
                let want = asked.or_else(|| scope.as_token_scope());
                let token = self
                    .fetch_token(http, &realm, service.as_deref(), want)
                    .await?;
                self.state().tokens.insert(key, token.clone());
                Ok(bearer_header(&token))
            }
        }
    }

    /// The error for a request the registry keeps refusing: `Failed` when there are
    /// credentials (they are wrong, or lack the right), `Required` when there are none.
    pub fn failed(&self) -> AuthError {
        if self.credentials.is_some() {
            AuthError::Failed {
                registry: self.registry.clone(),
            }
        } else {
            AuthError::Required {
                registry: self.registry.clone(),
            }
        }
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: Option<String>,
    ) -> Result<String, AuthError> {
        let token_err = |detail: String| AuthError::Token {
            registry: self.registry.clone(),
            realm: realm.to_string(),
            detail,
        };
        let mut url = reqwest::Url::parse(realm).map_err(|e| token_err(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(token_err("realm is not an http(s) URL".into()));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if let Some(s) = &scope {
                q.append_pair("scope", s);
            }
        }
        // Credentials for an https registry never travel in clear to a plain-http realm the
        // registry names (L10); a registry used over plain http (--insecure) is in clear anyway.
        if self.credentials.is_some()
            && url.scheme() == "http"
            && !self.registry.starts_with("http://")
        {
            return Err(token_err(
                "the registry names a plain-http token realm: refusing to send the login's \
                 credentials in clear"
                    .into(),
            ));
        }
        let mut req = http.get(url);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| token_err(e.to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(self.failed());
        }
        if !status.is_success() {
            return Err(token_err(format!("http {}", status.as_u16())));
        }
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        // A token answer is small; a realm that streams without end is cut off.
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await.map_err(|e| token_err(e.to_string()))? {
            if body.len() + chunk.len() > MAX_TOKEN_ANSWER {
                return Err(token_err(format!(
                    "the answer is larger than {MAX_TOKEN_ANSWER} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|e| token_err(format!("bad json: {e}")))?;
        let token = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| token_err("no token or access_token in the answer".into()))?;
        debug!(registry = %self.registry, scope = ?scope, "got bearer token");
        Ok(token)
    }
}

fn bearer_header(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
    v.set_sensitive(true);
    v
}

/// The auth file: credentials per registry host (`host[:port]` exactly as references name
/// it), in the layout docker's `config.json` uses so that it reads familiar. Written with
/// mode 0600 (it holds passwords) through a temporary file renamed into place.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AuthFile {
    /// Entries by registry host, `host[:port]` as references name it.
    #[serde(default)]
    pub auths: BTreeMap<String, AuthEntry>,
}

/// One registry's entry in the [`AuthFile`].
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct AuthEntry {
    /// `base64(user:password)`.
    pub auth: String,
}

impl AuthFile {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<AuthFile, AuthError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AuthFile::default()),
            Err(e) => return Err(file_err(path, e.to_string())),
        };
        serde_json::from_str(&text).map_err(|e| {
            file_err(
                path,
                format!("line {} column {}: {e}", e.line(), e.column()),
            )
        })
    }

    /// Writes the file (mode 0600, directory created 0700 when missing).
    pub fn save(&self, path: &Path) -> Result<(), AuthError> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_err(dir, format!("create directory: {e}")))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".auth-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(|e| file_err(path, e.to_string()))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| file_err(path, e.to_string()))?;
        tmp.write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| file_err(path, e.to_string()))?;
        tmp.persist(path)
            .map_err(|e| file_err(path, e.error.to_string()))?;
        Ok(())
    }

    /// The credentials stored for `host`.
    pub fn get(&self, host: &str) -> Option<Credentials> {
        Credentials::decode(&self.auths.get(host)?.auth)
    }

    /// Stores `credentials` for `host`, replacing any.
    pub fn set(&mut self, host: &str, credentials: &Credentials) {
        self.auths.insert(
            host.to_string(),
            AuthEntry {
                auth: credentials.encode(),
            },
        );
    }

    /// Forgets `host`; whether there was anything to forget.
    pub fn remove(&mut self, host: &str) -> bool {
        self.auths.remove(host).is_some()
    }
}

fn file_err(path: &Path, detail: String) -> AuthError {
    AuthError::File {
        path: PathBuf::from(path).display().to_string(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn l10_credentials_never_go_to_a_plain_http_realm_of_an_https_registry() {
        let http = reqwest::Client::new();
        let auth = Authenticator::new(
            "https://registry.example:5000",
            Some(Credentials::new("u", "p")),
        );
        // Refused before anything is sent (nothing listens on port 9 here anyway).
        let err = auth
            .fetch_token(&http, "http://127.0.0.1:9/token", None, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("plain-http token realm"), "{err}");
        // An anonymous client has nothing to leak: it may ask (and fails to connect here).
        let anon = Authenticator::new("https://registry.example:5000", None);
        let err = anon
            .fetch_token(&http, "http://127.0.0.1:9/token", None, None)
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("plain-http"), "{err}");
    }

    #[test]
    fn parses_challenges() {
        let cases: &[(&str, Challenge)] = &[
            (
                r#"Basic realm="basic-realm""#,
                Challenge::Basic {
                    realm: Some("basic-realm".into()),
                },
            ),
            ("basic", Challenge::Basic { realm: None }),
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
                Challenge::Bearer {
                    realm: "https://auth.docker.io/token".into(),
                    service: Some("registry.docker.io".into()),
                    scope: Some("repository:samalba/my-app:pull,push".into()),
                },
            ),
            (
                // Unquoted values, spaces after commas, a mixed-case scheme and key, an
                // escaped quote.
                r#"BEARER Realm=http://127.0.0.1:1/t, service = "a \"b\"" ,error="insufficient_scope""#,
                Challenge::Bearer {
                    realm: "http://127.0.0.1:1/t".into(),
                    service: Some("a \"b\"".into()),
                    scope: None,
                },
            ),
        ];
        for (header, want) in cases {
            assert_eq!(&parse_challenge(header).unwrap(), want, "{header}");
        }
        for (bad, why) in [
            ("", "empty"),
            (r#"Digest realm="x""#, "unsupported scheme"),
            (r#"Bearer service="x""#, "without a realm"),
            (r#"Bearer realm="x"#, "unterminated"),
            ("Bearer realm", "without '='"),
        ] {
            let err = parse_challenge(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn prefers_bearer_among_several_challenges() {
        let mut h = HeaderMap::new();
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=x"));
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer realm="http://t/""#),
        );
        assert!(matches!(
            challenge_from(&h),
            Some(Ok(Challenge::Bearer { .. }))
        ));
        assert!(challenge_from(&HeaderMap::new()).is_none());
    }

    #[test]
    fn credentials_round_trip_and_stay_secret() {
        let c = Credentials::new("user", "pa:ss");
        assert_eq!(c.encode(), "dXNlcjpwYTpzcw==");
        assert_eq!(Credentials::decode(&c.encode()).unwrap(), c);
        assert!(Credentials::decode("!!").is_none());
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert_eq!(
            Scope::Push("team/app".into()).as_token_scope().unwrap(),
            "repository:team/app:pull,push"
        );
    }

    #[test]
    fn auth_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("auth.json");
        let mut f = AuthFile::load(&path).unwrap();
        assert!(f.auths.is_empty());
        f.set("127.0.0.1:5001", &Credentials::new("u", "p"));
        f.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut back = AuthFile::load(&path).unwrap();
        assert_eq!(
            back.get("127.0.0.1:5001").unwrap(),
            Credentials::new("u", "p")
        );
        assert!(back.get("other:5000").is_none());
        assert!(back.remove("127.0.0.1:5001"));
        assert!(!back.remove("127.0.0.1:5001"));

        std::fs::write(&path, "{\n  \"auths\": [").unwrap();
        let err = AuthFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("auth.json") && err.contains("line 2"), "{err}");
    }
}
