//! Registry benchmarks (issue 7): `cargo bench -p rudder-controller --bench registry`.
//!
//! The controller's registry (`registry::serve`, plain HTTP, or `serve_tls` with mutual TLS and
//! certificates from a cluster CA, as a cluster runs it) on 127.0.0.1, driven by Rudder's own
//! client (`rudder_image::RegistryClient`, the one `rctl` and the agents use), in one process:
//!
//! 1. Push and pull throughput, plain and with mutual TLS, of one 100 MB layer (random bytes, so no compression helps):
//!    push = HEAD + POST + one streamed PUT with the digest checked by the registry as it
//!    arrives; pull = GET streamed to a file, hashed on the way.
//! 2. Layer sharing: image A (two base layers) is pulled into an empty host content store, then
//!    image B = A + one new layer. The second pull moves only the new layer's bytes.
//!
//! 3. An anchor: the same client against Debian's `docker-registry` (the reference
//!    distribution registry) on 127.0.0.1, when it is installed.
//!
//! Environment: `REGISTRY_BENCH_MB` (layer size, default 100), `REGISTRY_BENCH_ROUNDS`
//! (default 5).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rudder_controller::ca::{node_csr, ClusterCa, Role};
use rudder_controller::registry::{self, BlobStore, MemTagStore, RegistryState, RegistryTls};
use rudder_controller::tls::NodeCerts;
use rudder_image::oci::{Descriptor, Manifest, OCI_CONFIG, OCI_LAYER_TAR_GZIP, OCI_MANIFEST};
use rudder_image::{digest, ImageStore, Reference, RegistryClient};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    // xorshift: fast, and incompressible enough for a registry that does not compress.
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A gzip layer whose tar holds one file of `len` random bytes.
fn layer(name: &str, len: usize, seed: u64) -> (Vec<u8>, String) {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(len as u64);
    b.append_data(&mut h, name, &random(len, seed)[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let diff_id = digest::of_bytes(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

async fn push_image(client: &RegistryClient, repo: &str, layers: &[(Vec<u8>, String)]) {
    let mut descs = Vec::new();
    for (blob, _) in layers {
        let d = digest::of_bytes(blob);
        client.push_blob(repo, &d, blob.clone()).await.unwrap();
        descs.push(Descriptor::new(OCI_LAYER_TAR_GZIP, d, blob.len() as u64));
    }
    let diff_ids: Vec<&str> = layers.iter().map(|(_, d)| d.as_str()).collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": rudder_image::oci::host_architecture(), "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = digest::of_bytes(&config);
    client.push_blob(repo, &cd, config.clone()).await.unwrap();
    let manifest = Manifest::oci(Descriptor::new(OCI_CONFIG, cd, config.len() as u64), descs);
    client
        .push_manifest(repo, "latest", OCI_MANIFEST, manifest.to_bytes())
        .await
        .unwrap();
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

async fn plain_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let state = RegistryState::new(
        BlobStore::open(dir.path().join("blobs")).unwrap(),
        Arc::new(MemTagStore::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registry::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        _dir: dir,
    }
}

/// The registry as a cluster serves it: mutual TLS, a manager certificate; and an admin
/// client, as `rctl` is.
async fn tls_server() -> (Server, RegistryClient) {
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let ca = ClusterCa::generate("bench", now).unwrap();
    let certs = |role: Role, id: &str| {
        let (key, csr) = node_csr(id).unwrap();
        let cert = ca.issue(&csr, role, id, now, day).unwrap();
        NodeCerts::new(ca.cert_pem(), &cert, &key, None).unwrap()
    };
    let server = certs(Role::Manager, "c1");
    let admin = certs(Role::Admin, "admin");
    let tls = RegistryTls::new(&server).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = RegistryState::new(
        BlobStore::open(dir.path().join("blobs")).unwrap(),
        Arc::new(MemTagStore::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(registry::serve_tls(listener, state, tls, async move {
        let _ = rx.await;
    }));
    let client = RegistryClient::with_tls(
        &addr.to_string(),
        &rudder_image::ClientTls {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: admin.cert_pem().to_string(),
            key_pem: admin.key_pem().to_string(),
            server_name: Role::Manager.server_name().to_string(),
        },
    )
    .unwrap();
    (
        Server {
            addr,
            stop: Some(tx),
            _dir: dir,
        },
        client,
    )
}

/// Debian's `docker-registry` (the reference distribution registry) on 127.0.0.1, no auth, for
/// an anchor: the same client against the registry most others are measured by. `None` when it
/// is not installed. Killed (that pid) when the guard drops.
struct RefRegistry {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for RefRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reference_registry() -> Option<RefRegistry> {
    let dir = tempfile::tempdir().ok()?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?;
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n  secret: bench\n",
            dir.path().join("data").display()
        ),
    )
    .ok()?;
    let child = std::process::Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let r = RefRegistry {
        child,
        addr,
        _dir: dir,
    };
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed().as_secs() > 10 {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(r)
}

async fn throughput(label: &str, client: &RegistryClient, mb: usize, rounds: usize) {
    let blob = random(mb * 1_000_000, 7);
    let (mut push, mut pull) = (Vec::new(), Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..rounds {
        // A new digest per round, so every push uploads.
        let mut b = blob.clone();
        b[0] = round as u8;
        let d = digest::of_bytes(&b);
        let t = Instant::now();
        assert!(client.push_blob("bench/big", &d, b).await.unwrap());
        push.push(mb as f64 / t.elapsed().as_secs_f64());
        let dest = tmp.path().join(format!("blob-{round}"));
        let t = Instant::now();
        let got = client
            .get_blob_to_file("bench/big", &d, &dest)
            .await
            .unwrap();
        pull.push(mb as f64 / t.elapsed().as_secs_f64());
        assert_eq!(got as usize, mb * 1_000_000);
        std::fs::remove_file(&dest).unwrap();
    }
    println!(
        "{label}: {mb} MB layer, {rounds} rounds: push median {:.0} MB/s (min {:.0}, max {:.0}); pull median {:.0} MB/s (min {:.0}, max {:.0})",
        median(push.clone()),
        push.iter().cloned().fold(f64::MAX, f64::min),
        push.iter().cloned().fold(0.0, f64::max),
        median(pull.clone()),
        pull.iter().cloned().fold(f64::MAX, f64::min),
        pull.iter().cloned().fold(0.0, f64::max),
    );
}

async fn sharing(client: &RegistryClient) {
    let base1 = layer("base/one", 8_000_000, 1);
    let base2 = layer("base/two", 4_000_000, 2);
    let top = layer("app/new", 2_000_000, 3);
    push_image(client, "bench/base", &[base1.clone(), base2.clone()]).await;
    push_image(client, "bench/app", &[base1, base2, top.clone()]).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let a = store
        .pull(client, &Reference::parse("bench/base:latest").unwrap())
        .await
        .unwrap();
    let b = store
        .pull(client, &Reference::parse("bench/app:latest").unwrap())
        .await
        .unwrap();
    println!(
        "layer sharing: pull of the base image moved {} bytes; then the image with one new layer \
         ({} bytes compressed) moved {} bytes (config {} bytes + new layer)",
        a.bytes_fetched,
        top.0.len(),
        b.bytes_fetched,
        b.bytes_fetched.saturating_sub(top.0.len() as u64)
    );
    assert!(b.bytes_fetched < top.0.len() as u64 + 10_000);
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mb = env("REGISTRY_BENCH_MB", 100);
    let rounds = env("REGISTRY_BENCH_ROUNDS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut server = plain_server().await;
        let client = RegistryClient::new(&server.addr.to_string()).unwrap();
        throughput("plain HTTP over loopback", &client, mb, rounds).await;
        sharing(&client).await;
        let _ = server.stop.take().map(|s| s.send(()));
        let (mut server, client) = tls_server().await;
        throughput(
            "mutual TLS over loopback (as a cluster serves it)",
            &client,
            mb,
            rounds,
        )
        .await;
        let _ = server.stop.take().map(|s| s.send(()));
        match reference_registry() {
            Some(r) => {
                let client = RegistryClient::new(&r.addr.to_string()).unwrap();
                throughput(
                    "anchor: Debian's docker-registry 2.8 (plain HTTP), same client",
                    &client,
                    mb,
                    rounds,
                )
                .await;
            }
            None => println!("anchor skipped: docker-registry is not installed"),
        }
    });
}
