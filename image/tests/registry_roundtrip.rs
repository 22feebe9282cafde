//! Round trips through the public API against a small in-test registry: import, load (docker-save
//! and OCI archives), pull into a store, and registry errors. The fake registry verifies upload
//! digests and counts blob downloads, so "only missing layers travel" is checked, not assumed.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rudder_image::{
    import_rootfs, load_archive, ImageError, ImageStore, Reference, RegistryClient,
};
use sha2::{Digest, Sha256};

#[derive(Default)]
struct Registry {
    blobs: HashMap<String, Vec<u8>>,
    /// (repo, tag or digest) → (media type, bytes)
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    uploads: u64,
    blob_gets: u64,
    manifest_gets: u64,
}

type Shared = Arc<Mutex<Registry>>;

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn error(status: StatusCode, code: &str) -> Response {
    let body = format!(
        r#"{{"errors":[{{"code":"{code}","message":"{}"}}]}}"#,
        code.to_lowercase().replace('_', " ")
    );
    (status, [("content-type", "application/json")], body).into_response()
}

async fn handle(
    State(reg): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().strip_prefix("/v2/").unwrap_or("").to_string();
    let query = uri.query().unwrap_or("");
    let mut reg = reg.lock().unwrap();
    if let Some((repo, rest)) = path.split_once("/blobs/uploads/") {
        if method == Method::POST {
            reg.uploads += 1;
            let id = reg.uploads;
            // Alternate absolute and relative locations, both with a query of their own.
            let location = if id % 2 == 0 {
                let host = headers["host"].to_str().unwrap();
                format!("http://{host}/v2/{repo}/blobs/uploads/{id}?_state=s{id}")
            } else {
                format!("/v2/{repo}/blobs/uploads/{id}?_state=s{id}")
            };
            return (StatusCode::ACCEPTED, [("location", location)]).into_response();
        }
        if method == Method::PUT && !rest.is_empty() {
            assert!(query.contains("_state="), "upload state kept: {query}");
            let digest = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("digest="))
                .unwrap()
                .replace("%3A", ":");
            if sha(&body) != digest {
                return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
            }
            reg.blobs.insert(digest, body.to_vec());
            return StatusCode::CREATED.into_response();
        }
    }
    if let Some((_repo, digest)) = path.split_once("/blobs/") {
        return match (reg.blobs.get(digest).cloned(), method) {
            (Some(_), Method::HEAD) => StatusCode::OK.into_response(),
            (Some(b), Method::GET) => {
                reg.blob_gets += 1;
                b.into_response()
            }
            _ => error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        };
    }
    if let Some((repo, reference)) = path.split_once("/manifests/") {
        let key = (repo.to_string(), reference.to_string());
        if method == Method::PUT {
            let media_type = headers["content-type"].to_str().unwrap().to_string();
            let digest = sha(&body);
            reg.manifests
                .insert(key, (media_type.clone(), body.to_vec()));
            reg.manifests
                .insert((repo.to_string(), digest), (media_type, body.to_vec()));
            return StatusCode::CREATED.into_response();
        }
        reg.manifest_gets += 1;
        return match reg.manifests.get(&key) {
            Some((mt, bytes)) => ([("content-type", mt.clone())], bytes.clone()).into_response(),
            None => error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        };
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn start_registry() -> (RegistryClient, Shared) {
    let reg: Shared = Arc::default();
    let app = axum::Router::new().fallback(handle).with_state(reg.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (RegistryClient::new(&addr.to_string()).unwrap(), reg)
}

/// A busybox root filesystem: bin/busybox (the host's static busybox) and bin/sh -> busybox.
fn busybox_rootfs(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("rootfs.tar");
    let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "bin", std::io::empty()).unwrap();
    let busybox = fs::read("/bin/busybox").unwrap_or_else(|_| b"#!/bin/sh\n".to_vec());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", &busybox[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "bin/sh", "busybox").unwrap();
    b.into_inner().unwrap();
    path
}

#[tokio::test]
async fn import_then_pull_fetches_only_what_is_missing() {
    let (client, reg) = start_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let reference = Reference::parse("lib/busybox:1.0").unwrap();

    let report = import_rootfs(&client, &rootfs, &reference).await.unwrap();
    assert_eq!(report.reference, "lib/busybox:1.0");
    assert_eq!(report.blobs_uploaded, 2);
    assert!(report.bytes_uploaded > 0);
    let again = import_rootfs(&client, &rootfs, &reference).await.unwrap();
    assert_eq!(
        again.manifest_digest, report.manifest_digest,
        "imports are deterministic"
    );
    assert_eq!((again.blobs_uploaded, again.blobs_skipped), (0, 2));

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let pulled = store.pull(&client, &reference).await.unwrap();
    assert_eq!(pulled.manifest_digest, report.manifest_digest);
    assert_eq!(pulled.layers.len(), 1);
    assert!(pulled.bytes_fetched > 0);
    let layer = &pulled.layers[0];
    let busybox = fs::metadata(layer.join("bin/busybox")).unwrap();
    assert_eq!(busybox.mode() & 0o777, 0o755);
    assert_eq!(
        fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        pulled.config.env,
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    let gets = reg.lock().unwrap().blob_gets;
    assert_eq!(gets, 2, "config and layer");

    // Everything is local now: nothing travels, same layer directory.
    let again = store.pull(&client, &reference).await.unwrap();
    assert_eq!(again.bytes_fetched, 0);
    assert_eq!(again.layers, pulled.layers);
    assert_eq!(reg.lock().unwrap().blob_gets, 2);
    // Pinning by digest resolves to the same image, without asking the registry: content
    // by digest never changes (a tag is asked every time: it moves).
    let asked = reg.lock().unwrap().manifest_gets;
    assert_eq!(asked, 2, "one manifest request per pull by tag");
    let pinned = Reference::parse(&format!("lib/busybox@{}", report.manifest_digest)).unwrap();
    assert_eq!(
        store.pull(&client, &pinned).await.unwrap().layers,
        pulled.layers
    );
    assert_eq!(
        reg.lock().unwrap().manifest_gets,
        asked,
        "pinned: read locally"
    );
    // A damaged local manifest is not trusted: it is fetched again and repaired.
    let hex = report.manifest_digest.strip_prefix("sha256:").unwrap();
    fs::write(store.root().join("blobs/sha256").join(hex), b"{}").unwrap();
    assert_eq!(
        store.pull(&client, &pinned).await.unwrap().layers,
        pulled.layers
    );
    assert_eq!(reg.lock().unwrap().manifest_gets, asked + 1);
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn concurrent_pulls_share_one_unpack() {
    let (client, _reg) = start_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let reference = Reference::parse("hello").unwrap();
    import_rootfs(&client, &rootfs, &reference).await.unwrap();

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let pulls = (0..4).map(|_| {
        let (store, client, reference) = (store.clone(), client.clone(), reference.clone());
        tokio::spawn(async move { store.pull(&client, &reference).await })
    });
    let mut layers = Vec::new();
    for pull in pulls {
        layers.push(pull.await.unwrap().unwrap().layers);
    }
    assert!(layers.windows(2).all(|w| w[0] == w[1]));
    assert!(layers[0][0].join("bin/busybox").is_file());
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[tokio::test]
async fn registry_errors_name_what_was_asked() {
    let (client, _reg) = start_registry().await;
    let err = client.get_manifest("hello", "nope").await.unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(
        err.to_string(),
        format!(
            "image: manifest unknown: hello:nope (registry {})",
            client.base()
        )
    );
    let store_dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(store_dir.path()).unwrap();
    let err = store
        .pull(&client, &Reference::parse("missing:v1").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Registry { status: 404, .. }),
        "{err}"
    );

    let unreachable = RegistryClient::new("127.0.0.1:1").unwrap();
    let err = unreachable
        .blob_exists("hello", &sha(b""))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("image: registry http://127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test]
async fn load_docker_save_then_pull() {
    let (client, _reg) = start_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    // A docker-save tarball with one plain-tar layer, made from the busybox rootfs.
    let layer = fs::read(busybox_rootfs(tmp.path())).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh"],"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha(&layer)
    );
    let config_name = format!("{}.json", &sha(config.as_bytes())[7..]);
    let manifest = format!(
        r#"[{{"Config":"{config_name}","RepoTags":["docker.io/library/busybox:latest"],"Layers":["abc/layer.tar"]}},
            {{"Config":"{config_name}","RepoTags":null,"Layers":["abc/layer.tar"]}}]"#
    );
    let archive = tmp.path().join("save.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (name, data) in [
        ("manifest.json", manifest.as_bytes()),
        (config_name.as_str(), config.as_bytes()),
        ("abc/layer.tar", &layer[..]),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap();

    let err = load_archive(&client, &archive, None).await.unwrap_err();
    assert!(err.to_string().contains("carry no name"), "{err}");

    let default = Reference::parse("untagged:v1").unwrap();
    let loaded = load_archive(&client, &archive, Some(&default))
        .await
        .unwrap();
    let names: Vec<&str> = loaded.iter().map(|l| l.reference.as_str()).collect();
    assert_eq!(names, ["busybox:latest", "untagged:v1"]);
    assert_eq!(loaded[0].blobs_uploaded, 2);

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let pulled = store
        .pull(&client, &Reference::parse("busybox").unwrap())
        .await
        .unwrap();
    assert_eq!(pulled.manifest_digest, loaded[0].manifest_digest);
    assert_eq!(pulled.config.cmd, ["/bin/sh"]);
    assert!(pulled.layers[0].join("bin/busybox").is_file());
    // The second image shares the layer: pulling it unpacks nothing new.
    let other = store.pull(&client, &default).await.unwrap();
    assert_eq!(other.layers, pulled.layers);
    assert_eq!(other.bytes_fetched, 0);
}

#[tokio::test]
async fn load_oci_archive_with_nested_index_then_pull() {
    let (client, _reg) = start_registry().await;
    let tmp = tempfile::tempdir().unwrap();
    let layer = fs::read(busybox_rootfs(tmp.path())).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha(&layer)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        sha(config.as_bytes()),
        config.len(),
        sha(&layer),
        layer.len()
    );
    let index = |child: &str, size: usize, platform: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.{}","digest":"{child}","size":{size}{platform}}}]}}"#,
            if platform.is_empty() {
                "index.v1+json"
            } else {
                "manifest.v1+json"
            }
        )
    };
    let inner = index(
        &sha(manifest.as_bytes()),
        manifest.len(),
        r#","platform":{"architecture":"amd64","os":"linux"}"#,
    );
    let outer = index(&sha(inner.as_bytes()), inner.len(), "");
    let top = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"nested:1"}}}}]}}"#,
        sha(outer.as_bytes()),
        outer.len()
    );

    let archive = tmp.path().join("oci.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    let mut members: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), top.into_bytes()),
    ];
    for blob in [
        config.into_bytes(),
        manifest.into_bytes(),
        inner.into_bytes(),
        outer.clone().into_bytes(),
        layer,
    ] {
        members.push((format!("blobs/sha256/{}", &sha(&blob)[7..]), blob));
    }
    for (name, data) in &members {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap();

    let loaded = load_archive(&client, &archive, None).await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].reference, "nested:1");
    assert_eq!(loaded[0].manifest_digest, sha(outer.as_bytes()));

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let pulled = store
        .pull(&client, &Reference::parse("nested:1").unwrap())
        .await
        .unwrap();
    assert_eq!(pulled.config.entrypoint, ["/bin/sh"]);
    assert!(pulled.layers[0].join("bin/busybox").is_file());
}
