//! The distribution-spec HTTP API: path parsing, then one handler per endpoint.
//!
//! Repository names contain slashes, so everything under `/v2/` arrives at one catch-all route
//! and [`parse_route`] splits it from the end (the last one or two segments say which endpoint
//! it is; everything before is the name). Handlers hold no state of their own: blobs go to the
//! [`BlobStore`], references to the [`TagStore`](super::TagStore).
//!
//! Invariants: every response carries `Docker-Distribution-API-Version: registry/2.0`; a
//! repository name is validated before any storage is touched; blob bodies are streamed in
//! both directions, never buffered whole; a manifest is accepted only once all the blobs it
//! references are present, and its bytes are stored before its tag is published; a blob or
//! manifest missing on disk is read through from the peers unless the request itself comes
//! from a peer (see `peers`); a blob upload is acknowledged (201) only once a majority of the
//! managers hold the blob, unless it is itself a peer's push; a closing PUT refused with a 4xx
//! other than 416 ends its upload, so a refused blob leaves no bytes behind.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use tracing::Instrument;

use super::manifest::{self, MAX_MANIFEST_BYTES};
use super::names::{is_digest_reference, validate_name, validate_tag, Digest};
use super::peers::{ensure_local, replicate_to_majority, LOCAL_ONLY};
use super::tags::paginate;
use super::{RegistryError, RegistryState};

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
/// Read size when streaming a blob out.
const READ_CHUNK: usize = 256 << 10;

/// Which endpoint a `/v2/...` path addresses (public for the fuzz target `fuzz/registry`).
#[derive(Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Route {
    Base,
    Catalog,
    Tags { name: String },
    Manifest { name: String, reference: String },
    Blob { name: String, digest: String },
    UploadStart { name: String },
    Upload { name: String, id: String },
}

/// Splits a request path into a [`Route`]; `None` if it is not a registry path.
pub fn parse_route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name = |upto: usize| segs[..upto].join("/");
    let tail = |k: usize| if n > k { Some(&segs[n - k..]) } else { None };
    if let Some(["tags", "list"]) = tail(2) {
        return Some(Route::Tags { name: name(n - 2) });
    }
    if let Some(["manifests", reference]) = tail(2) {
        return Some(Route::Manifest {
            name: name(n - 2),
            reference: percent_decode(reference),
        });
    }
    if let Some(["blobs", "uploads", ""]) = tail(3) {
        return Some(Route::UploadStart { name: name(n - 3) });
    }
    if let Some(["blobs", "uploads"]) = tail(2) {
        return Some(Route::UploadStart { name: name(n - 2) });
    }
    if let Some(["blobs", digest]) = tail(2) {
        return Some(Route::Blob {
            name: name(n - 2),
            digest: percent_decode(digest),
        });
    }
    if let Some(["blobs", "uploads", id]) = tail(3) {
        return Some(Route::Upload {
            name: name(n - 3),
            id: (*id).to_owned(),
        });
    }
    None
}

/// Decodes `%XX` escapes (some clients escape the `:` of a digest).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Range` header value for an upload holding `size` bytes (inclusive end, `0-0` when empty,
/// as the spec and docker's registry do).
pub(crate) fn range_value(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

/// Adds the API version header to every response, errors included.
pub(crate) async fn api_version_header(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// Entry point of every `/v2` request: a debug span, the handler, errors into spec bodies.
pub(crate) async fn dispatch(State(state): State<RegistryState>, req: Request) -> Response {
    let span = tracing::debug_span!("registry", method = %req.method(), path = %req.uri().path());
    async move {
        let resp = match handle(state, req).await {
            Ok(resp) => resp,
            Err(err) => err.into_response(),
        };
        tracing::debug!(status = resp.status().as_u16(), "registry response");
        resp
    }
    .instrument(span)
    .await
}

async fn handle(state: RegistryState, req: Request) -> Result<Response, RegistryError> {
    let path = req.uri().path().to_owned();
    let route = parse_route(&path).ok_or_else(|| RegistryError::NotFound(path.clone()))?;
    let query: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .map_err(|e| RegistryError::Unsupported(format!("malformed query string: {e}")))?;
    let method = req.method().clone();
    // A peer reading through must be answered from disk alone, or two peers missing the
    // same blob would ask each other in a loop.
    let read_through = !req.headers().contains_key(LOCAL_ONLY);
    let wrong_method = || Err(RegistryError::MethodNotAllowed(method.to_string()));
    match route {
        Route::Base => match method {
            Method::GET | Method::HEAD => Ok(json_reply(Vec::new(), &serde_json::json!({}))),
            _ => wrong_method(),
        },
        Route::Catalog => match method {
            Method::GET => catalog(&state, &query),
            _ => wrong_method(),
        },
        Route::Tags { name } => {
            validate_name(&name)?;
            match method {
                Method::GET => tags_list(&state, &name, &query),
                _ => wrong_method(),
            }
        }
        Route::Manifest { name, reference } => {
            validate_name(&name)?;
            if method != Method::PUT {
                check_reference(&name, &reference)?;
            }
            match method {
                Method::GET | Method::HEAD => {
                    let with_body = method == Method::GET;
                    get_manifest(&state, &name, &reference, with_body, read_through).await
                }
                Method::PUT => put_manifest(&state, &name, &reference, req).await,
                Method::DELETE => delete_manifest(&state, &name, &reference).await,
                _ => wrong_method(),
            }
        }
        Route::Blob { name, digest } => {
            validate_name(&name)?;
            let digest = Digest::parse(&digest)?;
            match method {
                Method::GET | Method::HEAD => {
                    let with_body = method == Method::GET;
                    let headers = req.headers();
                    get_blob(&state, &name, &digest, headers, with_body, read_through).await
                }
                Method::DELETE => delete_blob(&state, &digest).await,
                _ => wrong_method(),
            }
        }
        Route::UploadStart { name } => {
            validate_name(&name)?;
            match method {
                Method::POST => start_upload(&state, &name, &query, read_through, req).await,
                _ => wrong_method(),
            }
        }
        Route::Upload { name, id } => {
            validate_name(&name)?;
            match method {
                Method::GET => upload_status(&state, &name, &id).await,
                Method::PATCH => patch_upload(&state, &name, &id, req).await,
                Method::PUT => put_upload(&state, &name, &id, &query, read_through, req).await,
                Method::DELETE => cancel_upload(&state, &name, &id).await,
                _ => wrong_method(),
            }
        }
    }
}

/// Checks the reference of a manifest pull or delete before the tag store is asked: a malformed
/// digest is the client's mistake (400 DIGEST_INVALID); a malformed tag names nothing that
/// could have been pushed (404 MANIFEST_UNKNOWN).
fn check_reference(name: &str, reference: &str) -> Result<(), RegistryError> {
    if is_digest_reference(reference) {
        Digest::parse(reference).map(drop)
    } else if validate_tag(reference).is_err() {
        Err(RegistryError::ManifestUnknown(format!(
            "{name}:{reference}"
        )))
    } else {
        Ok(())
    }
}

/// Builds a response; header values come from validated names, digests and ids, so they are
/// always valid, but an invalid one is logged and dropped rather than panicking.
fn reply(status: StatusCode, headers: Vec<(HeaderName, String)>, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (name, value) in headers {
        match HeaderValue::try_from(value) {
            Ok(v) => {
                resp.headers_mut().insert(name, v);
            }
            Err(err) => tracing::warn!(%name, %err, "dropping an invalid response header"),
        }
    }
    resp
}

/// A 200 with a JSON body and extra headers.
fn json_reply(headers: Vec<(HeaderName, String)>, body: &serde_json::Value) -> Response {
    let mut headers = headers;
    headers.push((header::CONTENT_TYPE, "application/json".to_owned()));
    reply(StatusCode::OK, headers, Body::from(body.to_string()))
}

fn page_params(
    query: &HashMap<String, String>,
) -> Result<(Option<usize>, Option<&str>), RegistryError> {
    let n = match query.get("n") {
        None => None,
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|_| RegistryError::Unsupported(format!("n={n:?} is not a count")))?,
        ),
    };
    Ok((n, query.get("last").map(String::as_str)))
}

/// The `Link` header pointing at the next page, if there is one.
fn next_link(
    base: &str,
    more: bool,
    n: Option<usize>,
    page: &[String],
) -> Vec<(HeaderName, String)> {
    match (more, n, page.last()) {
        (true, Some(n), Some(last)) => {
            vec![(
                header::LINK,
                format!("<{base}?n={n}&last={last}>; rel=\"next\""),
            )]
        }
        _ => Vec::new(),
    }
}

fn catalog(
    state: &RegistryState,
    query: &HashMap<String, String>,
) -> Result<Response, RegistryError> {
    let (n, last) = page_params(query)?;
    let (page, more) = paginate(state.tags.repositories(), last, n);
    let headers = next_link("/v2/_catalog", more, n, &page);
    let body = serde_json::json!({ "repositories": page });
    Ok(json_reply(headers, &body))
}

fn tags_list(
    state: &RegistryState,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<Response, RegistryError> {
    if !state.tags.repositories().iter().any(|r| r == name) {
        return Err(RegistryError::NotFound(format!("repository {name}")));
    }
    let (n, last) = page_params(query)?;
    let (page, more) = paginate(state.tags.tags(name), last, n);
    let headers = next_link(&format!("/v2/{name}/tags/list"), more, n, &page);
    let body = serde_json::json!({ "name": name, "tags": page });
    Ok(json_reply(headers, &body))
}

async fn get_manifest(
    state: &RegistryState,
    name: &str,
    reference: &str,
    with_body: bool,
    read_through: bool,
) -> Result<Response, RegistryError> {
    let unknown = || RegistryError::ManifestUnknown(format!("{name}:{reference}"));
    let found = state.tags.resolve(name, reference).ok_or_else(unknown)?;
    let digest = Digest::parse(&found.digest)?;
    let limit = MAX_MANIFEST_BYTES as u64;
    let bytes = match state.blobs.read(&digest, limit).await? {
        Some(bytes) => Some(bytes),
        // The record is replicated, its bytes may not be yet.
        None if read_through && ensure_local(state, name, &digest, Some(limit)).await? => {
            state.blobs.read(&digest, limit).await?
        }
        None => None,
    };
    let bytes = bytes.ok_or_else(unknown)?;
    let headers = vec![
        (header::CONTENT_TYPE, found.media_type),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
        (CONTENT_DIGEST, digest.to_string()),
        (header::ETAG, format!("\"{digest}\"")),
    ];
    let body = if with_body {
        Body::from(bytes)
    } else {
        Body::empty()
    };
    Ok(reply(StatusCode::OK, headers, body))
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, RegistryError> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| RegistryError::Body(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(RegistryError::TooLarge(format!(
                "manifests are limited to {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

async fn put_manifest(
    state: &RegistryState,
    name: &str,
    reference: &str,
    req: Request,
) -> Result<Response, RegistryError> {
    let by_digest = is_digest_reference(reference);
    if by_digest {
        Digest::parse(reference)?;
    } else {
        validate_tag(reference)?;
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = read_limited(req.into_body(), MAX_MANIFEST_BYTES).await?;
    let digest = Digest::of(&bytes);
    if by_digest && digest.as_str() != reference {
        return Err(RegistryError::DigestMismatch {
            expected: reference.to_owned(),
            actual: digest.to_string(),
        });
    }
    let tag = (!by_digest).then_some(reference);
    let digest = store_manifest(state, name, tag, &bytes, content_type.as_deref(), false).await?;
    Ok(reply(
        StatusCode::CREATED,
        vec![
            (header::LOCATION, format!("/v2/{name}/manifests/{digest}")),
            (CONTENT_DIGEST, digest.to_string()),
        ],
        Body::empty(),
    ))
}

/// Stores manifest `bytes` in repository `name` (tagged `tag`, if given) as a push does: parsed
/// (`content_type` as the client sent it), accepted only once every blob it references is on
/// disk — with `read_through`, a missing one is fetched from the peers first — then its bytes
/// stored, then its record and tag published through the tag store. The one way a manifest
/// enters the registry (a push, `rctl commit`). Returns its digest.
pub async fn store_manifest(
    state: &RegistryState,
    name: &str,
    tag: Option<&str>,
    bytes: &[u8],
    content_type: Option<&str>,
    read_through: bool,
) -> Result<Digest, RegistryError> {
    validate_name(name)?;
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(RegistryError::TooLarge(format!(
            "manifests are limited to {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    let parsed = manifest::parse(bytes, content_type)?;
    let digest = Digest::of(bytes);
    // From the blob check to the record, no collection deletes (see `gc`).
    let _recording = state.gc_guard().recording().await;
    for needed in &parsed.references {
        let present = if read_through {
            ensure_local(state, name, needed, None).await?
        } else {
            state.blobs.stat(needed).await?.is_some()
        };
        if !present {
            return Err(RegistryError::ManifestBlobUnknown(needed.to_string()));
        }
    }
    state.blobs.put_bytes(bytes).await?;
    // The manifest's bytes, like any blob, are on a majority of managers before its tag is
    // recorded: losing this controller right after loses no image.
    replicate_to_majority(state, name, &digest).await?;
    state
        .tags
        .put(name, tag, digest.as_str(), &parsed.media_type)
        .await?;
    state.gc_guard().recorded(
        name,
        digest.as_str(),
        std::iter::once(digest.as_str()).chain(parsed.references.iter().map(Digest::as_str)),
    );
    tracing::debug!(%digest, media_type = %parsed.media_type, "manifest stored");
    Ok(digest)
}

async fn delete_manifest(
    state: &RegistryState,
    name: &str,
    reference: &str,
) -> Result<Response, RegistryError> {
    if state.tags.delete(name, reference).await? {
        Ok(reply(StatusCode::ACCEPTED, Vec::new(), Body::empty()))
    } else {
        Err(RegistryError::ManifestUnknown(format!(
            "{name}:{reference}"
        )))
    }
}

/// Parses a single `Range: bytes=a-b` (or `a-`, or `-suffix`) against a blob of `len` bytes.
/// `None` means serve the whole blob (no header, or a form we do not support).
fn parse_byte_range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: serve everything, which the spec allows
    }
    let (a, b) = spec.split_once('-')?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let suffix: u64 = suffix.parse().ok()?;
            (len.saturating_sub(suffix), len.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, len.checked_sub(1)?),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.min(len.saturating_sub(1)),
        ),
    };
    Some(if range.0 <= range.1 && range.1 < len {
        Ok(range)
    } else {
        Err(())
    })
}

async fn get_blob(
    state: &RegistryState,
    name: &str,
    digest: &Digest,
    req_headers: &HeaderMap,
    with_body: bool,
    read_through: bool,
) -> Result<Response, RegistryError> {
    let opened = match state.blobs.open_blob(digest).await? {
        Some(opened) => Some(opened),
        None if read_through && ensure_local(state, name, digest, None).await? => {
            state.blobs.open_blob(digest).await?
        }
        None => None,
    };
    let Some((mut file, len)) = opened else {
        return Err(RegistryError::BlobUnknown(digest.to_string()));
    };
    if !with_body {
        // A push asking whether to upload: it may skip the blob and reference it from a
        // manifest soon; a collection's grace period counts from now.
        state.blobs.touch(digest).await;
    }
    let mut status = StatusCode::OK;
    let mut headers = vec![
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (CONTENT_DIGEST, digest.to_string()),
        (header::ETAG, format!("\"{digest}\"")),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
    ];
    let (start, count) = match parse_byte_range(req_headers, len) {
        None => (0, len),
        Some(Ok((a, b))) => {
            status = StatusCode::PARTIAL_CONTENT;
            headers.push((header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}")));
            (a, b - a + 1)
        }
        Some(Err(())) => {
            return Ok(reply(
                StatusCode::RANGE_NOT_SATISFIABLE,
                vec![(header::CONTENT_RANGE, format!("bytes */{len}"))],
                Body::empty(),
            ))
        }
    };
    headers.push((header::CONTENT_LENGTH, count.to_string()));
    if !with_body {
        return Ok(reply(status, headers, Body::empty()));
    }
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(RegistryError::io("seek blob"))?;
    }
    let stream = ReaderStream::with_capacity(file.take(count), READ_CHUNK);
    Ok(reply(status, headers, Body::from_stream(stream)))
}

async fn delete_blob(state: &RegistryState, digest: &Digest) -> Result<Response, RegistryError> {
    if state.blobs.delete(digest).await? {
        Ok(reply(StatusCode::ACCEPTED, Vec::new(), Body::empty()))
    } else {
        Err(RegistryError::BlobUnknown(digest.to_string()))
    }
}

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn upload_reply(status: StatusCode, name: &str, id: &str, size: u64) -> Response {
    reply(
        status,
        vec![
            (header::LOCATION, upload_location(name, id)),
            (header::RANGE, range_value(size)),
            (UPLOAD_UUID, id.to_owned()),
        ],
        Body::empty(),
    )
}

fn blob_created(name: &str, digest: &Digest) -> Response {
    reply(
        StatusCode::CREATED,
        vec![
            (header::LOCATION, format!("/v2/{name}/blobs/{digest}")),
            (CONTENT_DIGEST, digest.to_string()),
        ],
        Body::empty(),
    )
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| RegistryError::SizeInvalid(format!("bad Content-Length {v:?}"))),
    }
}

/// Parses a chunk's `Content-Range: <start>-<end>` (also accepting `bytes <start>-<end>/<total>`)
/// into (start, length). A malformed header comes back as its text: the caller answers 416
/// with the upload's current range, as the spec asks.
fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, String> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let raw = String::from_utf8_lossy(v.as_bytes()).into_owned();
    let parse = || -> Option<(u64, u64)> {
        let s = v.to_str().ok()?.trim();
        let s = s.strip_prefix("bytes").map(str::trim_start).unwrap_or(s);
        let s = s.split('/').next().unwrap_or_default();
        let (a, b) = s.split_once('-')?;
        let a: u64 = a.trim().parse().ok()?;
        let b: u64 = b.trim().parse().ok()?;
        (b >= a).then(|| (a, b - a + 1))
    };
    parse().map(Some).ok_or(raw)
}

/// Streams a request body into an upload, honouring Content-Range and Content-Length. A chunk
/// refused before its bytes were read has them drained (see [`discard`]).
async fn append_body(
    state: &RegistryState,
    name: &str,
    id: &str,
    req: Request,
) -> Result<u64, RegistryError> {
    let location = upload_location(name, id);
    let (parts, body) = req.into_parts();
    let mut body = body.into_data_stream();
    let checked = match content_range(&parts.headers) {
        Ok(range) => content_length(&parts.headers).and_then(|declared| match (range, declared) {
            (Some((_, a)), Some(b)) if a != b => Err(RegistryError::SizeInvalid(format!(
                "Content-Range covers {a} bytes but Content-Length says {b}"
            ))),
            (Some((start, len)), _) => Ok((Some(start), Some(len))),
            (None, declared) => Ok((None, declared)),
        }),
        Err(value) => match state.blobs.upload_size(name, id).await {
            Ok(size) => Err(RegistryError::ContentRangeMalformed {
                value,
                size,
                location: location.clone(),
            }),
            Err(err) => Err(err),
        },
    };
    let result = match checked {
        Ok((start, len)) => {
            state
                .blobs
                .append(name, id, start, len, &location, &mut body)
                .await
        }
        Err(err) => Err(err),
    };
    if let Err(
        RegistryError::RangeInvalid { .. }
        | RegistryError::ContentRangeMalformed { .. }
        | RegistryError::SizeInvalid(_)
        | RegistryError::TooLarge(_)
        | RegistryError::DiskFull(_)
        | RegistryError::UploadUnknown(_),
    ) = &result
    {
        discard(body).await;
    }
    result
}

/// Most of an unread request body [`discard`] reads before giving up on it.
const DISCARD_LIMIT: u64 = 4 << 20;
/// How long [`discard`] waits for the rest of a body.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what is left of a refused request's body (up to [`DISCARD_LIMIT`] bytes
/// within [`DISCARD_TIMEOUT`]) before the refusal is sent. Answering with the body unread makes
/// hyper reset the HTTP/2 stream (or close the HTTP/1 connection), and clients such as curl
/// then report a transport error instead of the 416 or 400 they were sent.
async fn discard(mut body: axum::body::BodyDataStream) {
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            seen += chunk.len() as u64;
            if seen > DISCARD_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}

/// `quorum`: acknowledge a monolithic upload only once a majority of managers hold the blob
/// (false for a peer's push, which is itself part of another manager's quorum).
async fn start_upload(
    state: &RegistryState,
    name: &str,
    query: &HashMap<String, String>,
    quorum: bool,
    req: Request,
) -> Result<Response, RegistryError> {
    if let Some(mount) = query.get("mount") {
        // A mount that cannot be done (a malformed digest or source name, a blob not here)
        // falls back to an ordinary upload, as the spec asks: the client then sends the bytes.
        // Blobs are shared by all repositories, so a mount succeeds whenever the blob exists;
        // `from` is optional.
        let from_ok = query
            .get("from")
            .is_none_or(|from| validate_name(from).is_ok());
        match Digest::parse(mount) {
            Ok(digest) if from_ok => {
                if state.blobs.stat(&digest).await?.is_some() {
                    state.blobs.touch(&digest).await;
                    tracing::debug!(%digest, "blob mounted");
                    return Ok(blob_created(name, &digest));
                }
            }
            _ => tracing::debug!(mount, from = ?query.get("from"), "mount arguments invalid"),
        }
    }
    if let Some(digest) = query.get("digest") {
        let digest = Digest::parse(digest)?;
        let id = state.blobs.start_upload(name).await?;
        if let Err(err) = append_body(state, name, &id, req).await {
            state.blobs.cancel(name, &id).await?;
            return Err(err);
        }
        let existed = state.blobs.stat(&digest).await?.is_some();
        state.blobs.finish(name, &id, &digest).await?;
        return acknowledge(state, name, &digest, existed, quorum).await;
    }
    let id = state.blobs.start_upload(name).await?;
    tracing::debug!(id, "upload started");
    Ok(upload_reply(StatusCode::ACCEPTED, name, &id, 0))
}

async fn upload_status(
    state: &RegistryState,
    name: &str,
    id: &str,
) -> Result<Response, RegistryError> {
    let size = state.blobs.upload_size(name, id).await?;
    Ok(upload_reply(StatusCode::NO_CONTENT, name, id, size))
}

async fn patch_upload(
    state: &RegistryState,
    name: &str,
    id: &str,
    req: Request,
) -> Result<Response, RegistryError> {
    let size = append_body(state, name, id, req).await?;
    Ok(upload_reply(StatusCode::ACCEPTED, name, id, size))
}

/// The closing PUT. If it fails with a client error, the upload is over and its bytes are
/// discarded (the spec has the client consider such an upload failed), so a refused blob
/// leaves nothing behind; a 416 keeps it, since it tells the client where to resume.
async fn put_upload(
    state: &RegistryState,
    name: &str,
    id: &str,
    query: &HashMap<String, String>,
    quorum: bool,
    req: Request,
) -> Result<Response, RegistryError> {
    let result = close_upload(state, name, id, query, quorum, req).await;
    if let Err(err) = &result {
        let (_, status) = err.code_and_status();
        let resumable = status == StatusCode::RANGE_NOT_SATISFIABLE;
        let gone = matches!(err, RegistryError::UploadUnknown(_));
        if status.is_client_error() && !resumable && !gone {
            if let Err(cancel) = state.blobs.cancel(name, id).await {
                tracing::warn!(id, err = %cancel, "discarding a refused upload");
            }
        }
    }
    result
}

async fn close_upload(
    state: &RegistryState,
    name: &str,
    id: &str,
    query: &HashMap<String, String>,
    quorum: bool,
    req: Request,
) -> Result<Response, RegistryError> {
    let digest = query
        .get("digest")
        .ok_or_else(|| {
            RegistryError::DigestInvalid("the digest query parameter is required".into())
        })
        .and_then(|d| Digest::parse(d));
    let digest = match digest {
        Ok(digest) => digest,
        Err(err) => {
            discard(req.into_body().into_data_stream()).await;
            return Err(err);
        }
    };
    append_body(state, name, id, req).await?;
    let existed = state.blobs.stat(&digest).await?.is_some();
    state.blobs.finish(name, id, &digest).await?;
    tracing::debug!(%digest, "upload finished");
    acknowledge(state, name, &digest, existed, quorum).await
}

/// Answers a finished upload of `digest`: with `quorum`, only once a majority of the managers
/// hold the blob (see `peers`). A blob no majority could be given is removed again unless it
/// `existed` before this upload, so that a retrying client finds it absent and uploads it
/// anew instead of skipping it and pushing a manifest over a blob one manager alone holds.
async fn acknowledge(
    state: &RegistryState,
    name: &str,
    digest: &Digest,
    existed: bool,
    quorum: bool,
) -> Result<Response, RegistryError> {
    if quorum {
        if let Err(err) = replicate_to_majority(state, name, digest).await {
            if !existed {
                if let Err(del) = state.blobs.delete(digest).await {
                    tracing::warn!(%digest, err = %del, "removing a blob no majority holds");
                }
            }
            return Err(err);
        }
    }
    Ok(blob_created(name, digest))
}

async fn cancel_upload(
    state: &RegistryState,
    name: &str,
    id: &str,
) -> Result<Response, RegistryError> {
    if state.blobs.cancel(name, id).await? {
        Ok(reply(StatusCode::NO_CONTENT, Vec::new(), Body::empty()))
    } else {
        Err(RegistryError::UploadUnknown(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn routes() {
        let d = "sha256:aaaa";
        let cases = [
            ("/v2", Some(Route::Base)),
            ("/v2/", Some(Route::Base)),
            ("/v2/_catalog", Some(Route::Catalog)),
            ("/v2/a/b/tags/list", Some(Route::Tags { name: s("a/b") })),
            (
                "/v2/a/manifests/latest",
                Some(Route::Manifest {
                    name: s("a"),
                    reference: s("latest"),
                }),
            ),
            (
                "/v2/a/blobs/manifests/x",
                Some(Route::Manifest {
                    name: s("a/blobs"),
                    reference: s("x"),
                }),
            ),
            (
                "/v2/a/b/blobs/sha256%3Aaaaa",
                Some(Route::Blob {
                    name: s("a/b"),
                    digest: s(d),
                }),
            ),
            (
                "/v2/a/blobs/uploads/",
                Some(Route::UploadStart { name: s("a") }),
            ),
            (
                "/v2/a/blobs/uploads",
                Some(Route::UploadStart { name: s("a") }),
            ),
            (
                "/v2/a/blobs/uploads/abc",
                Some(Route::Upload {
                    name: s("a"),
                    id: s("abc"),
                }),
            ),
            (
                "/v2/x/blobs/uploads/blobs/sha256:aaaa",
                Some(Route::Blob {
                    name: s("x/blobs/uploads"),
                    digest: s(d),
                }),
            ),
            ("/v2/manifests/latest", None),
            ("/v2/a/b", None),
            ("/v3/a/manifests/x", None),
            ("/v2x", None),
        ];
        for (path, want) in cases {
            assert_eq!(parse_route(path), want, "{path}");
        }
    }

    #[test]
    fn ranges() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range(&h).unwrap(), None);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("10-19"));
        assert_eq!(content_range(&h).unwrap(), Some((10, 10)));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 0-0/*"),
        );
        assert_eq!(content_range(&h).unwrap(), Some((0, 1)));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("9-3"));
        assert!(content_range(&h).is_err());

        let mut h = HeaderMap::new();
        assert_eq!(parse_byte_range(&h, 10), None);
        for (v, want) in [
            ("bytes=0-4", Some(Ok((0, 4)))),
            ("bytes=5-", Some(Ok((5, 9)))),
            ("bytes=-3", Some(Ok((7, 9)))),
            ("bytes=8-100", Some(Ok((8, 9)))),
            ("bytes=10-12", Some(Err(()))),
            ("bytes=0-1,3-4", None),
        ] {
            h.insert(header::RANGE, HeaderValue::from_static(v));
            assert_eq!(parse_byte_range(&h, 10), want, "{v}");
        }
        assert_eq!(range_value(0), "0-0");
        assert_eq!(range_value(10), "0-9");
        assert_eq!(percent_decode("a%3Ab%zz%4"), "a:b%zz%4");
    }
}
