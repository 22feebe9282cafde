//! End-to-end tests: a real server on 127.0.0.1:0 over a tempdir and a [`MemTagStore`],
//! driven over HTTP with reqwest, and (when installed) by skopeo. Read-through and quorum tests
//! run several such servers sharing one tag store, as the managers of a cluster share the Raft
//! one, with loopback ports nothing listens on standing for managers that are down.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{json, Value};

use super::manifest::{OCI_INDEX, OCI_MANIFEST};
use super::*;

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const GZIP_LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";

struct Server {
    base: String,
    port: u16,
    state: RegistryState,
    client: Client,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn start() -> Self {
        Self::start_with(Arc::new(MemTagStore::new()), None).await
    }

    /// A server over its own blob directory, with the given tag store and peers.
    async fn start_with(tags: Arc<dyn TagStore>, peers: Option<Arc<dyn PeerRegistries>>) -> Self {
        Self::start_limited(tags, peers, blob::UploadLimits::default()).await
    }

    /// [`Server::start_with`], with the blob store's limits given.
    async fn start_limited(
        tags: Arc<dyn TagStore>,
        peers: Option<Arc<dyn PeerRegistries>>,
        limits: blob::UploadLimits,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open_with(dir.path().join("registry"), limits).unwrap();
        let mut state = RegistryState::new(blobs, tags);
        if let Some(peers) = peers {
            state = state.with_peers(peers).unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            serve(listener, served, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            state,
            client: Client::new(),
            _dir: dir,
            _stop: stop,
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    async fn send(&self, method: Method, path: &str) -> Response {
        self.req(method, path).send().await.unwrap()
    }

    /// Monolithic upload; returns the digest.
    async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = Digest::of(data);
        let resp = self
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            )
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        digest
    }

    async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    }

    fn blob_files(&self) -> usize {
        std::fs::read_dir(self.state.blobs().root().join("blobs/sha256"))
            .unwrap()
            .count()
    }
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_default()
}

/// The codes the distribution spec allows in a 4xx error body.
const SPEC_CODES: &[&str] = &[
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
];

/// The code of an error response, checked to be one the spec allows for its 4xx status.
async fn error_code(resp: Response) -> String {
    error_body(resp).await["errors"][0]["code"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn error_body(resp: Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    let code = body["errors"][0]["code"].as_str().unwrap();
    if status.is_client_error() {
        assert!(
            SPEC_CODES.contains(&code),
            "{status}: {code} is not a spec code"
        );
    }
    body
}

fn image_manifest(config: &Digest, config_len: usize, layers: &[(&Digest, usize)]) -> Vec<u8> {
    image_manifest_with(LAYER_TYPE, config, config_len, layers)
}

fn image_manifest_with(
    layer_type: &str,
    config: &Digest,
    config_len: usize,
    layers: &[(&Digest, usize)],
) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(d, n)| json!({"mediaType": layer_type, "digest": d.to_string(), "size": n}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.to_string(), "size": config_len},
        "layers": layers,
    }))
    .unwrap()
}

#[tokio::test]
async fn base_endpoint_and_errors() {
    let s = Server::start().await;
    let resp = s.send(Method::GET, "/v2/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
    assert_eq!(s.send(Method::GET, "/v2").await.status(), StatusCode::OK);

    let resp = s.send(Method::GET, "/v2/Bad..Name/tags/list").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        header(&resp, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert_eq!(error_code(resp).await, "NAME_INVALID");

    let resp = s
        .send(Method::GET, &format!("/v2/a/blobs/{}", Digest::of(b"x")))
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    let resp = s.send(Method::GET, "/v2/a/blobs/sha256:nothex").await;
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    let resp = s.send(Method::GET, "/v2/a/manifests/latest").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
    assert_eq!(
        s.send(Method::GET, "/v2/a/tags/list").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.send(Method::POST, "/v2/a/manifests/x").await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test]
async fn monolithic_upload_get_and_head() {
    let s = Server::start().await;
    // Bigger than axum's default 2 MiB body limit, to prove it is off.
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i % 251) as u8).collect();
    let digest = s.push_blob("library/busybox", &data).await;

    let resp = s
        .send(Method::HEAD, &format!("/v2/library/busybox/blobs/{digest}"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), data.len().to_string());
    assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());

    let resp = s
        .send(Method::GET, &format!("/v2/library/busybox/blobs/{digest}"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
    assert_eq!(resp.bytes().await.unwrap(), data);

    // Range reads.
    let resp = s
        .req(Method::GET, &format!("/v2/library/busybox/blobs/{digest}"))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&resp, "content-range"),
        format!("bytes 10-19/{}", data.len())
    );
    assert_eq!(resp.bytes().await.unwrap(), data[10..20]);

    // Blobs are shared: another repository sees it too.
    let resp = s
        .send(Method::HEAD, &format!("/v2/other/blobs/{digest}"))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn chunked_upload() {
    let s = Server::start().await;
    let resp = s.send(Method::POST, "/v2/test/img/blobs/uploads/").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&resp, "range"), "0-0");
    let location = header(&resp, "location").to_owned();
    let uuid = header(&resp, "docker-upload-uuid").to_owned();
    assert_eq!(location, format!("/v2/test/img/blobs/uploads/{uuid}"));

    let resp = s
        .req(Method::PATCH, &location)
        .header("content-range", "0-4")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&resp, "range"), "0-4");
    let location = header(&resp, "location").to_owned();

    // Out of order chunk: 416, with the current range so the client can resume.
    let resp = s
        .req(Method::PATCH, &location)
        .header("content-range", "7-9")
        .body("xyz")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&resp, "range"), "0-4");

    // A chunk without Content-Range (streamed, as containers/image does).
    let resp = s
        .req(Method::PATCH, &location)
        .body(" big")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&resp, "range"), "0-8");

    let resp = s.send(Method::GET, &location).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&resp, "range"), "0-8");

    // Same upload addressed through another repository: unknown.
    let other = location.replace("/test/img/", "/test/other/");
    assert_eq!(
        s.send(Method::GET, &other).await.status(),
        StatusCode::NOT_FOUND
    );

    let digest = Digest::of(b"hello big world");
    let resp = s
        .req(Method::PUT, &format!("{location}?digest={digest}"))
        .body(" world")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/test/img/blobs/{digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());

    let body = s
        .send(Method::GET, &format!("/v2/test/img/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, "hello big world");
    // The upload is over.
    assert_eq!(
        s.send(Method::GET, &location).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn digest_mismatch_stores_nothing() {
    let s = Server::start().await;
    let wrong = Digest::of(b"something else");

    let resp = s
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={wrong}"),
        )
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");

    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    let location = header(&resp, "location").to_owned();
    s.req(Method::PATCH, &location)
        .body("payload")
        .send()
        .await
        .unwrap();
    let resp = s
        .req(Method::PUT, &format!("{location}?digest={wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");

    for d in [&wrong, &Digest::of(b"payload")] {
        assert_eq!(
            s.send(Method::HEAD, &format!("/v2/a/blobs/{d}"))
                .await
                .status(),
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(s.blob_files(), 0);
    assert_eq!(
        std::fs::read_dir(s.state.blobs().root().join("uploads"))
            .unwrap()
            .count(),
        0
    );

    // PUT without a digest is refused too.
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    let location = header(&resp, "location").to_owned();
    let resp = s
        .req(Method::PUT, &location)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");
}

#[tokio::test]
async fn cancel_upload() {
    let s = Server::start().await;
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads").await;
    let location = header(&resp, "location").to_owned();
    assert_eq!(
        s.send(Method::DELETE, &location).await.status(),
        StatusCode::NO_CONTENT
    );
    let resp = s.send(Method::GET, &location).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(
        s.send(Method::DELETE, &location).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn manifests_tags_catalog_and_delete() {
    let s = Server::start().await;
    let repo = "library/app";
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"not really a tar";
    let config_d = s.push_blob(repo, config).await;
    let layer_d = s.push_blob(repo, layer).await;
    let manifest = image_manifest(&config_d, config.len(), &[(&layer_d, layer.len())]);
    let manifest_d = Digest::of(&manifest);

    let resp = s.put_manifest(repo, "v1", OCI_MANIFEST, &manifest).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "docker-content-digest"), manifest_d.as_str());
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/{repo}/manifests/{manifest_d}")
    );

    for reference in ["v1", manifest_d.as_str()] {
        let resp = s
            .send(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&resp, "docker-content-digest"), manifest_d.as_str());
        assert_eq!(resp.bytes().await.unwrap(), manifest);

        let resp = s
            .send(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), manifest.len().to_string());
        assert_eq!(header(&resp, "docker-content-digest"), manifest_d.as_str());
    }
    // Manifests belong to their repository, even though blobs are shared.
    assert_eq!(
        s.send(Method::GET, &format!("/v2/other/manifests/{manifest_d}"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );

    // By digest: must match the body.
    let resp = s
        .put_manifest(repo, manifest_d.as_str(), OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = s
        .put_manifest(repo, config_d.as_str(), OCI_MANIFEST, &manifest)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");

    // Missing blob, invalid JSON, contradicting media type, bad tag: refused, nothing tagged.
    let missing = Digest::of(b"missing layer");
    let dangling = image_manifest(&config_d, config.len(), &[(&missing, 13)]);
    let resp = s
        .put_manifest(repo, "broken", OCI_MANIFEST, &dangling)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = error_body(resp).await;
    assert_eq!(body["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(
        body["errors"][0]["detail"],
        json!({"digest": missing.as_str()})
    );
    let resp = s
        .put_manifest(repo, "broken", OCI_MANIFEST, b"{not json")
        .await;
    assert_eq!(error_code(resp).await, "MANIFEST_INVALID");
    let resp = s.put_manifest(repo, "broken", OCI_INDEX, &manifest).await;
    assert_eq!(error_code(resp).await, "MANIFEST_INVALID");
    let resp = s.put_manifest(repo, "-bad", OCI_MANIFEST, &manifest).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "MANIFEST_INVALID");
    assert_eq!(
        s.send(Method::GET, &format!("/v2/{repo}/manifests/broken"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let huge = vec![b' '; manifest::MAX_MANIFEST_BYTES + 1];
    let resp = s.put_manifest(repo, "huge", OCI_MANIFEST, &huge).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // An index referencing the manifest.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_d.to_string(), "size": manifest.len()}],
    }))
    .unwrap();
    assert_eq!(
        s.put_manifest(repo, "multi", OCI_INDEX, &index)
            .await
            .status(),
        StatusCode::CREATED
    );
    let resp = s
        .send(Method::GET, &format!("/v2/{repo}/manifests/multi"))
        .await;
    assert_eq!(header(&resp, "content-type"), OCI_INDEX);

    // Tags list with pagination.
    for tag in ["a", "b", "c"] {
        assert_eq!(
            s.put_manifest(repo, tag, OCI_MANIFEST, &manifest)
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let resp = s.send(Method::GET, &format!("/v2/{repo}/tags/list")).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": repo, "tags": ["a", "b", "c", "multi", "v1"]})
    );
    let resp = s
        .send(Method::GET, &format!("/v2/{repo}/tags/list?n=2&last=a"))
        .await;
    assert_eq!(
        header(&resp, "link"),
        format!("</v2/{repo}/tags/list?n=2&last=c>; rel=\"next\"")
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["b", "c"])
    );
    let resp = s
        .send(Method::GET, &format!("/v2/{repo}/tags/list?n=2&last=c"))
        .await;
    assert_eq!(header(&resp, "link"), "");
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["multi", "v1"])
    );

    // Catalog.
    assert_eq!(
        s.put_manifest("zz/other", "x", OCI_MANIFEST, &manifest)
            .await
            .status(),
        StatusCode::CREATED
    );
    let resp = s.send(Method::GET, "/v2/_catalog").await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"repositories": [repo, "zz/other"]})
    );
    let resp = s.send(Method::GET, "/v2/_catalog?n=1").await;
    assert_eq!(
        header(&resp, "link"),
        format!("</v2/_catalog?n=1&last={repo}>; rel=\"next\"")
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"repositories": [repo]})
    );

    // Delete a tag, then the manifest by digest (its remaining tags go with it).
    assert_eq!(
        s.send(Method::DELETE, &format!("/v2/{repo}/manifests/a"))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.send(Method::GET, &format!("/v2/{repo}/manifests/a"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.send(Method::GET, &format!("/v2/{repo}/manifests/b"))
            .await
            .status(),
        StatusCode::OK
    );
    let path = format!("/v2/{repo}/manifests/{manifest_d}");
    assert_eq!(
        s.send(Method::DELETE, &path).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.send(Method::DELETE, &path).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.send(Method::GET, &format!("/v2/{repo}/manifests/b"))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let resp = s.send(Method::GET, &format!("/v2/{repo}/tags/list")).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["multi"])
    );

    // Delete a blob.
    let blob = format!("/v2/{repo}/blobs/{layer_d}");
    assert_eq!(
        s.send(Method::DELETE, &blob).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.send(Method::HEAD, &blob).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.send(Method::DELETE, &blob).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn cross_repository_mount() {
    let s = Server::start().await;
    let digest = s.push_blob("src/repo", b"shared layer").await;
    let resp = s
        .send(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={digest}&from=src/repo"),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        header(&resp, "location"),
        format!("/v2/dst/repo/blobs/{digest}")
    );
    assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
    assert_eq!(
        s.send(Method::HEAD, &format!("/v2/dst/repo/blobs/{digest}"))
            .await
            .status(),
        StatusCode::OK
    );

    // Unknown blob: falls back to an ordinary upload.
    let missing = Digest::of(b"nope");
    let resp = s
        .send(
            Method::POST,
            &format!("/v2/dst/repo/blobs/uploads/?mount={missing}&from=src/repo"),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert!(header(&resp, "location").starts_with("/v2/dst/repo/blobs/uploads/"));
}

/// Content-Range checks: a malformed header is answered 416 with where to resume, like an
/// out-of-order chunk, and the upload goes on; a range whose length contradicts
/// Content-Length is SIZE_INVALID and changes nothing.
#[tokio::test]
async fn content_range_malformed_or_contradicting() {
    let s = Server::start().await;
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    let location = header(&resp, "location").to_owned();
    let patch = |range: &'static str, body: &'static str| {
        s.req(Method::PATCH, &location)
            .header("content-range", range)
            .body(body)
    };
    assert_eq!(
        patch("0-4", "hello").send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    for bad in ["five-nine", "9-5", "5"] {
        let resp = patch(bad, "world").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(header(&resp, "range"), "0-4", "{bad}");
        assert_eq!(header(&resp, "location"), location, "{bad}");
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_INVALID");
    }
    // Ten bytes announced, five sent.
    let resp = patch("5-14", "world").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "SIZE_INVALID");
    let resp = s.send(Method::GET, &location).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&resp, "range"), "0-4");

    // The upload goes on from where the 416 said.
    assert_eq!(
        patch("5-9", "world").send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let digest = Digest::of(b"helloworld");
    let resp = s
        .req(Method::PUT, &format!("{location}?digest={digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(s.blob_files(), 1);
}

/// A closing PUT refused for any reason but a 416 ends the upload and leaves no bytes behind
/// (the spec has the client consider the upload failed).
#[tokio::test]
async fn refused_closing_put_discards_the_upload() {
    let s = Server::start().await;
    let uploads = s.state.blobs().root().join("uploads");
    for query in ["", "?digest=sha256:nothex", "?digest=md5:abc"] {
        let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
        let location = header(&resp, "location").to_owned();
        s.req(Method::PATCH, &location)
            .body("payload")
            .send()
            .await
            .unwrap();
        let resp = s
            .req(Method::PUT, &format!("{location}{query}"))
            .body("more")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{query:?}");
        assert_eq!(error_code(resp).await, "DIGEST_INVALID", "{query:?}");
        let resp = s.send(Method::GET, &location).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{query:?}");
        assert_eq!(error_code(resp).await, "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0, "{query:?}");
    }
    // A 416 on the closing PUT keeps the upload, so the client can resume.
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    let location = header(&resp, "location").to_owned();
    let digest = Digest::of(b"abc");
    let resp = s
        .req(Method::PUT, &format!("{location}?digest={digest}"))
        .header("content-range", "1-3")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let resp = s
        .req(Method::PUT, &format!("{location}?digest={digest}"))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(s.blob_files(), 1);
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);
}

/// Edges of the spec a client can hit: the empty blob, `n=0`, malformed references on pulls
/// and deletes, and mounts whose arguments are unusable (an ordinary upload instead).
#[tokio::test]
async fn spec_edges() {
    let s = Server::start().await;
    // The empty blob, pushed monolithically and read back.
    let empty = s.push_blob("a", b"").await;
    let resp = s.send(Method::HEAD, &format!("/v2/a/blobs/{empty}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-length"), "0");
    let resp = s.send(Method::GET, &format!("/v2/a/blobs/{empty}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.bytes().await.unwrap().is_empty());

    // n=0: an empty list and no Link, though tags exist.
    let config = s.push_blob("a", b"{}").await;
    let manifest = image_manifest(&config, 2, &[]);
    for tag in ["x", "y"] {
        let resp = s.put_manifest("a", tag, OCI_MANIFEST, &manifest).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
    let resp = s.send(Method::GET, "/v2/a/tags/list?n=0").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "link"), "");
    assert_eq!(resp.json::<Value>().await.unwrap()["tags"], json!([]));
    let resp = s.send(Method::GET, "/v2/_catalog?n=0").await;
    assert_eq!(header(&resp, "link"), "");
    assert_eq!(
        resp.json::<Value>().await.unwrap()["repositories"],
        json!([])
    );
    // `last` alone: everything after it.
    let resp = s.send(Method::GET, "/v2/a/tags/list?last=x").await;
    assert_eq!(resp.json::<Value>().await.unwrap()["tags"], json!(["y"]));

    // Malformed references: a bad digest is the client's error, a bad tag names nothing.
    for method in [Method::GET, Method::HEAD, Method::DELETE] {
        let resp = s
            .send(method.clone(), "/v2/a/manifests/sha256:nothex")
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{method}");
        let resp = s.send(method.clone(), "/v2/a/manifests/-bad").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let resp = s.send(Method::GET, "/v2/a/manifests/sha256:nothex").await;
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    let resp = s.send(Method::DELETE, "/v2/a/manifests/-bad").await;
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");

    // Mounts: without `from` a present blob mounts; unusable arguments start an upload.
    let resp = s
        .send(
            Method::POST,
            &format!("/v2/b/blobs/uploads/?mount={config}"),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    for query in [
        "mount=sha256:nothex&from=a".to_owned(),
        format!("mount={config}&from=Not..Valid"),
    ] {
        let resp = s
            .send(Method::POST, &format!("/v2/b/blobs/uploads/?{query}"))
            .await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "{query}");
        assert!(
            header(&resp, "location").starts_with("/v2/b/blobs/uploads/"),
            "{query}"
        );
    }
}

/// Writes an OCI layout with one single-file layer tagged `tag`; returns the layer digest.
/// The layer is gzipped so that skopeo pushes it as is (it would compress a plain tar).
fn write_oci_layout(dir: &Path, tag: &str) -> Digest {
    let mut builder = tar::Builder::new(Vec::new());
    let content = b"hello from rudder\n";
    let mut hdr = tar::Header::new_gnu();
    hdr.set_size(content.len() as u64);
    hdr.set_mode(0o644);
    hdr.set_mtime(0);
    hdr.set_cksum();
    builder
        .append_data(&mut hdr, "hello.txt", &content[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let diff_id = Digest::of(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = gz.finish().unwrap();
    let layer_d = Digest::of(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    }))
    .unwrap();
    let config_d = Digest::of(&config);
    let manifest = image_manifest_with(
        GZIP_LAYER_TYPE,
        &config_d,
        config.len(),
        &[(&layer_d, layer.len())],
    );
    let manifest_d = Digest::of(&manifest);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for (d, bytes) in [
        (&layer_d, &layer),
        (&config_d, &config),
        (&manifest_d, &manifest),
    ] {
        std::fs::write(blobs.join(d.hex()), bytes).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": manifest_d.to_string(),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    layer_d
}

async fn skopeo(args: &[&str]) {
    let out = tokio::process::Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn skopeo_round_trip() {
    if std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping skopeo_round_trip: skopeo is not installed");
        return;
    }
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    let layer_d = write_oci_layout(&src, "v1");
    let remote = format!("docker://127.0.0.1:{}/test/img:v1", s.port);

    let src_ref = format!("oci:{}:v1", src.display());
    skopeo(&["copy", "--dest-tls-verify=false", &src_ref, &remote]).await;
    // A second push finds every blob present and must still succeed.
    skopeo(&["copy", "--dest-tls-verify=false", &src_ref, &remote]).await;

    let resp = s.send(Method::GET, "/v2/test/img/tags/list").await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"name": "test/img", "tags": ["v1"]})
    );

    // The registry holds the layer under the same digest.
    let resp = s.send(Method::GET, "/v2/test/img/manifests/v1").await;
    assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
    let pushed: Value = resp.json().await.unwrap();
    assert_eq!(pushed["layers"][0]["digest"], layer_d.as_str());

    let dst_ref = format!("oci:{}:v1", dst.display());
    skopeo(&["copy", "--src-tls-verify=false", &remote, &dst_ref]).await;

    let index: Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    let manifest_d = Digest::parse(index["manifests"][0]["digest"].as_str().unwrap()).unwrap();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dst.join("blobs/sha256").join(manifest_d.hex())).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["layers"][0]["digest"], layer_d.as_str());
    let pulled = std::fs::read(dst.join("blobs/sha256").join(layer_d.hex())).unwrap();
    assert_eq!(Digest::of(&pulled), layer_d);
    assert_eq!(
        pulled,
        std::fs::read(src.join("blobs/sha256").join(layer_d.hex())).unwrap()
    );
}

/// Peers a test can change after the servers started (their ports are only known then).
#[derive(Default)]
struct SetPeers(Mutex<Vec<String>>);

impl SetPeers {
    fn set(&self, peers: &[&str]) {
        *self.0.lock().unwrap() = peers.iter().map(|p| (*p).to_owned()).collect();
    }
}

impl PeerRegistries for SetPeers {
    fn peers(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// A peer that answers every request carrying the local-only header with the same body,
/// after `delay`, and counts those requests; a request without the header gets a 400.
struct FakePeer {
    base: String,
    hits: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakePeer {
    async fn start(body: &[u8], delay: Duration) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let body = bytes::Bytes::copy_from_slice(body);
        let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let (body, counted) = (body.clone(), counted.clone());
            async move {
                if !headers.contains_key("rudder-local-only") {
                    return (StatusCode::BAD_REQUEST, bytes::Bytes::new());
                }
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                (StatusCode::OK, body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            base,
            hits,
            _stop: stop,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Two managers sharing a tag store; `b` reads through from `a` (peers settable on both).
struct Pair {
    a: Server,
    b: Server,
    a_peers: Arc<SetPeers>,
    b_peers: Arc<SetPeers>,
}

impl Pair {
    async fn start() -> Self {
        let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
        let a_peers = Arc::new(SetPeers::default());
        let b_peers = Arc::new(SetPeers::default());
        let a = Server::start_with(tags.clone(), Some(a_peers.clone())).await;
        let b = Server::start_with(tags, Some(b_peers.clone())).await;
        b_peers.set(&[&a.base]);
        Self {
            a,
            b,
            a_peers,
            b_peers,
        }
    }
}

/// An image pushed to a registry: its manifest and every blob, by digest.
struct Image {
    manifest: Digest,
    manifest_bytes: Vec<u8>,
    blobs: Vec<(Digest, Vec<u8>)>,
}

impl Server {
    /// Pushes a config and `layers` and tags a manifest over them `repo:tag`.
    async fn push_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>]) -> Image {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let config_d = self.push_blob(repo, &config).await;
        let mut blobs = vec![(config_d.clone(), config.clone())];
        for layer in layers {
            blobs.push((self.push_blob(repo, layer).await, layer.clone()));
        }
        let refs: Vec<(&Digest, usize)> = blobs[1..].iter().map(|(d, b)| (d, b.len())).collect();
        let manifest_bytes = image_manifest(&config_d, config.len(), &refs);
        let resp = self
            .put_manifest(repo, tag, OCI_MANIFEST, &manifest_bytes)
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        Image {
            manifest: Digest::of(&manifest_bytes),
            manifest_bytes,
            blobs,
        }
    }

    fn has_blob(&self, digest: &Digest) -> bool {
        self.state.blobs().blob_path(digest).exists()
    }

    fn uploads_dir_is_empty(&self) -> bool {
        std::fs::read_dir(self.state.blobs().root().join("uploads"))
            .unwrap()
            .next()
            .is_none()
    }

    /// GETs a blob and checks its bytes.
    async fn assert_serves_blob(&self, repo: &str, digest: &Digest, want: &[u8]) {
        let resp = self
            .send(Method::GET, &format!("/v2/{repo}/blobs/{digest}"))
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "{digest}");
        assert_eq!(header(&resp, "docker-content-digest"), digest.as_str());
        assert_eq!(resp.bytes().await.unwrap(), want, "{digest}");
    }
}

fn layer(seed: u32, len: u32) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 251) as u8).collect()
}

#[tokio::test]
async fn pull_from_a_peer_reads_every_blob_through() {
    let p = Pair::start().await;
    let repo = "team/app";
    // One layer bigger than a read chunk and the write buffer, to stream in several pieces.
    let image =
        p.a.push_image(repo, "v1", &[layer(1, 3 << 20), layer(2, 1000)])
            .await;
    assert_eq!(p.b.blob_files(), 0);

    // The manifest: its record is shared, its bytes come from A.
    let resp =
        p.b.send(Method::GET, &format!("/v2/{repo}/manifests/v1"))
            .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), OCI_MANIFEST);
    assert_eq!(
        header(&resp, "docker-content-digest"),
        image.manifest.as_str()
    );
    assert_eq!(resp.bytes().await.unwrap(), image.manifest_bytes);
    assert!(p.b.has_blob(&image.manifest));

    // HEAD reads through too, and answers with the real size.
    let (first, first_bytes) = &image.blobs[1];
    let resp =
        p.b.send(Method::HEAD, &format!("/v2/{repo}/blobs/{first}"))
            .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-length"),
        first_bytes.len().to_string()
    );
    assert!(p.b.has_blob(first));

    for (digest, bytes) in &image.blobs {
        p.b.assert_serves_blob(repo, digest, bytes).await;
    }
    assert_eq!(p.b.blob_files(), 1 + image.blobs.len());
    for (digest, bytes) in &image.blobs {
        assert_eq!(
            &std::fs::read(p.b.state.blobs().blob_path(digest)).unwrap(),
            bytes
        );
    }
    assert!(p.b.uploads_dir_is_empty());

    // B now serves the image on its own.
    p.b_peers.set(&[]);
    drop(p.a);
    let resp =
        p.b.send(Method::GET, &format!("/v2/{repo}/manifests/v1"))
            .await;
    assert_eq!(resp.bytes().await.unwrap(), image.manifest_bytes);
    for (digest, bytes) in &image.blobs {
        p.b.assert_serves_blob(repo, digest, bytes).await;
    }
}

#[tokio::test]
async fn corrupt_or_dead_peers_are_skipped() {
    let p = Pair::start().await;
    let data = layer(3, 4096);
    let digest = p.a.push_blob("x/y", &data).await;
    let liar = FakePeer::start(b"not what you asked for", Duration::ZERO).await;
    // Port 1 on loopback refuses connections: a dead manager.
    let dead = "http://127.0.0.1:1";
    p.b_peers.set(&[dead, &liar.base, &p.a.base]);

    p.b.assert_serves_blob("x/y", &digest, &data).await;
    assert_eq!(liar.hits(), 1);
    assert_eq!(p.b.blob_files(), 1);
    assert!(p.b.has_blob(&digest));
    assert!(p.b.uploads_dir_is_empty());

    // Only the liar: refused, nothing stored, the spec's 404.
    p.b_peers.set(&[dead, &liar.base]);
    let other = Digest::of(b"some other layer");
    for method in [Method::HEAD, Method::GET] {
        let resp =
            p.b.send(method.clone(), &format!("/v2/x/y/blobs/{other}"))
                .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
        if method == Method::GET {
            assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
        }
    }
    assert_eq!(liar.hits(), 3);
    assert_eq!(p.b.blob_files(), 1);
    assert!(!p.b.has_blob(&Digest::of(b"not what you asked for")));
    assert!(p.b.uploads_dir_is_empty());
}

#[tokio::test]
async fn concurrent_misses_download_once() {
    let data = layer(4, 100_000);
    let digest = Digest::of(&data);
    let slow = FakePeer::start(&data, Duration::from_millis(300)).await;
    let peers = Arc::new(SetPeers::default());
    peers.set(&[&slow.base]);
    let b = Arc::new(Server::start_with(Arc::new(MemTagStore::new()), Some(peers)).await);
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let (b, digest, data) = (b.clone(), digest.clone(), data.clone());
            tokio::spawn(async move { b.assert_serves_blob("r", &digest, &data).await })
        })
        .collect();
    for pull in pulls {
        pull.await.unwrap();
    }
    assert_eq!(slow.hits(), 1);
    assert!(b.has_blob(&digest));
}

#[tokio::test]
async fn blob_missing_everywhere_is_blob_unknown() {
    let p = Pair::start().await;
    // Each asks the other: a request from a peer must not be read through again.
    p.a_peers.set(&[&p.b.base]);
    let missing = Digest::of(b"nobody has this");
    for s in [&p.a, &p.b] {
        let path = format!("/v2/r/blobs/{missing}");
        let get = s.send(Method::GET, &path);
        let resp = tokio::time::timeout(Duration::from_secs(5), get)
            .await
            .expect("read-through loops between peers");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    }

    // A peer's read-through request is answered from local disk alone.
    let on_a = p.a.state.blobs().put_bytes(b"only on a").await.unwrap();
    let resp =
        p.b.req(Method::GET, &format!("/v2/r/blobs/{on_a}"))
            .header("rudder-local-only", "1")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(!p.b.has_blob(&on_a));

    // A manifest record whose bytes no manager holds (`a` alone takes the push, as a lone
    // manager would: with `b` as its peer the upload would reach `b` too).
    p.a_peers.set(&[]);
    let image = p.a.push_image("r", "v1", &[layer(5, 10)]).await;
    p.a.state.blobs().delete(&image.manifest).await.unwrap();
    let resp = p.b.send(Method::GET, "/v2/r/manifests/v1").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
    assert_eq!(p.b.blob_files(), 0);
}

#[tokio::test]
async fn replicate_manifest_copies_an_image_and_its_index() {
    let p = Pair::start().await;
    let repo = "team/svc";
    let image =
        p.a.push_image(repo, "v1", &[layer(6, 70_000), layer(7, 5)])
            .await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest.to_string(),
            "size": image.manifest_bytes.len(),
        }],
    }))
    .unwrap();
    let index_d = Digest::of(&index);
    let resp = p.a.put_manifest(repo, "multi", OCI_INDEX, &index).await;
    assert_eq!(resp.status(), StatusCode::CREATED);

    let fetched = replicate_manifest(&p.b.state, repo, index_d.as_str())
        .await
        .unwrap();
    assert_eq!(fetched, 2 + image.blobs.len());
    assert!(p.b.has_blob(&index_d) && p.b.has_blob(&image.manifest));
    for (digest, bytes) in &image.blobs {
        assert_eq!(
            &std::fs::read(p.b.state.blobs().blob_path(digest)).unwrap(),
            bytes
        );
    }
    // Idempotent.
    let again = replicate_manifest(&p.b.state, repo, index_d.as_str()).await;
    assert_eq!(again.unwrap(), 0);

    // B serves it all with A gone.
    p.b_peers.set(&[]);
    drop(p.a);
    for (reference, want) in [("multi", &index), ("v1", &image.manifest_bytes)] {
        let resp =
            p.b.send(Method::GET, &format!("/v2/{repo}/manifests/{reference}"))
                .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&resp.bytes().await.unwrap(), want);
    }
    for (digest, bytes) in &image.blobs {
        p.b.assert_serves_blob(repo, digest, bytes).await;
    }
}

#[tokio::test]
async fn replicate_manifest_reports_what_no_peer_holds() {
    let p = Pair::start().await;
    let image = p.a.push_image("r", "v1", &[layer(8, 10)]).await;
    let (lost, _) = &image.blobs[1];
    p.a.state.blobs().delete(lost).await.unwrap();
    let err = replicate_manifest(&p.b.state, "r", image.manifest.as_str())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::BlobUnknown(d) if d == lost.as_str()),
        "{err}"
    );
    // What could be fetched stays; the lost layer is not invented.
    assert!(p.b.has_blob(&image.manifest));
    assert!(!p.b.has_blob(lost));

    let err = replicate_manifest(&p.b.state, "r", "sha256:nothex").await;
    assert!(
        matches!(err, Err(RegistryError::DigestInvalid(_))),
        "{err:?}"
    );
    let err = replicate_manifest(&p.b.state, "Bad..Name", image.manifest.as_str()).await;
    assert!(matches!(err, Err(RegistryError::NameInvalid(_))), "{err:?}");
}

/// Ports on loopback nothing listens on: managers that are down.
const DEAD: [&str; 3] = [
    "http://127.0.0.1:1",
    "http://127.0.0.1:2",
    "http://127.0.0.1:3",
];

/// Uploads `data` to `s` chunked (POST, PATCH, closing PUT); the closing PUT's response.
async fn chunked_push(s: &Server, repo: &str, data: &[u8]) -> Response {
    let resp = s
        .send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = header(&resp, "location").to_owned();
    let resp = s
        .req(Method::PATCH, &location)
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let digest = Digest::of(data);
    s.req(Method::PUT, &format!("{location}?digest={digest}"))
        .send()
        .await
        .unwrap()
}

/// A blob upload is acknowledged once a majority of the managers, the receiving one counted,
/// hold the blob: here `a` and `b` of three (the third is down). `b` takes `a`'s push without
/// seeking a quorum of its own: its own peers are all down, so it could not reach one.
#[tokio::test]
async fn upload_is_acknowledged_once_a_majority_holds_the_blob() {
    let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
    let b_peers = StaticPeers(vec![DEAD[0].to_owned(), DEAD[1].to_owned()]);
    let b = Server::start_with(tags.clone(), Some(Arc::new(b_peers))).await;
    let a_peers = StaticPeers(vec![DEAD[0].to_owned(), b.base.clone()]);
    let a = Server::start_with(tags, Some(Arc::new(a_peers))).await;

    // Monolithic, bigger than one read chunk.
    let big = layer(8, 3 << 20);
    let digest = a.push_blob("q/r", &big).await;
    assert!(b.has_blob(&digest), "acknowledged before a peer held it");
    b.assert_serves_blob("q/r", &digest, &big).await;

    // Chunked.
    let small = layer(9, 1000);
    let resp = chunked_push(&a, "q/r", &small).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(b.has_blob(&Digest::of(&small)));

    // A blob the peer already holds: acknowledged without sending it again.
    assert_eq!(
        a.push_blob("q/r", &big).await,
        digest,
        "second push of the same blob"
    );
    assert!(a.uploads_dir_is_empty() && b.uploads_dir_is_empty());
}

/// A manifest's bytes, like any blob's, are on a majority of the managers before its tag is
/// recorded; without a majority the PUT is refused and no tag moves.
#[tokio::test]
async fn manifest_is_recorded_once_a_majority_holds_it() {
    let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
    let dead_two = || StaticPeers(vec![DEAD[0].to_owned(), DEAD[1].to_owned()]);
    let b = Server::start_with(tags.clone(), Some(Arc::new(dead_two()))).await;
    let a_peers = StaticPeers(vec![DEAD[0].to_owned(), b.base.clone()]);
    let a = Server::start_with(tags.clone(), Some(Arc::new(a_peers))).await;
    let image = a.push_image("m/q", "v1", &[layer(12, 100)]).await;
    assert!(
        b.has_blob(&image.manifest),
        "tagged before a peer held the manifest"
    );

    let lonely = Server::start_with(tags, Some(Arc::new(dead_two()))).await;
    for (_, bytes) in &image.blobs {
        lonely.state.blobs().put_bytes(bytes).await.unwrap();
    }
    let resp = lonely
        .put_manifest("m/q", "v2", OCI_MANIFEST, &image.manifest_bytes)
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resp = a.send(Method::GET, "/v2/m/q/manifests/v2").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "the tag moved");
}

/// No majority reachable: the upload is refused with a 503 naming how many managers hold the
/// blob, and the blob this upload brought is removed again (nothing stored, no upload file),
/// so that a retrying client uploads it anew. A single manager acknowledges at once.
#[tokio::test]
async fn upload_without_a_majority_is_refused_and_stores_nothing() {
    let tags: Arc<dyn TagStore> = Arc::new(MemTagStore::new());
    // Two of three down.
    let peers = StaticPeers(vec![DEAD[0].to_owned(), DEAD[1].to_owned()]);
    let a = Server::start_with(tags.clone(), Some(Arc::new(peers))).await;
    let data = layer(10, 5000);
    let digest = Digest::of(&data);
    let resp = a
        .req(
            Method::POST,
            &format!("/v2/q/blobs/uploads/?digest={digest}"),
        )
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = error_body(resp).await;
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("held by 1 of 3 managers but 2 must"),
        "{message}"
    );
    assert!(!a.has_blob(&digest));
    let resp = chunked_push(&a, "q", &data).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!a.has_blob(&digest));
    assert_eq!(a.blob_files(), 0);
    assert!(a.uploads_dir_is_empty());

    // Of five managers, `a` and `b` are not a majority: refused, though `b` got its copy.
    let b = Server::start_with(tags.clone(), Some(Arc::new(StaticPeers::default()))).await;
    let mut five: Vec<String> = DEAD.iter().map(|d| (*d).to_owned()).collect();
    five.push(b.base.clone());
    let a5 = Server::start_with(tags.clone(), Some(Arc::new(StaticPeers(five)))).await;
    let resp = chunked_push(&a5, "q", &data).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!a5.has_blob(&digest));

    // A blob that was here before the failed upload stays.
    let kept = layer(11, 100);
    let kept_d = Digest::of(&kept);
    a.state.blobs().put_bytes(&kept).await.unwrap();
    let resp = chunked_push(&a, "q", &kept).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.has_blob(&kept_d));

    // One manager alone: its own copy is the majority.
    let alone = Server::start_with(tags, Some(Arc::new(StaticPeers::default()))).await;
    assert_eq!(alone.push_blob("q", &data).await, digest);
    assert_eq!(
        chunked_push(&alone, "q", &kept).await.status(),
        StatusCode::CREATED
    );
}

/// A peer that accepts connections and never answers holds an upload only until the quorum
/// deadline: then a 503, and nothing stored.
#[tokio::test]
async fn upload_waits_no_longer_than_the_quorum_deadline() {
    // Connections complete in the kernel's backlog; nothing ever reads them.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = format!("http://{}", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let state = RegistryState::new(blobs, Arc::new(MemTagStore::new()))
        .with_peers(Arc::new(StaticPeers(vec![silent, DEAD[0].to_owned()])))
        .unwrap()
        .with_quorum_grace(Duration::from_millis(300));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = state.clone();
    tokio::spawn(async move { serve(listener, served, std::future::pending()).await });

    let data = layer(12, 2000);
    let digest = Digest::of(&data);
    let started = std::time::Instant::now();
    let resp = Client::new()
        .post(format!("{base}/v2/q/blobs/uploads/?digest={digest}"))
        .body(data)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = error_body(resp).await;
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("held by 1 of 3 managers"), "{message}");
    // The silent peer's push and the quorum wait share one deadline: whichever notices
    // first words it (the peer "did not answer within", or "no majority within").
    assert!(
        message.contains("did not answer within") || message.contains("no majority within"),
        "{message}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(!state.blobs().blob_path(&digest).exists());
}

fn limited(limits: blob::UploadLimits) -> impl std::future::Future<Output = Server> {
    Server::start_limited(Arc::new(MemTagStore::new()), None, limits)
}

/// One blob is at most `max_blob_bytes`: a declared length over it is refused before its
/// bytes are read, a streamed body as soon as it crosses it; nothing is left behind.
#[tokio::test]
async fn a_blob_over_the_size_limit_is_refused() {
    let s = limited(blob::UploadLimits {
        max_blob_bytes: 1000,
        ..Default::default()
    })
    .await;
    let data = vec![7u8; 2000];
    let resp = s
        .req(
            Method::POST,
            &format!("/v2/a/blobs/uploads/?digest={}", Digest::of(&data)),
        )
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = error_body(resp).await;
    assert!(body.to_string().contains("limited to 1000 bytes"), "{body}");
    assert_eq!(s.blob_files(), 0);
    let uploads = s.state.blobs().root().join("uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0);

    // Chunks: 600 bytes fit, 600 more do not, with or without a declared length; the upload
    // stays at its last good size.
    let blobs = s.state.blobs();
    let id = blobs.start_upload("a").await.unwrap();
    let chunk = || futures::stream::iter(vec![Ok::<_, String>(bytes::Bytes::from(vec![1u8; 600]))]);
    assert_eq!(
        blobs
            .append("a", &id, None, Some(600), "", chunk())
            .await
            .unwrap(),
        600
    );
    for len in [Some(600), None] {
        let err = blobs
            .append("a", &id, None, len, "", chunk())
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::TooLarge(_)), "{err}");
        assert_eq!(blobs.upload_size("a", &id).await.unwrap(), 600);
    }
}

/// At most `max_open_uploads` uploads are open at once; finishing or cancelling one frees
/// its place.
#[tokio::test]
async fn open_uploads_are_capped() {
    let s = limited(blob::UploadLimits {
        max_open_uploads: 2,
        ..Default::default()
    })
    .await;
    let mut locations = Vec::new();
    for _ in 0..2 {
        let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        locations.push(header(&resp, "location").to_owned());
    }
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = error_body(resp).await;
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    assert!(body.to_string().contains("limit is 2"), "{body}");
    let resp = s.send(Method::DELETE, &locations[0]).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

/// Writes that would leave the disk below the free-space floor are refused (507).
#[tokio::test]
async fn writes_below_the_free_space_floor_are_refused() {
    let s = limited(blob::UploadLimits {
        min_free_bytes: u64::MAX,
        ..Default::default()
    })
    .await;
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    assert_eq!(resp.status(), StatusCode::INSUFFICIENT_STORAGE);
    let body = error_body(resp).await;
    assert!(body.to_string().contains("not enough disk space"), "{body}");
    let err = s.state.blobs().put_bytes(b"{}").await.unwrap_err();
    assert!(matches!(err, RegistryError::DiskFull(_)), "{err}");
    assert_eq!(s.blob_files(), 0);
}

/// Stale uploads are purged on a timer, with no caller asking.
#[tokio::test]
async fn stale_uploads_are_purged_on_a_timer() {
    let s = limited(blob::UploadLimits {
        stale_after: Duration::from_millis(200),
        purge_every: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let resp = s.send(Method::POST, "/v2/a/blobs/uploads/").await;
    let location = header(&resp, "location").to_owned();
    let uploads = s.state.blobs().root().join("uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&uploads).unwrap().count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upload never purged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = s.send(Method::GET, &location).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
