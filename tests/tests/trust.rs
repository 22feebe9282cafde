//! Identities are bound to certificates (audit C1, H4, H5), over a real lab. Each test plays
//! the attacker the audit describes, with the gRPC services spoken directly:
//!
//! - C1: a worker certificate (anyone with the worker token can get one) cannot register as
//!   another node, cannot claim another host's address, and cannot join under a node id that a
//!   node of the cluster holds.
//! - H4: `rctl node rm` and `rctl cluster rm-manager` revoke at once: the removed node's and
//!   controller's certificates renew nothing, join nothing, and are refused by raft.
//! - H5: an admin certificate renews itself before it runs out, admin identities are issued and
//!   revoked one by one, an expired admin is told how to get back in and gets back in offline
//!   with the CA key; a node that was off longer than its certificate is re-admitted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rudder_pki::ca::{self, Role};
use rudder_pki::tls::{self, NodeCerts};
use rudder_proto::v1::agent_api_client::AgentApiClient;
use rudder_proto::v1::agent_message::Msg as Up;
use rudder_proto::v1::cluster_client::ClusterClient;
use rudder_proto::v1::dispatcher_client::DispatcherClient;
use rudder_proto::v1::raft_peer_client::RaftPeerClient;
use rudder_proto::v1::{
    AgentMessage, Heartbeat, JoinRaftRequest, ListImagesRequest, Register, RenewRequest,
};
use rudder_tests::{bin, lab, wait_for, LabGuard};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A mutual-TLS channel to the lab's first controller, presenting `certs`.
async fn channel(lab: &LabGuard, certs: &NodeCerts) -> anyhow::Result<Channel> {
    let url = format!("https://{}", lab.lab.first_controller_addr());
    Ok(Endpoint::from_shared(url)?
        .tls_config(tls::client_tls(certs, Role::Manager))?
        .connect()
        .await?)
}

/// Opens a Dispatcher session with `certs` sending `reg`; the controller's verdict.
async fn register(lab: &LabGuard, certs: &NodeCerts, reg: Register) -> Result<(), tonic::Status> {
    let ch = channel(lab, certs)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(Up::Register(reg)),
    })
    .await
    .expect("send");
    tx.send(AgentMessage {
        msg: Some(Up::Heartbeat(Heartbeat::default())),
    })
    .await
    .expect("send");
    let mut down = DispatcherClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Accepted: the welcome arrives.
    down.message().await?;
    Ok(())
}

/// Loads the certificates in `dir` (a node's or controller's `certs`).
fn certs_in(dir: &Path) -> anyhow::Result<NodeCerts> {
    NodeCerts::load(dir).with_context(|| format!("certificates in {}", dir.display()))
}

fn nodes(lab: &LabGuard) -> anyhow::Result<Vec<Value>> {
    Ok(serde_json::from_str(
        &lab.rctl(&["node", "ls", "-o", "json"])?,
    )?)
}

fn node<'a>(nodes: &'a [Value], hostname: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["hostname"] == hostname)
}

fn wait_ready(lab: &LabGuard, count: usize) -> anyhow::Result<Vec<Value>> {
    wait_for(Duration::from_secs(30), "every node ready", || {
        let n = nodes(lab)?;
        Ok((n.iter().filter(|n| n["state"] == "ready").count() == count).then_some(n))
    })
}

/// `rctl --context CTX ARGS`: stdout, or stderr as the error.
fn rctl_ctx(ctx: &Path, args: &[&str]) -> Result<(String, String), String> {
    let out = Command::new(bin("rctl"))
        .arg("--context")
        .arg(ctx)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if out.status.success() {
        Ok((o, e))
    } else {
        Err(e)
    }
}

#[test]
fn c1_a_worker_certificate_cannot_pose_as_another_node() -> anyhow::Result<()> {
    let lab = LabGuard::up(&format!("c1{}", std::process::id() % 100000), 3)?;
    let before = wait_ready(&lab, 3)?;
    let h2 = node(&before, "h2").context("h2")?.clone();
    let victim = h2["id"].as_str().context("id")?.to_string();
    let token = lab.lab.worker_token.clone();
    let url = format!("https://{}", lab.lab.first_controller_addr());
    let root = lab.lab.root_addr();
    rt().block_on(async {
        // The worker token cannot buy a certificate in h2's name.
        let err = rudder_pki::join::join_cluster(&url, &token, &victim)
            .await
            .expect_err("a join under a member's id");
        assert!(err.to_string().contains("belongs to a node"), "{err}");

        // Nor an id that is another node's hostname (commands find nodes by either).
        let err = rudder_pki::join::join_cluster(&url, &token, "h1")
            .await
            .expect_err("a join under a hostname");
        assert!(err.to_string().contains("belongs to a node"), "{err}");

        // With a certificate of its own, the attacker cannot register as h2...
        let rogue = rudder_pki::join::join_cluster(&url, &token, "rogue").await?;
        let reg_as = |id: &str, hostname: &str, addr: String| Register {
            node_id: id.to_string(),
            hostname: hostname.into(),
            addr,
            cpus_milli: 64_000,
            memory_bytes: 64 << 30,
            role: rudder_proto::v1::NodeRole::Manager.into(),
            overlay_public_key: String::new(),
            overlay_key_epoch: 0,
            version: String::new(),
            labels: Default::default(),
            features: Vec::new(),
        };
        let reg = |id: &str, addr: String| reg_as(id, "h2", addr);
        let err = register(&lab, &rogue, reg(&victim, format!("{root}:4299")))
            .await
            .expect_err("registering as another node");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(
            err.message().contains("this certificate is for node rogue"),
            "{err}"
        );
        // ...nor claim h2's address for itself (the connection comes from the lab's root).
        let err = register(
            &lab,
            &rogue,
            reg_as("rogue", "rogue", h2["addr"].as_str().unwrap_or("").into()),
        )
        .await
        .expect_err("registering another host's address");
        assert!(err.message().contains("its connection comes from"), "{err}");
        // ...nor take h2's hostname (placement constraints and `--node` go by it).
        let err = register(&lab, &rogue, reg("rogue", format!("{root}:4299")))
            .await
            .expect_err("registering another node's hostname");
        assert!(
            err.message().contains("hostname h2 belongs to node"),
            "{err}"
        );
        // ...nor register with host labels outside the grammar or the limits (64 labels,
        // 63-byte keys, 255-byte values).
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        for (labels, words) in [
            (
                vec![("bad key".to_string(), "x".to_string())],
                "letters, digits",
            ),
            (vec![("k".repeat(64), "x".to_string())], "1 to 63"),
            (vec![("zone".to_string(), "v".repeat(256))], "255"),
            (many, "at most 64"),
        ] {
            let mut r = reg_as("rogue", "rogue", format!("{root}:4299"));
            r.labels = labels.into_iter().collect();
            let err = register(&lab, &rogue, r)
                .await
                .expect_err("registering bad labels");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.message().contains(words), "{words}: {err}");
        }
        // A controller's identity is not an agent's.
        let c1 = certs_in(&lab.lab.hosts[0].controller_data_dir().join("certs"))?;
        let err = register(
            &lab,
            &c1,
            reg_as(
                "controller-1",
                "c1",
                format!("{}:4245", lab.lab.hosts[0].addr),
            ),
        )
        .await
        .expect_err("a controller registering as an agent");
        assert!(err.message().contains("a controller's identity"), "{err}");
        anyhow::Ok(())
    })?;

    // h2 is untouched: still ready, at its own address, a worker; no rogue node recorded.
    std::thread::sleep(Duration::from_secs(4));
    let after = nodes(&lab)?;
    let h2_now = node(&after, "h2").context("h2")?;
    assert_eq!(h2_now["state"], "ready", "{after:?}");
    assert_eq!(h2_now["addr"], h2["addr"], "{after:?}");
    assert_eq!(h2_now["role"], "worker", "{after:?}");
    assert!(after.iter().all(|n| n["id"] != "rogue"), "{after:?}");
    // And the controller logged the attempts.
    let log = std::fs::read_to_string(lab.lab.hosts[0].controller_log())?;
    assert!(log.contains("claims another node's id"), "controller log");
    Ok(())
}

#[test]
fn h4_removed_nodes_and_controllers_are_revoked() -> anyhow::Result<()> {
    let lab = LabGuard::up_with(&format!("h4{}", std::process::id() % 100000), 3, 2)?;
    wait_ready(&lab, 3)?;
    let h3_certs = certs_in(&lab.lab.hosts[2].data_dir.join("certs"))?;
    let c2_certs = certs_in(&lab.lab.hosts[1].controller_data_dir().join("certs"))?;
    let h3_id = h3_certs.names()?.node;

    // A ready node is removed only with --force; a controller host only after rm-manager.
    let err = lab.rctl(&["node", "rm", "h3"]).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    let err = lab
        .rctl(&["node", "rm", "h2", "--force"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("rm-manager 2"), "{err}");
    let out = lab.rctl(&["node", "rm", "h3", "--force"])?;
    assert!(out.contains("revoked"), "{out}");
    assert!(node(&nodes(&lab)?, "h3").is_none());

    // h3's certificate renews nothing and cannot join again under its id.
    let url = format!("https://{}", lab.lab.first_controller_addr());
    let token = lab.lab.worker_token.clone();
    rt().block_on(async {
        let (_, csr) = ca::node_csr(&h3_id)?;
        let err = ClusterClient::new(channel(&lab, &h3_certs).await?)
            .renew(RenewRequest { csr_pem: csr })
            .await
            .expect_err("renewal of a removed node");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("revoked"), "{err}");
        let err = rudder_pki::join::rejoin_cluster(&url, &token, &h3_certs)
            .await
            .expect_err("re-joining a removed node");
        assert!(err.to_string().contains("revoked"), "{err}");
        anyhow::Ok(())
    })?;
    // Its agent's session is refused from then on, and it does not come back.
    wait_for(Duration::from_secs(20), "h3's agent refused", || {
        let log = std::fs::read_to_string(lab.lab.hosts[2].agent_log()).unwrap_or_default();
        Ok(log.contains("revoked").then_some(()))
    })?;
    assert!(node(&nodes(&lab)?, "h3").is_none());

    // rm-manager revokes the controller: its certificate cannot rejoin raft or renew.
    lab.rctl(&["cluster", "rm-manager", "2"])?;
    rt().block_on(async {
        let err = RaftPeerClient::new(channel(&lab, &c2_certs).await?)
            .join_raft(JoinRaftRequest {
                raft_id: 2,
                addr: format!("{}:4243", lab.lab.hosts[1].addr),
                registry: format!("{}:5000", lab.lab.hosts[1].addr),
            })
            .await
            .expect_err("a removed controller re-joining raft");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("revoked"), "{err}");
        let (_, csr) = ca::node_csr("controller-2")?;
        let err = ClusterClient::new(channel(&lab, &c2_certs).await?)
            .renew(RenewRequest { csr_pem: csr })
            .await
            .expect_err("renewal of a removed controller");
        assert!(err.message().contains("revoked"), "{err}");
        anyhow::Ok(())
    })?;
    // Agents refuse it too: it is no longer among the controllers they serve.
    let h1_agent = format!("https://{}", lab.lab.hosts[0].agent_addr());
    wait_for(
        Duration::from_secs(10),
        "agents refusing controller-2",
        || {
            let r = rt().block_on(async {
                let ch = Endpoint::from_shared(h1_agent.clone())?
                    .tls_config(tls::client_tls(&c2_certs, Role::Worker))?
                    .connect()
                    .await?;
                anyhow::Ok(
                    AgentApiClient::new(ch)
                        .list_host_images(ListImagesRequest::default())
                        .await,
                )
            })?;
            Ok(match r {
                Err(s) if s.message().contains("not a member of the controller group") => Some(()),
                _ => None,
            })
        },
    )?;
    let info: Value = serde_json::from_str(&lab.rctl(&["cluster", "info", "-o", "json"])?)?;
    assert_eq!(info["managers"].as_array().map(Vec::len), Some(1), "{info}");
    // h2 runs no controller any more: an ordinary worker, removable like any other.
    wait_for(Duration::from_secs(10), "h2 a worker again", || {
        Ok((node(&nodes(&lab)?, "h2").map(|n| n["role"] == "worker") == Some(true)).then_some(()))
    })?;
    lab.rctl(&["get", "services"])
        .context("the cluster still serves")?;
    Ok(())
}

#[test]
fn h5_admin_certificates_renew_revoke_and_recover() -> anyhow::Result<()> {
    let lab = LabGuard::up(&format!("h5a{}", std::process::id() % 100000), 1)?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let dir_s = dir.to_string_lossy().to_string();

    // A second admin identity, short-lived: it renews itself in the last third of its life.
    lab.rctl(&[
        "cluster",
        "admin-cert",
        "ops",
        "--ttl",
        "30s",
        "--out",
        &dir_s,
    ])?;
    let ops = dir.join("ops.context.json");
    let first = std::fs::read_to_string(dir.join("ops.pem"))?;
    let (_, first_end) = ca::cert_validity(&first)?;
    rctl_ctx(&ops, &["get", "services"]).map_err(anyhow::Error::msg)?;
    assert_eq!(
        std::fs::read_to_string(dir.join("ops.pem"))?,
        first,
        "not due yet"
    );
    std::thread::sleep(Duration::from_secs(21));
    // Eight rctl at once in the renewal window: one renews, none pairs another's key with
    // its certificate (the reviewer locked an admin out this way).
    let runs: Vec<_> = (0..8)
        .map(|_| {
            Command::new(bin("rctl"))
                .arg("--context")
                .arg(&ops)
                .args(["get", "services"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut said = String::new();
    for r in runs {
        let out = r.wait_with_output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(
        said.matches("renewed the admin certificate").count(),
        1,
        "{said}"
    );
    let renewed = std::fs::read_to_string(dir.join("ops.pem"))?;
    let (_, end) = ca::cert_validity(&renewed)?;
    // A full lifetime of its own (30 s, as it was issued), from the renewal on.
    assert!(end > first_end, "renewed for another lifetime");
    assert!(
        end < SystemTime::now() + Duration::from_secs(40),
        "not more"
    );
    rctl_ctx(&ops, &["get", "services"]).map_err(anyhow::Error::msg)?;
    // Past the old certificate's end, the identity still works.
    let wait = first_end
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(wait + Duration::from_secs(1));
    rctl_ctx(&ops, &["get", "services"]).map_err(anyhow::Error::msg)?;

    // Revoked by the first admin: refused at the next request.
    let out = lab.rctl(&["cluster", "revoke-admin", "ops"])?;
    assert!(out.contains("revoked"), "{out}");
    let err = rctl_ctx(&ops, &["get", "services"]).expect_err("a revoked admin");
    assert!(err.contains("revoked"), "{err}");

    // Expired before it was renewed: rctl says what to do.
    lab.rctl(&[
        "cluster",
        "admin-cert",
        "brief",
        "--ttl",
        "1s",
        "--out",
        &dir_s,
    ])?;
    std::thread::sleep(Duration::from_secs(2));
    let err = rctl_ctx(&dir.join("brief.context.json"), &["get", "services"])
        .expect_err("an expired admin");
    assert!(
        err.contains("expired") && err.contains("admin-cert"),
        "{err}"
    );

    // Every admin locked out: a manager host signs a new identity with the CA key.
    let ca_dir = lab.lab.hosts[0].controller_data_dir().join("certs");
    let out = Command::new(bin("rctl"))
        .args([
            "cluster",
            "admin-cert",
            "rescue",
            "--out",
            &dir_s,
            "--ca-dir",
        ])
        .arg(&ca_dir)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The offline context names no controller: give it the lab's.
    let mut ctx: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("rescue.context.json"))?)?;
    ctx["controllers"] = serde_json::json!(lab.lab.controller_urls());
    ctx["registry"] = lab.lab.registry().into();
    std::fs::write(dir.join("rescue.context.json"), serde_json::to_vec(&ctx)?)?;
    rctl_ctx(&dir.join("rescue.context.json"), &["get", "services"]).map_err(anyhow::Error::msg)?;
    Ok(())
}

#[test]
fn h5_a_node_off_longer_than_its_certificate_is_readmitted() -> anyhow::Result<()> {
    let mut lab = LabGuard::up_args(
        &format!("h5n{}", std::process::id() % 100000),
        2,
        1,
        &["--node-cert-validity", "20"],
    )?;
    let before = wait_ready(&lab, 2)?;
    let id = node(&before, "h2").context("h2")?["id"].clone();
    lab.lab.kill(1, lab::Role::Agent)?;
    let pem = lab.lab.hosts[1].data_dir.join("certs").join("node.pem");
    let (_, end) = ca::cert_validity(&std::fs::read_to_string(&pem)?)?;
    std::thread::sleep(
        end.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2),
    );
    // Expired now: restarted with the join token, it proves its old key and keeps its id.
    lab.restart(1, lab::Role::Agent, true)?;
    let after = wait_ready(&lab, 2)?;
    assert_eq!(node(&after, "h2").context("h2")?["id"], id, "{after:?}");
    let log = std::fs::read_to_string(lab.lab.hosts[1].agent_log())?;
    assert!(log.contains("re-joining with the join token"), "agent log");
    let (_, end) = ca::cert_validity(&std::fs::read_to_string(&pem)?)?;
    assert!(end > SystemTime::now(), "a valid certificate again");
    Ok(())
}

/// `curl` against the lab's registry with the certificate in `dir` (a node's `certs`),
/// verifying the registry by its address; the HTTP status.
fn registry_status(lab: &LabGuard, dir: &Path, path: &str) -> anyhow::Result<u16> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("node.pem"))
        .arg("--key")
        .arg(dir.join("node-key.pem"))
        .arg(format!("https://{}{path}", lab.lab.registry()))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[test]
fn l4_workers_pull_only_their_tasks_images() -> anyhow::Result<()> {
    let (lab, tmp) = rudder_tests::lab_with_busybox("l4", 2)?;
    let h2 = lab.lab.hosts[1].data_dir.join("certs");
    wait_for(Duration::from_secs(15), "h2's certificate", || {
        Ok(h2.join("node.pem").exists().then_some(()))
    })?;
    // No task of busybox on h2 yet: nothing to pull, and never the catalog.
    assert_eq!(registry_status(&lab, &h2, "/v2/")?, 200);
    assert_eq!(registry_status(&lab, &h2, "/v2/_catalog")?, 403);
    assert_eq!(
        registry_status(&lab, &h2, "/v2/busybox/manifests/latest")?,
        403
    );
    // Once a task of it is placed there, the agent pulls it and the task runs.
    lab.apply(
        tmp.path(),
        "bb.yaml",
        &rudder_tests::pinned_service("bb", "busybox:latest", "h2"),
    )?;
    rudder_tests::running_on(&lab, "bb", "h2")?;
    assert_eq!(
        registry_status(&lab, &h2, "/v2/busybox/manifests/latest")?,
        200
    );
    // Still not the catalog, and still nothing a worker may write.
    assert_eq!(registry_status(&lab, &h2, "/v2/_catalog")?, 403);
    Ok(())
}

/// Kills a process started by this test (by its pid) when dropped.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The reviewer's attack on H4: a removed controller, started again with its old (still valid)
/// certificate as the leader of a group of its own, at its old address. When the real leader
/// goes away, the agents try it — and refuse it in the handshake: it is not a member.
#[test]
fn h4_a_removed_controller_cannot_take_the_agents() -> anyhow::Result<()> {
    let mut lab = LabGuard::up_with(&format!("h4r{}", std::process::id() % 100000), 3, 2)?;
    wait_ready(&lab, 3)?;
    let tmp = tempfile::tempdir()?;
    lab.rctl(&["cluster", "rm-manager", "2"])?;
    // The agents learn the new member list over their sessions.
    std::thread::sleep(Duration::from_secs(2));
    lab.lab.kill(1, lab::Role::Controller)?;
    // The rogue: controller-2's certificates in a fresh data dir, a one-member group.
    let h2 = lab.lab.hosts[1].clone();
    let rogue_dir = tmp.path().join("rogue");
    let certs = rogue_dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    for e in std::fs::read_dir(h2.controller_data_dir().join("certs"))? {
        let e = e?;
        std::fs::copy(e.path(), certs.join(e.file_name()))?;
    }
    let log = tmp.path().join("rogue.log");
    let f = std::fs::File::create(&log)?;
    let rogue = Started(
        Command::new("ip")
            .args(["netns", "exec", &h2.netns])
            .arg(bin("rudder-controller"))
            .args(["--data-dir", &rogue_dir.to_string_lossy()])
            .args(["--listen", &format!("{}:4243", h2.addr)])
            .args(["--registry-listen", &format!("{}:5000", h2.addr)])
            .args(["--raft-id", "2"])
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?,
    );
    wait_for(Duration::from_secs(15), "the rogue leading itself", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains("controller starting").then_some(()))
    })?;
    // The real leader goes away: the agents look for another controller and find the rogue.
    lab.lab.kill(0, lab::Role::Controller)?;
    wait_for(
        Duration::from_secs(20),
        "an agent refusing the rogue",
        || {
            let refused = lab.lab.hosts.iter().any(|h| {
                std::fs::read_to_string(h.agent_log())
                    .unwrap_or_default()
                    .contains("controller-2 is not a member of the controller group")
            });
            Ok(refused.then_some(()))
        },
    )?;
    let text = std::fs::read_to_string(&log)?;
    assert!(
        !text.contains("agent session opened"),
        "the rogue got an agent's session:\n{text}"
    );
    drop(rogue);
    // The real controller comes back and every node is ready again with it.
    lab.restart(0, lab::Role::Controller, true)?;
    wait_ready(&lab, 3)?;
    Ok(())
}
