//! Who may use the dashboard, without I/O: login tokens, session cookies, CSRF tokens and the
//! decision for one request.
//!
//! - A **login token** (`rdt1.…`, from `rctl dashboard token`) names the admin who asked for it
//!   (`sub`, the CN of their certificate), a role (`admin`), an expiry and a random nonce. It is
//!   an HMAC-SHA256 over those claims with a key derived from the cluster CA key
//!   ([`Signer::from_ca_key`]): every controller of the cluster can check it, nothing about
//!   it is written to raft, and rotating the CA invalidates every token.
//! - A **session** (`rds1.…`, the `rudder_dashboard` cookie) is the same kind of signed claims
//!   with its own prefix and MAC domain, so a token is never a session nor the other way
//!   round. A login exchanges a token for a session that ends when the token would have, and
//!   at most [`SESSION_MAX`] after login.
//! - A **CSRF token** is an HMAC of the principal (session nonce or certificate CN); every
//!   request that changes something must carry it in [`CSRF_HEADER`].
//!
//! Invariants: MACs are compared in constant time (`ring::hmac::verify`); an input longer than
//! [`MAX_TOKEN_LEN`] is refused before any work; the role must be `admin`; expiry is checked
//! against the `now` the caller passes (no clock here); a certificate of another role is
//! refused even with a valid cookie (identity comes from the certificate first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ring::hmac;
use rudder_pki::ca::{PeerIdentity, Role};
use serde::{Deserialize, Serialize};

/// The cookie that holds a session.
pub const COOKIE: &str = "rudder_dashboard";
/// The header that carries the CSRF token on every POST.
pub const CSRF_HEADER: &str = "x-rudder-csrf";
/// The longest token or cookie value looked at.
pub const MAX_TOKEN_LEN: usize = 1024;
/// A token's lifetime when the request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest lifetime a token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// A session never outlives this, whatever its token's expiry.
pub const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// Used login tokens remembered (by nonce, until they expire) so that each logs in once.
pub const MAX_USED: usize = 10_000;

const TOKEN_PREFIX: &str = "rdt1";
const SESSION_PREFIX: &str = "rds1";

/// Why a token, session or request was refused. Messages go to the browser as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No cookie and no admin certificate.
    #[error(
        "dashboard: not logged in: get a token with `rctl dashboard token` and log in at /login"
    )]
    NotLoggedIn,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("dashboard: the token is too long (at most {MAX_TOKEN_LEN} bytes)")]
    TooLong,
    /// Not `PREFIX.HEX.HEX` with claims inside.
    #[error("dashboard: the {0} is malformed")]
    Malformed(&'static str),
    /// The MAC does not match (forged, altered, or signed by another cluster's CA).
    #[error("dashboard: the {0} signature is invalid (another cluster, or altered)")]
    BadSignature(&'static str),
    /// Past its expiry.
    #[error("dashboard: the {0} expired; get a new token with `rctl dashboard token`")]
    Expired(&'static str),
    /// A role other than admin.
    #[error("dashboard: role {0:?} may not use the dashboard (admin only)")]
    Role(String),
    /// A login token presented a second time.
    #[error("dashboard: this token was already used to log in; get a new one")]
    AlreadyUsed,
    /// Too many unexpired used tokens to remember another.
    #[error("dashboard: too many logins in progress; try again later")]
    Busy,
    /// The certificate's holder was removed from the cluster.
    #[error(
        "dashboard: {0} was removed from the cluster: its certificates and tokens are revoked"
    )]
    Revoked(String),
    /// A certificate of a role that may not use the dashboard.
    #[error(
        "dashboard: a {0} certificate may not use the dashboard; use an admin certificate or a \
         token from `rctl dashboard token`"
    )]
    CertificateRole(Role),
    /// A POST without the right CSRF header.
    #[error("dashboard: missing or wrong {CSRF_HEADER} header (reload the page)")]
    Csrf,
}

impl AuthError {
    /// Whether the answer is 401 (log in again) rather than 403 (you may not).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::NotLoggedIn
                | AuthError::TooLong
                | AuthError::Malformed(_)
                | AuthError::BadSignature(_)
                | AuthError::Expired(_)
                | AuthError::AlreadyUsed
        )
    }
}

/// What a token or session says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The CN of the admin certificate that asked for the token.
    pub sub: String,
    /// `admin`.
    pub role: String,
    /// Expiry, ms since the epoch.
    pub exp_ms: u64,
    /// Random, hex: tells tokens apart (single use) and names a session.
    pub nonce: String,
}

/// Token or session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A login token from `rctl dashboard token`.
    Token,
    /// A session cookie.
    Session,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Token => TOKEN_PREFIX,
            Kind::Session => SESSION_PREFIX,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Token => "token",
            Kind::Session => "session",
        }
    }
}

/// Signs and checks tokens, sessions and CSRF tokens with one key.
pub struct Signer {
    key: hmac::Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// The key every controller derives from the cluster CA key (PEM): HMAC-SHA256 keyed with
    /// the CA key over a fixed label, so the key itself is never stored anywhere.
    pub fn from_ca_key(ca_key_pem: &str) -> Signer {
        let root = hmac::Key::new(hmac::HMAC_SHA256, ca_key_pem.as_bytes());
        let derived = hmac::sign(&root, b"rudder dashboard signing key v1");
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    fn mac_input(kind: Kind, payload_hex: &str) -> Vec<u8> {
        format!("{}.{payload_hex}", kind.prefix()).into_bytes()
    }

    /// `PREFIX.HEX(claims JSON).HEX(mac)`.
    pub fn sign(&self, kind: Kind, claims: &Claims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let payload = hex::encode(serde_json::to_vec(claims).unwrap_or_default());
        let tag = hmac::sign(&self.key, &Self::mac_input(kind, &payload));
        format!("{}.{payload}.{}", kind.prefix(), hex::encode(tag.as_ref()))
    }

    /// The claims of `text` if it is a `kind` this key signed, unexpired at `now_ms`, for an
    /// admin.
    pub fn verify(&self, kind: Kind, text: &str, now_ms: u64) -> Result<Claims, AuthError> {
        let noun = kind.noun();
        if text.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLong);
        }
        let mut parts = text.trim().split('.');
        let (Some(prefix), Some(payload), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed(noun));
        };
        if prefix != kind.prefix() {
            return Err(AuthError::Malformed(noun));
        }
        let tag = hex::decode(tag).map_err(|_| AuthError::Malformed(noun))?;
        hmac::verify(&self.key, &Self::mac_input(kind, payload), &tag)
            .map_err(|_| AuthError::BadSignature(noun))?;
        let raw = hex::decode(payload).map_err(|_| AuthError::Malformed(noun))?;
        let claims: Claims =
            serde_json::from_slice(&raw).map_err(|_| AuthError::Malformed(noun))?;
        if claims.exp_ms <= now_ms {
            return Err(AuthError::Expired(noun));
        }
        if claims.role != Role::Admin.as_str() {
            return Err(AuthError::Role(claims.role));
        }
        Ok(claims)
    }

    /// The CSRF token of `principal` (see [`Principal::id`]).
    pub fn csrf(&self, principal: &str) -> String {
        hex::encode(hmac::sign(&self.key, format!("csrf.{principal}").as_bytes()).as_ref())
    }

    /// Whether `given` is `principal`'s CSRF token (constant time).
    pub fn check_csrf(&self, principal: &str, given: &str) -> bool {
        if given.len() > MAX_TOKEN_LEN {
            return false;
        }
        let Ok(tag) = hex::decode(given) else {
            return false;
        };
        hmac::verify(&self.key, format!("csrf.{principal}").as_bytes(), &tag).is_ok()
    }
}

/// A new login token for admin `sub`, valid `ttl` from `now_ms`.
pub fn issue(
    signer: &Signer,
    sub: &str,
    ttl: Duration,
    now_ms: u64,
    nonce: [u8; 16],
) -> (String, Claims) {
    let claims = Claims {
        sub: sub.to_string(),
        role: Role::Admin.as_str().to_string(),
        exp_ms: now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        nonce: hex::encode(nonce),
    };
    (signer.sign(Kind::Token, &claims), claims)
}

/// The lifetime a token request asks for: 0 is [`DEFAULT_TTL`]; more than [`MAX_TTL`] is
/// refused with the reason.
pub fn token_ttl(ttl_seconds: u64) -> Result<Duration, String> {
    match ttl_seconds {
        0 => Ok(DEFAULT_TTL),
        s if Duration::from_secs(s) > MAX_TTL => Err(format!(
            "dashboard: a token lives at most {}h; ask for less (--ttl)",
            MAX_TTL.as_secs() / 3600
        )),
        s => Ok(Duration::from_secs(s)),
    }
}

/// The session a login with `token` (already verified) opens at `now_ms`: same admin, a new
/// nonce, ending with the token and at most [`SESSION_MAX`] from now.
pub fn session_for(token: &Claims, now_ms: u64, nonce: [u8; 16]) -> Claims {
    let max = now_ms.saturating_add(SESSION_MAX.as_millis() as u64);
    Claims {
        sub: token.sub.clone(),
        role: token.role.clone(),
        exp_ms: token.exp_ms.min(max),
        nonce: hex::encode(nonce),
    }
}

/// Login tokens already exchanged for a session, by nonce, until they expire: a token logs in
/// once per controller (what a URL that leaked through history or logs can still do).
#[derive(Debug, Default)]
pub struct UsedTokens(Mutex<HashMap<String, u64>>);

impl UsedTokens {
    /// Records `claims` as used at `now_ms`; refuses one already used.
    pub fn claim(&self, claims: &Claims, now_ms: u64) -> Result<(), AuthError> {
        let mut used = self.0.lock().unwrap_or_else(|p| p.into_inner());
        used.retain(|_, exp| *exp > now_ms);
        if used.contains_key(&claims.nonce) {
            return Err(AuthError::AlreadyUsed);
        }
        if used.len() >= MAX_USED {
            return Err(AuthError::Busy);
        }
        used.insert(claims.nonce.clone(), claims.exp_ms);
        Ok(())
    }
}

/// Who a request is from, once [`authenticate`] accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An admin certificate on the TLS connection.
    Certificate {
        /// Its CN.
        node: String,
    },
    /// A session cookie.
    Session(Claims),
}

impl Principal {
    /// The admin's name (certificate CN, or the CN the token was issued to).
    pub fn who(&self) -> &str {
        match self {
            Principal::Certificate { node } => node,
            Principal::Session(c) => &c.sub,
        }
    }

    /// What the CSRF token is bound to.
    pub fn id(&self) -> String {
        match self {
            Principal::Certificate { node } => format!("cert:{node}"),
            Principal::Session(c) => format!("session:{}", c.nonce),
        }
    }

    /// When access ends (ms), if it does.
    pub fn expires_ms(&self) -> Option<u64> {
        match self {
            Principal::Certificate { .. } => None,
            Principal::Session(c) => Some(c.exp_ms),
        }
    }
}

/// Decides who a request is from: the TLS client certificate first (an admin's is enough,
/// another role's is refused), else the session `cookie`. `revoked(role, cn)` asks the store.
pub fn authenticate(
    cert: Option<&PeerIdentity>,
    cookie: Option<&str>,
    signer: &Signer,
    revoked: impl Fn(&str, &str) -> bool,
    now_ms: u64,
) -> Result<Principal, AuthError> {
    if let Some(id) = cert {
        if id.role != Role::Admin {
            return Err(AuthError::CertificateRole(id.role));
        }
        if revoked(id.role.as_str(), &id.node) {
            return Err(AuthError::Revoked(id.node.clone()));
        }
        return Ok(Principal::Certificate {
            node: id.node.clone(),
        });
    }
    let cookie = cookie.ok_or(AuthError::NotLoggedIn)?;
    let claims = signer.verify(Kind::Session, cookie, now_ms)?;
    if revoked(Role::Admin.as_str(), &claims.sub) {
        return Err(AuthError::Revoked(claims.sub));
    }
    Ok(Principal::Session(claims))
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`).
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

/// The `Set-Cookie` value that stores `session` until `max_age`: only over HTTPS, never to
/// scripts, never on cross-site requests.
pub fn set_cookie(session: &str, max_age: Duration) -> String {
    format!(
        "{COOKIE}={session}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
        max_age.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    const NOW: u64 = 1_000_000;

    fn signer() -> Signer {
        Signer::from_ca_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    }

    fn token(ttl: u64) -> (String, Claims) {
        issue(&signer(), "admin-1", Duration::from_secs(ttl), NOW, [7; 16])
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let (t, c) = token(60);
        assert!(t.starts_with("rdt1."), "{t}");
        assert_eq!(signer().verify(Kind::Token, &t, NOW), Ok(c.clone()));
        assert_eq!(c.exp_ms, NOW + 60_000);
        assert_eq!(
            signer().verify(Kind::Token, &t, NOW + 60_000),
            Err(AuthError::Expired("token"))
        );
    }

    #[test]
    fn forged_altered_and_foreign_tokens_are_refused() {
        let (t, _) = token(60);
        let other = Signer::from_ca_key("another cluster's key");
        assert_eq!(
            other.verify(Kind::Token, &t, NOW),
            Err(AuthError::BadSignature("token"))
        );
        // A longer expiry written into the payload breaks the MAC.
        let parts: Vec<&str> = t.split('.').collect();
        let mut claims: Claims = serde_json::from_slice(&hex::decode(parts[1]).unwrap()).unwrap();
        claims.exp_ms += 1_000_000;
        let forged = format!(
            "rdt1.{}.{}",
            hex::encode(serde_json::to_vec(&claims).unwrap()),
            parts[2]
        );
        assert_eq!(
            signer().verify(Kind::Token, &forged, NOW),
            Err(AuthError::BadSignature("token"))
        );
        for bad in ["", "rdt1", "rdt1.zz.zz", "rdt1.00.00.00", "xyz.00.00"] {
            assert_eq!(
                signer().verify(Kind::Token, bad, NOW),
                Err(AuthError::Malformed("token")),
                "{bad:?}"
            );
        }
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            signer().verify(Kind::Token, &long, NOW),
            Err(AuthError::TooLong)
        );
    }

    #[test]
    fn a_token_is_not_a_session_nor_the_reverse() {
        let (t, c) = token(60);
        assert_eq!(
            signer().verify(Kind::Session, &t, NOW),
            Err(AuthError::Malformed("session"))
        );
        // Same claims, the other prefix: the MAC domain differs.
        let relabelled = t.replacen("rdt1.", "rds1.", 1);
        assert_eq!(
            signer().verify(Kind::Session, &relabelled, NOW),
            Err(AuthError::BadSignature("session"))
        );
        let s = signer().sign(Kind::Session, &c);
        assert_eq!(signer().verify(Kind::Session, &s, NOW), Ok(c));
    }

    #[test]
    fn only_the_admin_role_is_accepted() {
        let c = Claims {
            sub: "node-1".into(),
            role: "worker".into(),
            exp_ms: NOW + 1,
            nonce: "00".into(),
        };
        let t = signer().sign(Kind::Token, &c);
        assert_eq!(
            signer().verify(Kind::Token, &t, NOW),
            Err(AuthError::Role("worker".into()))
        );
    }

    #[test]
    fn ttl_defaults_and_is_bounded() {
        assert_eq!(token_ttl(0), Ok(DEFAULT_TTL));
        assert_eq!(token_ttl(5), Ok(Duration::from_secs(5)));
        assert!(token_ttl(MAX_TTL.as_secs()).is_ok());
        let e = token_ttl(MAX_TTL.as_secs() + 1).unwrap_err();
        assert!(e.contains("at most 24h"), "{e}");
    }

    #[test]
    fn a_session_ends_with_its_token_and_within_the_cap() {
        let (_, c) = token(60);
        let s = session_for(&c, NOW, [1; 16]);
        assert_eq!((s.exp_ms, s.sub.as_str()), (c.exp_ms, "admin-1"));
        assert_ne!(s.nonce, c.nonce);
        let (_, long) = token(MAX_TTL.as_secs());
        let s = session_for(&long, NOW, [1; 16]);
        assert_eq!(s.exp_ms, NOW + SESSION_MAX.as_millis() as u64);
    }

    #[test]
    fn a_token_logs_in_once() {
        let used = UsedTokens::default();
        let (_, c) = token(60);
        assert_eq!(used.claim(&c, NOW), Ok(()));
        assert_eq!(used.claim(&c, NOW + 1), Err(AuthError::AlreadyUsed));
        // Forgotten once expired (it no longer verifies anyway).
        assert_eq!(used.claim(&c, c.exp_ms), Ok(()));
    }

    fn identity(role: Role, node: &str) -> PeerIdentity {
        PeerIdentity {
            role,
            node: node.into(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::now() + Duration::from_secs(60),
        }
    }

    #[test]
    fn requests_are_decided_by_certificate_then_cookie() {
        let s = signer();
        let never = |_: &str, _: &str| false;
        let (_, c) = token(60);
        let cookie = s.sign(Kind::Session, &session_for(&c, NOW, [2; 16]));

        let admin = identity(Role::Admin, "admin-1");
        assert_eq!(
            authenticate(Some(&admin), None, &s, never, NOW),
            Ok(Principal::Certificate {
                node: "admin-1".into()
            })
        );
        // A worker certificate is refused, even with a valid cookie.
        let worker = identity(Role::Worker, "node-1");
        let e = authenticate(Some(&worker), Some(&cookie), &s, never, NOW).unwrap_err();
        assert_eq!(e, AuthError::CertificateRole(Role::Worker));
        assert!(!e.is_unauthenticated());
        assert!(e.to_string().contains("worker certificate"), "{e}");

        let p = authenticate(None, Some(&cookie), &s, never, NOW).unwrap();
        assert_eq!(p.who(), "admin-1");
        let e = authenticate(None, None, &s, never, NOW).unwrap_err();
        assert!(e.is_unauthenticated() && e.to_string().contains("rctl dashboard token"));
        // A login token is not a cookie.
        let (t, _) = token(60);
        assert!(authenticate(None, Some(&t), &s, never, NOW).is_err());
        // Expired session.
        assert_eq!(
            authenticate(None, Some(&cookie), &s, never, c.exp_ms),
            Err(AuthError::Expired("session"))
        );
        // Revoked admin: its certificate and its sessions.
        let revoked = |role: &str, cn: &str| role == "admin" && cn == "admin-1";
        assert_eq!(
            authenticate(None, Some(&cookie), &s, revoked, NOW),
            Err(AuthError::Revoked("admin-1".into()))
        );
        assert!(authenticate(Some(&admin), None, &s, revoked, NOW).is_err());
    }

    #[test]
    fn csrf_tokens_are_bound_to_the_principal() {
        let s = signer();
        let a = s.csrf("session:aa");
        assert!(s.check_csrf("session:aa", &a));
        assert!(!s.check_csrf("session:bb", &a));
        assert!(!s.check_csrf("session:aa", ""));
        assert!(!s.check_csrf("session:aa", "not hex"));
        assert!(!Signer::from_ca_key("other").check_csrf("session:aa", &a));
    }

    #[test]
    fn cookies_parse_and_are_locked_down() {
        let h = "theme=dark; rudder_dashboard=rds1.ab.cd;other=\"x\"";
        assert_eq!(cookie_value(h, COOKIE), Some("rds1.ab.cd"));
        assert_eq!(cookie_value(h, "other"), Some("x"));
        assert_eq!(cookie_value(h, "missing"), None);
        assert_eq!(cookie_value("rudder_dashboardx=1", COOKIE), None);
        let c = set_cookie("v", Duration::from_secs(60));
        for attr in [
            "HttpOnly",
            "Secure",
            "SameSite=Strict",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(c.contains(attr), "{c}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
