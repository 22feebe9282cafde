//! The dashboard's HTTP routes (axum): the embedded page and its assets, login and logout, the
//! JSON API the page reads, the server-sent event streams (cluster events, logs) and the three
//! actions (scale, roll back, set a node's availability).
//!
//! Invariants:
//! - every `/api/*` request and the page itself pass [`auth::authenticate`] (an admin
//!   certificate on the connection, or a valid session cookie); 401 when not logged in or the
//!   session is bad, 403 when the certificate's role may not, or its holder was revoked;
//! - every POST that changes something also carries the principal's CSRF token in
//!   [`auth::CSRF_HEADER`] (the cookie is `SameSite=Strict` as well);
//! - actions call the same `Control` handlers `rctl` reaches, after the same check the gRPC
//!   guard makes (an admin, not revoked), so they refuse what `rctl` would refuse;
//! - request bodies are at most [`MAX_BODY`] bytes, names at most [`MAX_NAME`];
//! - every answer carries a CSP of `default-src 'self'` with `frame-ancestors 'none'`,
//!   `nosniff`, `no-referrer` and `no-store`; the page sets every string as text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures::{Stream, StreamExt};
use rudder_pki::ca::{PeerIdentity, Role};
use rudder_proto::v1::control_server::Control;
use rudder_proto::v1::{
    Availability, EventsRequest, LogsRequest, RollbackRequest, ScaleRequest, UpdateNodeRequest,
};
use serde::Deserialize;
use tracing::info;

use super::auth::{self, AuthError, Kind, Principal, Signer, UsedTokens};
use super::listen::Client;
use super::view;
use crate::api::ControlApi;
use crate::raft_node::RaftHandle;

/// The largest request body read (login form, action bodies).
pub const MAX_BODY: usize = 4 * 1024;
/// The longest service, task or node name accepted.
pub const MAX_NAME: usize = 256;
/// The most log lines asked for at once.
pub const MAX_TAIL: u32 = 10_000;

const INDEX_HTML: &str = include_str!("assets/index.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The Content-Security-Policy of every answer: nothing but this origin, no inline script or
/// style, never framed.
pub const CSP: &str = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                       form-action 'self'; object-src 'none'";

/// What the routes share.
pub struct Dash {
    /// The committed store (reads) and membership.
    pub raft: RaftHandle,
    /// The Control handlers the actions and streams go through.
    pub control: Arc<ControlApi>,
    /// Login tokens already exchanged here.
    pub used: UsedTokens,
}

/// A refusal or failure, as the browser gets it: a status and a sentence.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let code = if e.is_unauthenticated() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::FORBIDDEN
        };
        Refusal(code, e.to_string())
    }
}

/// The HTTP status for a Control handler's refusal.
pub fn status_code(s: &tonic::Status) -> StatusCode {
    use tonic::Code;
    match s.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn status_refusal(s: tonic::Status) -> Refusal {
    Refusal(status_code(&s), s.message().to_string())
}

fn now_ms() -> u64 {
    crate::now_ms()
}

impl Dash {
    /// The signer of this cluster (from the CA key in the store).
    fn signer(&self) -> Result<Signer, Refusal> {
        super::signer(&self.raft.store()).ok_or_else(|| {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "dashboard: the cluster ca is not initialised yet; try again".into(),
            )
        })
    }

    /// Who the request is from, with the signer for its CSRF token.
    fn principal(
        &self,
        client: &Client,
        headers: &HeaderMap,
    ) -> Result<(Principal, Signer), Refusal> {
        let signer = self.signer()?;
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| auth::cookie_value(h, auth::COOKIE));
        let store = self.raft.store();
        let p = auth::authenticate(
            client.cert.as_ref(),
            cookie,
            &signer,
            |role, cn| store.is_revoked(role, cn),
            now_ms(),
        )?;
        Ok((p, signer))
    }

    /// [`Dash::principal`], and for a change the CSRF header.
    fn actor(&self, client: &Client, headers: &HeaderMap) -> Result<Principal, Refusal> {
        let (p, signer) = self.principal(client, headers)?;
        let given = headers
            .get(auth::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !signer.check_csrf(&p.id(), given) {
            return Err(AuthError::Csrf.into());
        }
        Ok(p)
    }
}

/// A Control request as the gRPC guard would hand it on: with the caller's identity.
fn as_admin<T>(p: &Principal, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(PeerIdentity {
        role: Role::Admin,
        node: p.who().to_string(),
        not_before: SystemTime::UNIX_EPOCH,
        not_after: p
            .expires_ms()
            .map_or(SystemTime::now() + Duration::from_secs(60), |ms| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
            }),
    });
    r
}

fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("dashboard: a {what} name has 1 to {MAX_NAME} bytes"),
        ));
    }
    Ok(())
}

/// The routes, over `dash`.
pub fn router(dash: Arc<Dash>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/login", get(login_page).post(login_form))
        .route("/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/logs", get(logs))
        .route("/api/services/{name}/scale", post(scale))
        .route("/api/services/{name}/rollback", post(rollback))
        .route("/api/nodes/{node}/availability", post(availability))
        .fallback(|| async { Refusal(StatusCode::NOT_FOUND, "dashboard: no such page".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(dash)
}

/// The headers every answer carries.
pub async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    resp
}

fn html(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

async fn index(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Response {
    match dash.principal(&client, &headers) {
        Ok(_) => html(INDEX_HTML),
        // Not logged in (or the session ended): the login page.
        Err(Refusal(code, _)) if code == StatusCode::UNAUTHORIZED => {
            Redirect::to("/login").into_response()
        }
        Err(r) => r.into_response(),
    }
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// `GET /login`: the form; `GET /login?token=T`: logs in with T (for scripts and a URL
/// `rctl dashboard open` prints). The token logs in once, and `no-referrer` keeps it out of
/// other sites' logs.
async fn login_page(State(dash): State<Arc<Dash>>, Query(q): Query<LoginQuery>) -> Response {
    match q.token {
        Some(t) => exchange(&dash, &t),
        None => html(LOGIN_HTML),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login` from the form.
async fn login_form(State(dash): State<Arc<Dash>>, Form(f): Form<LoginForm>) -> Response {
    exchange(&dash, &f.token)
}

/// Exchanges a login token for a session cookie, and sends the browser to the page.
fn exchange(dash: &Dash, token: &str) -> Response {
    let signer = match dash.signer() {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let now = now_ms();
    let result = signer.verify(Kind::Token, token, now).and_then(|claims| {
        if dash
            .raft
            .store()
            .is_revoked(Role::Admin.as_str(), &claims.sub)
        {
            return Err(AuthError::Revoked(claims.sub));
        }
        dash.used.claim(&claims, now)?;
        Ok(claims)
    });
    match result {
        Ok(claims) => {
            let session = auth::session_for(&claims, now, rand::random());
            let max_age = Duration::from_millis(session.exp_ms.saturating_sub(now));
            let cookie = auth::set_cookie(&signer.sign(Kind::Session, &session), max_age);
            info!(who = %claims.sub, "dashboard: logged in with a token");
            let mut resp = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => {
            info!(%e, "dashboard: login refused");
            let r: Refusal = e.into();
            (
                r.0,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("{}\n", r.1),
            )
                .into_response()
        }
    }
}

async fn logout(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    dash.actor(&client, &headers)?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `GET /api/session`: who is logged in, until when, and the CSRF token for actions.
async fn session(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (p, signer) = dash.principal(&client, &headers)?;
    Ok(Json(serde_json::json!({
        "who": p.who(),
        "by": match p { Principal::Certificate { .. } => "certificate", _ => "token" },
        "expires_ms": p.expires_ms(),
        "csrf": signer.csrf(&p.id()),
    }))
    .into_response())
}

/// `GET /api/state`: the page's data.
async fn state(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    dash.principal(&client, &headers)?;
    Ok(Json(view::overview(&dash.raft.store())).into_response())
}

/// An SSE stream that ends when `p`'s session does.
fn until_expiry<S>(p: &Principal, s: S) -> impl Stream<Item = Result<Event, Infallible>>
where
    S: Stream<Item = Result<Event, Infallible>>,
{
    let left = p.expires_ms().map_or(Duration::MAX, |e| {
        Duration::from_millis(e.saturating_sub(now_ms()))
    });
    // A far-off instant rather than an overflow for certificate logins.
    let left = left.min(Duration::from_secs(365 * 24 * 3600));
    s.take_until(tokio::time::sleep(left))
}

/// `GET /api/events`: cluster events as they commit (the `Events` stream `rctl events` reads).
async fn events(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (p, _) = dash.principal(&client, &headers)?;
    let stream = dash
        .control
        .events(as_admin(&p, EventsRequest::default()))
        .await
        .map_err(status_refusal)?
        .into_inner();
    Ok(sse(&p, stream, "cluster", |e| {
        serde_json::json!({
            "index": e.index, "at_ms": e.at_ms, "type": e.r#type, "action": e.action,
            "name": e.name, "service": e.service, "node": e.node, "message": e.message,
        })
    }))
}

/// A gRPC stream as server-sent events: each item as JSON in an `event`-named event, an error
/// as a `failure` event; the stream ends when the session expires.
fn sse<T, S>(
    p: &Principal,
    stream: S,
    event: &'static str,
    json: fn(T) -> serde_json::Value,
) -> Response
where
    S: Stream<Item = Result<T, tonic::Status>> + Send + 'static,
    T: 'static,
{
    let events = stream.map(move |r| {
        Ok(match r {
            Ok(item) => Event::default().event(event).data(json(item).to_string()),
            Err(s) => Event::default().event("failure").data(s.message()),
        })
    });
    Sse::new(until_expiry(p, events))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct LogsQuery {
    target: String,
    #[serde(default)]
    tail: Option<u32>,
    #[serde(default)]
    follow: Option<bool>,
}

/// `GET /api/logs?target=SERVICE|TASK[&tail=N][&follow=true]`: the logs `rctl logs` reads.
async fn logs(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Refusal> {
    let (p, _) = dash.principal(&client, &headers)?;
    check_name("service or task", &q.target)?;
    let req = LogsRequest {
        target: q.target,
        tail: q.tail.unwrap_or(200).min(MAX_TAIL),
        follow: q.follow.unwrap_or(true),
        timestamps: false,
    };
    let stream = dash
        .control
        .logs(as_admin(&p, req))
        .await
        .map_err(status_refusal)?
        .into_inner();
    Ok(sse(&p, stream, "log", |c| {
        serde_json::json!({
            "task": c.task, "text": String::from_utf8_lossy(&c.data), "warning": c.warning,
        })
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleBody {
    replicas: u64,
}

async fn scale(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Json(body): Json<ScaleBody>,
) -> Result<Response, Refusal> {
    let p = dash.actor(&client, &headers)?;
    check_name("service", &name)?;
    info!(who = p.who(), service = %name, replicas = body.replicas, "dashboard: scale");
    let req = ScaleRequest {
        service: name,
        replicas: body.replicas,
    };
    dash.control
        .scale(as_admin(&p, req))
        .await
        .map_err(status_refusal)?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

async fn rollback(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Refusal> {
    let p = dash.actor(&client, &headers)?;
    check_name("service", &name)?;
    info!(who = p.who(), service = %name, "dashboard: rollback");
    dash.control
        .rollback(as_admin(&p, RollbackRequest { service: name }))
        .await
        .map_err(status_refusal)?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AvailabilityBody {
    availability: String,
}

/// The wire availability for `active`, `pause` or `drain`.
pub fn parse_availability(s: &str) -> Option<Availability> {
    match s {
        "active" => Some(Availability::Active),
        "pause" => Some(Availability::Pause),
        "drain" => Some(Availability::Drain),
        _ => None,
    }
}

async fn availability(
    State(dash): State<Arc<Dash>>,
    ConnectInfo(client): ConnectInfo<Client>,
    headers: HeaderMap,
    Path(node): Path<String>,
    Json(body): Json<AvailabilityBody>,
) -> Result<Response, Refusal> {
    let p = dash.actor(&client, &headers)?;
    check_name("node", &node)?;
    let Some(av) = parse_availability(&body.availability) else {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "dashboard: availability {:?}: one of active, pause, drain",
                body.availability
            ),
        ));
    };
    info!(who = p.who(), %node, availability = body.availability, "dashboard: node availability");
    let req = UpdateNodeRequest {
        node,
        availability: av as i32,
        ..Default::default()
    };
    dash.control
        .update_node(as_admin(&p, req))
        .await
        .map_err(status_refusal)?;
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_refusals_map_to_http() {
        let cases = [
            (tonic::Status::not_found("x"), StatusCode::NOT_FOUND),
            (
                tonic::Status::invalid_argument("x"),
                StatusCode::BAD_REQUEST,
            ),
            (
                tonic::Status::failed_precondition("x"),
                StatusCode::CONFLICT,
            ),
            (
                tonic::Status::unavailable("x"),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                tonic::Status::internal("x"),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(status_code(&s), want, "{s:?}");
        }
    }

    #[test]
    fn auth_refusals_are_401_or_403() {
        let r: Refusal = AuthError::NotLoggedIn.into();
        assert_eq!(r.0, StatusCode::UNAUTHORIZED);
        let r: Refusal = AuthError::Expired("session").into();
        assert_eq!(r.0, StatusCode::UNAUTHORIZED);
        let r: Refusal = AuthError::CertificateRole(Role::Worker).into();
        assert_eq!(r.0, StatusCode::FORBIDDEN);
        let r: Refusal = AuthError::Csrf.into();
        assert_eq!(r.0, StatusCode::FORBIDDEN);
    }

    #[test]
    fn availabilities_parse() {
        assert_eq!(parse_availability("drain"), Some(Availability::Drain));
        assert_eq!(parse_availability("active"), Some(Availability::Active));
        assert_eq!(parse_availability("Drain"), None);
    }

    #[tokio::test]
    async fn every_answer_is_locked_down() {
        let r = security_headers(StatusCode::OK.into_response()).await;
        let h = r.headers();
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert!(CSP.contains("default-src 'self'") && CSP.contains("frame-ancestors 'none'"));
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
    }

    #[test]
    fn the_page_has_no_inline_script_or_markup_sinks() {
        // CSP forbids inline script and style; the page's code sets strings as text only.
        for page in [INDEX_HTML, LOGIN_HTML] {
            assert!(!page.contains("<script>"), "inline script");
            assert!(!page.contains("style="), "inline style");
        }
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(sink), "app.js uses {sink}");
        }
    }
}
