//! Authentication and registry-to-registry copies against a small in-test registry that can
//! demand Basic credentials or Bearer tokens (served by its own `/token` endpoint, as the
//! distribution token spec describes). It counts 401s, token requests, uploaded bytes and
//! mounts, so "credentials go up front once the scheme is known", "one token per scope" and
//! "only missing blobs travel" are checked, not assumed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rudder_image::auth::AuthError;
use rudder_image::oci::host_architecture;
use rudder_image::{
    copy_image, import_rootfs, CopyOptions, Credentials, ImageError, Reference, RegistryClient,
    TransferError,
};
use sha2::{Digest, Sha256};

const USER: &str = "tester";
const PASS: &str = "s3cret";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Open,
    Basic,
    /// Bearer tokens; anonymous tokens are given for pulls only.
    Bearer,
}

struct Registry {
    mode: Mode,
    blobs: HashMap<String, Vec<u8>>,
    /// Which repositories hold which blobs (a blob in one repository is not in another until
    /// uploaded or mounted there).
    repo_blobs: HashSet<(String, String)>,
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    uploads: u64,
    unauthorized: u32,
    token_scopes: Vec<String>,
    bytes_uploaded: u64,
    mounts: u32,
    /// Serve blobs with their first byte flipped.
    corrupt: bool,
}

type Shared = Arc<Mutex<Registry>>;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn error(status: StatusCode, code: &str) -> Response {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":""}}]}}"#);
    (status, [("content-type", "application/json")], body).into_response()
}

fn basic_ok(headers: &HeaderMap) -> bool {
    let want = format!("Basic {}", Credentials::new(USER, PASS).encode());
    headers
        .get("authorization")
        .is_some_and(|v| v.to_str().unwrap() == want)
}

/// Checks the request's credentials for `repo` (empty: the registry) and `push`; the 401 to
/// answer when they do not do.
fn check_auth(reg: &mut Registry, headers: &HeaderMap, repo: &str, push: bool) -> Option<Response> {
    let host = headers["host"].to_str().unwrap().to_string();
    let actions = if push { "pull,push" } else { "pull" };
    let (ok, challenge) = match reg.mode {
        Mode::Open => return None,
        Mode::Basic => (basic_ok(headers), r#"Basic realm="fake""#.to_string()),
        Mode::Bearer => {
            let token = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer tok:"))
                .unwrap_or("missing")
                .to_string();
            let ok = if repo.is_empty() {
                token != "missing"
            } else {
                token.starts_with(&format!("repository:{repo}:"))
                    && (!push || token.ends_with("push"))
            };
            let scope = if repo.is_empty() {
                String::new()
            } else {
                format!(r#",scope="repository:{repo}:{actions}""#)
            };
            (
                ok,
                format!(r#"Bearer realm="http://{host}/token",service="fake"{scope}"#),
            )
        }
    };
    if ok {
        return None;
    }
    reg.unauthorized += 1;
    let mut resp = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    resp.headers_mut()
        .insert("www-authenticate", challenge.parse().unwrap());
    Some(resp)
}

async fn handle(
    State(reg): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("%3A", ":")
                    .replace("%2F", "/")
                    .replace("%2C", ","),
            )
        })
        .collect();
    let mut reg = reg.lock().unwrap();
    if uri.path() == "/token" {
        let scope = query.get("scope").cloned().unwrap_or_default();
        assert_eq!(query.get("service").map(String::as_str), Some("fake"));
        reg.token_scopes.push(scope.clone());
        let anonymous_pull = !headers.contains_key("authorization") && !scope.ends_with("push");
        if !(basic_ok(&headers) || anonymous_pull) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        // Both spellings of the answer occur in the wild.
        let key = if scope.ends_with("push") {
            "access_token"
        } else {
            "token"
        };
        return axum::Json(serde_json::json!({ key: format!("tok:{scope}") })).into_response();
    }
    let path = uri.path().strip_prefix("/v2/").unwrap_or("").to_string();
    if path.is_empty() {
        if let Some(denied) = check_auth(&mut reg, &headers, "", false) {
            return denied;
        }
        return StatusCode::OK.into_response();
    }
    let repo = ["/blobs/", "/manifests/"]
        .iter()
        .find_map(|sep| path.split_once(sep).map(|(r, _)| r.to_string()))
        .unwrap_or_default();
    let push = !matches!(method, Method::GET | Method::HEAD);
    if let Some(denied) = check_auth(&mut reg, &headers, &repo, push) {
        return denied;
    }
    if let Some((repo, rest)) = path.split_once("/blobs/uploads/") {
        if method == Method::POST {
            if let (Some(digest), Some(from)) = (query.get("mount"), query.get("from")) {
                if reg.repo_blobs.contains(&(from.clone(), digest.clone())) {
                    reg.mounts += 1;
                    reg.repo_blobs.insert((repo.to_string(), digest.clone()));
                    return StatusCode::CREATED.into_response();
                }
            }
            reg.uploads += 1;
            let location = format!("/v2/{repo}/blobs/uploads/{}", reg.uploads);
            return (StatusCode::ACCEPTED, [("location", location)]).into_response();
        }
        if method == Method::DELETE {
            return StatusCode::NO_CONTENT.into_response();
        }
        if method == Method::PUT && !rest.is_empty() {
            let digest = query["digest"].clone();
            if sha(&body) != digest {
                return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
            }
            reg.bytes_uploaded += body.len() as u64;
            reg.blobs.insert(digest.clone(), body.to_vec());
            reg.repo_blobs.insert((repo.to_string(), digest));
            return StatusCode::CREATED.into_response();
        }
    }
    if let Some((repo, digest)) = path.split_once("/blobs/") {
        let known = reg
            .repo_blobs
            .contains(&(repo.to_string(), digest.to_string()));
        return match (known, method) {
            (true, Method::HEAD) => StatusCode::OK.into_response(),
            (true, Method::GET) => {
                let mut b = reg.blobs[digest].clone();
                if reg.corrupt {
                    b[0] ^= 1;
                }
                b.into_response()
            }
            _ => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        };
    }
    if let Some((repo, reference)) = path.split_once("/manifests/") {
        if method == Method::PUT {
            let media_type = headers["content-type"].to_str().unwrap().to_string();
            let digest = sha(&body);
            for key in [reference.to_string(), digest] {
                reg.manifests
                    .insert((repo.to_string(), key), (media_type.clone(), body.to_vec()));
            }
            return StatusCode::CREATED.into_response();
        }
        return match reg
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
        {
            Some((mt, bytes)) => ([("content-type", mt.clone())], bytes.clone()).into_response(),
            None => error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        };
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn start(mode: Mode) -> (String, Shared) {
    let reg: Shared = Arc::new(Mutex::new(Registry {
        mode,
        blobs: HashMap::new(),
        repo_blobs: HashSet::new(),
        manifests: HashMap::new(),
        uploads: 0,
        unauthorized: 0,
        token_scopes: Vec::new(),
        bytes_uploaded: 0,
        mounts: 0,
        corrupt: false,
    }));
    let app = axum::Router::new().fallback(handle).with_state(reg.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr.to_string(), reg)
}

fn client(host: &str, creds: Option<(&str, &str)>) -> RegistryClient {
    RegistryClient::remote(host, true, creds.map(|(u, p)| Credentials::new(u, p))).unwrap()
}

/// A small root filesystem tarball with one file of `content`.
fn rootfs(dir: &std::path::Path, content: &[u8]) -> std::path::PathBuf {
    let path = dir.join(format!("rootfs-{}.tar", &sha(content)[7..15]));
    let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "hello.txt", content).unwrap();
    b.into_inner().unwrap();
    path
}

fn is_auth(err: &ImageError, failed: bool) -> bool {
    match err {
        ImageError::Auth(AuthError::Failed { .. }) => failed,
        ImageError::Auth(AuthError::Required { .. }) => !failed,
        _ => false,
    }
}

#[tokio::test]
async fn basic_auth_answers_the_challenge_then_sends_credentials_up_front() {
    let (host, reg) = start(Mode::Basic).await;
    let tmp = tempfile::tempdir().unwrap();
    let tar = rootfs(tmp.path(), b"hello");
    let reference = Reference::parse("team/app:v1").unwrap();

    let err = client(&host, None)
        .get_manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(is_auth(&err, false), "{err}");
    assert_eq!(
        err.to_string(),
        format!("image: http://{host}: authentication required")
    );
    let wrong = client(&host, Some((USER, "nope")));
    let err = wrong.ping().await.unwrap_err();
    assert!(is_auth(&err, true), "{err}");
    let err = import_rootfs(&wrong, &tar, &reference).await.unwrap_err();
    assert!(is_auth(&err, true), "{err}");

    reg.lock().unwrap().unauthorized = 0;
    let good = client(&host, Some((USER, PASS)));
    good.ping().await.unwrap();
    let pushed = import_rootfs(&good, &tar, &reference).await.unwrap();
    let (_, _, digest) = good.get_manifest("team/app", "v1").await.unwrap();
    assert_eq!(digest, pushed.manifest_digest);
    assert_eq!(
        reg.lock().unwrap().unauthorized,
        1,
        "only the very first request is refused"
    );
}

#[tokio::test]
async fn bearer_tokens_are_fetched_once_per_scope() {
    let (host, reg) = start(Mode::Bearer).await;
    let tmp = tempfile::tempdir().unwrap();
    let tar = rootfs(tmp.path(), b"bearer");
    let reference = Reference::parse("team/app:v1").unwrap();

    let good = client(&host, Some((USER, PASS)));
    let pushed = import_rootfs(&good, &tar, &reference).await.unwrap();
    // A clone shares the token cache.
    let clone = good.clone();
    let (_, _, digest) = clone.get_manifest("team/app", "v1").await.unwrap();
    assert_eq!(digest, pushed.manifest_digest);
    {
        let reg = reg.lock().unwrap();
        assert_eq!(
            reg.token_scopes,
            ["repository:team/app:pull", "repository:team/app:pull,push"]
        );
        assert_eq!(reg.unauthorized, 1);
    }

    // Anonymous: pulls get a token, pushes do not.
    let anonymous = client(&host, None);
    anonymous.get_manifest("team/app", "v1").await.unwrap();
    let err = import_rootfs(&anonymous, &tar, &Reference::parse("team/other").unwrap())
        .await
        .unwrap_err();
    assert!(is_auth(&err, false), "{err}");

    // A wrong password: the token service refuses it.
    let err = client(&host, Some((USER, "nope")))
        .get_manifest("team/app", "v1")
        .await
        .unwrap_err();
    assert!(is_auth(&err, true), "{err}");
    assert_eq!(
        err.to_string(),
        format!("image: http://{host}: authentication failed")
    );
}

#[tokio::test]
async fn copies_move_only_missing_blobs() {
    let (a, reg_a) = start(Mode::Open).await;
    let (b, reg_b) = start(Mode::Basic).await;
    let (src, dst) = (client(&a, None), client(&b, Some((USER, PASS))));
    let tmp = tempfile::tempdir().unwrap();
    let v1 = Reference::parse("team/app:v1").unwrap();
    let imported = import_rootfs(&src, &rootfs(tmp.path(), b"one"), &v1)
        .await
        .unwrap();

    let there = Reference::parse(&format!("{b}/team/app:v1")).unwrap();
    let r = copy_image(&src, &v1, &dst, &there, CopyOptions::default())
        .await
        .unwrap();
    assert_eq!(r.digest, imported.manifest_digest);
    assert_eq!((r.blobs_moved, r.blobs_skipped), (2, 0));
    assert_eq!(r.bytes, imported.bytes_uploaded);
    assert_eq!(reg_b.lock().unwrap().bytes_uploaded, r.bytes);
    let again = copy_image(&src, &v1, &dst, &there, CopyOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (again.blobs_moved, again.blobs_skipped, again.bytes),
        (0, 2, 0)
    );

    // Within one registry (`rctl image tag`): blobs are mounted, not copied.
    let before = reg_a.lock().unwrap().bytes_uploaded;
    let tagged = Reference::parse("other/name:v9").unwrap();
    let t = copy_image(&src, &v1, &src, &tagged, CopyOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (t.digest.as_str(), t.blobs_moved, t.bytes),
        (r.digest.as_str(), 0, 0)
    );
    assert_eq!(reg_a.lock().unwrap().mounts, 2);
    assert_eq!(reg_a.lock().unwrap().bytes_uploaded, before);
    assert_eq!(
        src.get_manifest("other/name", "v9").await.unwrap().2,
        r.digest
    );

    // Missing source and a digest destination: errors that say which side.
    let err = copy_image(
        &src,
        &Reference::parse("team/app:nope").unwrap(),
        &dst,
        &there,
        CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, TransferError::Source(e) if e.is_not_found()),
        "{err}"
    );
    let pinned = Reference::parse(&format!("team/app@{}", r.digest)).unwrap();
    let err = copy_image(&src, &v1, &dst, &pinned, CopyOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs a tag"), "{err}");
}

#[tokio::test]
async fn pulls_pick_this_platform_from_an_index() {
    let (a, _reg_a) = start(Mode::Open).await;
    let (b, _reg_b) = start(Mode::Open).await;
    let (src, dst) = (client(&a, None), client(&b, None));
    let tmp = tempfile::tempdir().unwrap();
    let image = import_rootfs(
        &src,
        &rootfs(tmp.path(), b"multi"),
        &Reference::parse("multi:img").unwrap(),
    )
    .await
    .unwrap();
    let (mt, manifest, _) = src.get_manifest("multi", "img").await.unwrap();
    let index = |arches: &[&str]| {
        let entries: Vec<String> = arches
            .iter()
            .map(|arch| {
                format!(
                    r#"{{"mediaType":"{mt}","digest":"{}","size":{},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                    image.manifest_digest,
                    manifest.len()
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        )
        .into_bytes()
    };
    let oci_index = "application/vnd.oci.image.index.v1+json";
    src.push_manifest(
        "multi",
        "both",
        oci_index,
        index(&["s390x", host_architecture()]),
    )
    .await
    .unwrap();
    src.push_manifest("multi", "foreign", oci_index, index(&["s390x"]))
        .await
        .unwrap();

    let pick = CopyOptions {
        pick_platform: true,
    };
    let r = copy_image(
        &src,
        &Reference::parse("multi:both").unwrap(),
        &dst,
        &Reference::parse("multi:mine").unwrap(),
        pick,
    )
    .await
    .unwrap();
    assert_eq!(
        r.digest, image.manifest_digest,
        "the platform's manifest is tagged"
    );
    assert_eq!(dst.get_manifest("multi", "mine").await.unwrap().1, manifest);

    // Whole: the index itself, its manifest by digest.
    let whole = copy_image(
        &src,
        &Reference::parse("multi:both").unwrap(),
        &dst,
        &Reference::parse("multi:all").unwrap(),
        CopyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(whole.media_type, oci_index);
    assert_eq!(whole.blobs_moved, 0);

    let err = copy_image(
        &src,
        &Reference::parse("multi:foreign").unwrap(),
        &dst,
        &Reference::parse("multi:x").unwrap(),
        pick,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("no linux/{} image", host_architecture()))
            && err.to_string().contains("linux/s390x"),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupt_source_blob_is_not_stored() {
    let (a, reg_a) = start(Mode::Open).await;
    let (b, reg_b) = start(Mode::Open).await;
    let (src, dst) = (client(&a, None), client(&b, None));
    let tmp = tempfile::tempdir().unwrap();
    let v1 = Reference::parse("app:v1").unwrap();
    import_rootfs(&src, &rootfs(tmp.path(), b"corrupt"), &v1)
        .await
        .unwrap();
    reg_a.lock().unwrap().corrupt = true;
    let err = copy_image(&src, &v1, &dst, &v1, CopyOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            TransferError::Source(ImageError::DigestMismatch { .. })
        ),
        "{err}"
    );
    let reg_b = reg_b.lock().unwrap();
    assert!(reg_b.blobs.is_empty() && reg_b.manifests.is_empty());
}
