use super::*;
use crate::hostnet::fake::{Call, FakeHostNet};
use crate::hostnet::{LinkState, ObservedRoute};

fn occ(processes: bool, sockets: bool) -> Occupancy {
    Occupancy {
        processes,
        sockets,
        tcp_seen: false,
    }
}

#[test]
fn release_reuses_only_what_nothing_can_have_changed() {
    use Verdict::*;
    use Why::*;
    let f = |may_reconfigure, o, closing| ReleaseFacts {
        may_reconfigure,
        occupancy: o,
        closing,
    };
    let cases = [
        (f(false, occ(false, false), false), 0, 4, Reuse),
        (f(false, occ(false, false), false), 3, 4, Reuse),
        (f(false, occ(false, false), false), 4, 4, Delete(PoolFull)),
        (f(false, occ(false, false), false), 0, 0, Delete(PoolFull)),
        (
            f(true, occ(false, false), false),
            0,
            4,
            Delete(MayReconfigure),
        ),
        (
            f(false, occ(true, false), false),
            0,
            4,
            Delete(ProcessesLeft),
        ),
        (f(false, occ(false, true), false), 0, 4, Delete(SocketsLeft)),
        (
            f(
                false,
                Occupancy {
                    tcp_seen: true,
                    ..occ(false, false)
                },
                false,
            ),
            0,
            4,
            Delete(TcpSeen),
        ),
        (
            f(true, occ(true, true), false),
            0,
            4,
            Delete(MayReconfigure),
        ),
        (f(false, occ(false, false), true), 0, 4, Delete(Closing)),
    ];
    for (facts, held, max, want) in cases {
        assert_eq!(
            on_release(&facts, held, max),
            want,
            "{facts:?} {held}/{max}"
        );
    }
}

#[test]
fn making_and_deleting_follow_the_bounds() {
    // (ready, making, scrubbing, target, max_idle) -> to make
    for (r, m, s, t, max, want) in [
        (0, 0, 0, 4, 64, 4),
        (2, 1, 0, 4, 64, 1),
        (1, 0, 3, 4, 64, 0),
        (9, 0, 0, 4, 64, 0),
        (0, 0, 0, 4, 2, 2),
        (0, 0, 0, 0, 64, 0),
    ] {
        assert_eq!(to_make(r, m, s, t, max), want, "{r} {m} {s} {t} {max}");
    }
    let ms = Duration::from_millis;
    // (pending, since the last take, quiet, max pending) -> delete now
    for (p, since, q, max, want) in [
        (0, ms(10_000), ms(500), 128, false),
        (3, ms(100), ms(500), 128, false),
        (3, ms(500), ms(500), 128, true),
        (128, ms(0), ms(500), 128, true),
        (1, Duration::MAX, ms(500), 128, true),
    ] {
        assert_eq!(reap_now(p, since, q, max), want, "{p} {since:?}");
    }
}

fn link(kind: &str, up: bool) -> LinkState {
    LinkState {
        index: 1,
        kind: (!kind.is_empty()).then(|| kind.to_string()),
        up,
        mtu: 1500,
    }
}

fn clean() -> Observed {
    Observed {
        links: [
            ("lo".into(), link("", true)),
            ("eth0".into(), link("veth", false)),
        ]
        .into(),
        routes: vec![],
    }
}

#[test]
fn a_scrub_deletes_extra_links_and_a_clean_namespace_is_only_lo_and_eth0() {
    let mut used = clean();
    used.links.insert("eth0".into(), link("veth", true));
    used.links.insert("evil0".into(), link("dummy", true));
    used.routes.push(ObservedRoute {
        dst: "0.0.0.0/0".parse().unwrap(),
        kind: crate::hostnet::RouteKind::Unicast,
        dev: Some("eth0".into()),
        proto: 3,
    });
    let ops: Vec<String> = scrub_ops(&used).iter().map(|o| o.to_string()).collect();
    assert_eq!(
        ops,
        [
            "link del evil0",
            "link set eth0 down",
            "addr flush dev eth0"
        ]
    );
    assert_eq!(is_clean(&clean()), Ok(()));
    let mut bad = vec![];
    let mut b = clean();
    b.links.insert("evil0".into(), link("dummy", false));
    bad.push(b);
    let mut b = clean();
    b.links.insert("eth0".into(), link("veth", true));
    bad.push(b);
    let mut b = clean();
    b.links.insert("eth0".into(), link("bridge", false));
    bad.push(b);
    let mut b = clean();
    b.links.insert("lo".into(), link("", false));
    bad.push(b);
    let mut b = clean();
    b.links.remove("eth0");
    bad.push(b);
    bad.push(used);
    for b in bad {
        assert!(is_clean(&b).is_err(), "{b:?}");
    }
}

/// Polls (on the paused clock) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

fn cfg(ready_target: usize, max_idle: usize) -> PoolConfig {
    PoolConfig {
        ready_target,
        max_idle,
        quiet: Duration::from_millis(500),
        max_pending: 128,
        trim_after: Duration::from_secs(120),
        wait_on_the_way: Duration::from_millis(100),
        scrubbers: 2,
    }
}

/// Through the fake: the pool fills to its target, refills after a take, reuses a clean
/// released namespace, deletes one that is occupied or beyond the bound (after a quiet
/// period), trims back to the target when idle, and deletes everything on shutdown.
#[tokio::test(start_paused = true)]
async fn the_pool_fills_reuses_within_its_bound_and_empties() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeHostNet::new());
    fake.set_observed_else(clean());
    let dir = tmp.path().join("pool");
    let pool = NetnsPool::new(fake.clone(), Ns::Host, "rdr0", &dir, cfg(2, 3)).unwrap();
    pool.start();
    until("2 ready", || pool.stats().ready == 2).await;
    let made = fake
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::CreateNetns(_)))
        .count();
    assert_eq!(made, 2);
    let host = fake.ops(&Ns::Host);
    assert!(
        host[0].starts_with(&format!("link add {}", pool.prefix)),
        "{host:?}"
    );
    assert!(
        host[1].ends_with("master rdr0 up"),
        "a port of the bridge: {host:?}"
    );

    // A take moves one to the task's path and is refilled.
    let t1 = tmp.path().join("t1");
    let v1 = pool.take(&t1).await.unwrap().veth;
    assert!(t1.exists());
    assert_eq!(pool.host_end(&t1).as_deref(), Some(v1.as_str()));
    until("refilled", || pool.stats().ready == 2).await;

    // Released clean: scrubbed and kept (3 held, the bound).
    pool.release(&t1, false).await;
    assert!(!t1.exists(), "the task's path is gone at once");
    until("reused", || pool.stats().ready == 3).await;
    let scrubbed = fake
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Apply(Ns::Path(p), ops) if p.starts_with(&dir) => Some(ops.clone()),
            _ => None,
        })
        .flatten()
        .map(|o| o.to_string())
        .collect::<Vec<_>>();
    assert!(
        scrubbed.contains(&"addr flush dev eth0".to_string()),
        "{scrubbed:?}"
    );

    // Beyond the bound: deleted, once no take happened for the quiet period.
    let t2 = tmp.path().join("t2");
    let v2 = pool.take(&t2).await.unwrap().veth;
    let t3 = tmp.path().join("t3");
    pool.take(&t3).await.unwrap();
    until("refilled again", || pool.stats().ready == 2).await;
    pool.release(&t2, false).await; // 3 held
    until("t2 kept", || pool.stats().ready == 3).await;
    pool.release(&t3, false).await; // full: deleted
    until("t3 deleted", || {
        pool.stats().pending_delete == 0 && pool.stats().scrubbing == 0
    })
    .await;
    assert_eq!(pool.stats().ready, 3);
    assert!(fake
        .ops(&Ns::Host)
        .iter()
        .any(|o| o.starts_with("link del ")));
    assert!(pool.stats().ready <= 3, "bounded");

    // Occupied (a process or a socket left): deleted, whatever the room.
    let t4 = tmp.path().join("t4");
    let v4 = pool.take(&t4).await.unwrap().veth;
    fake.set_occupied(occ(false, true));
    pool.release(&t4, false).await;
    until("t4 deleted", || {
        fake.ops(&Ns::Host).contains(&format!("link del {v4}"))
    })
    .await;
    fake.set_occupied(occ(false, false));
    // A task that could reconfigure its network: deleted.
    let t5 = tmp.path().join("t5");
    let v5 = pool.take(&t5).await.unwrap().veth;
    pool.release(&t5, true).await;
    until("t5 deleted", || {
        fake.ops(&Ns::Host).contains(&format!("link del {v5}"))
    })
    .await;
    let _ = v2;

    // Idle for long: trimmed back to the target.
    until("ready settles", || pool.stats().ready >= 2).await;
    tokio::time::sleep(Duration::from_secs(130)).await;
    pool.wake.notify_one();
    until("trimmed", || pool.stats().ready == 2).await;

    // A namespace unknown to the pool (made before a restart) is deleted on release.
    let old = tmp.path().join("old");
    std::fs::write(&old, "").unwrap();
    pool.release(&old, false).await;
    assert!(!old.exists());

    pool.shutdown().await;
    assert_eq!(pool.stats().ready, 0);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing kept");
    let _ = v1;
}

/// Leases from a counter; each give-back records how many host ends were deleted by then.
struct FakeLeases {
    fake: Arc<FakeHostNet>,
    next: Mutex<u8>,
    given_back: Mutex<Vec<(Ipv4Addr, usize)>>,
}

impl Leases for FakeLeases {
    fn lease(&self) -> Option<Lease> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        Some(Lease {
            addr: Ipv4Addr::new(172, 31, 0, *n + 1),
            prefix: 24,
            gw: Ipv4Addr::new(172, 31, 0, 1),
        })
    }

    fn give_back(&self, addr: Ipv4Addr) {
        let deleted = self
            .fake
            .ops(&Ns::Host)
            .iter()
            .filter(|o| o.starts_with("link del "))
            .count();
        self.given_back.lock().unwrap().push((addr, deleted));
    }
}

/// With leases, a ready namespace is armed (`eth0` up with an address and its default route),
/// a take hands the address to the task, a reused namespace is armed with a fresh lease, and
/// an address comes back to the bridge only after its namespace's host end is deleted.
#[tokio::test(start_paused = true)]
async fn armed_namespaces_hand_their_address_over_and_give_it_back_only_once_unplugged() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeHostNet::new());
    fake.set_observed_else(clean());
    let leases = Arc::new(FakeLeases {
        fake: fake.clone(),
        next: Mutex::new(0),
        given_back: Mutex::new(Vec::new()),
    });
    let dir = tmp.path().join("pool");
    let pool = NetnsPool::new(fake.clone(), Ns::Host, "rdr0", &dir, cfg(2, 3)).unwrap();
    pool.set_leases(leases.clone());
    pool.start();
    until("2 ready", || pool.stats().ready == 2).await;
    let inside = |p: &Path| fake.ops(&Ns::Path(p.to_path_buf()));
    let first = inside(&dir.join("n1"));
    assert_eq!(
        first,
        [
            "link set lo up",
            "link set eth0 up",
            "addr replace 172.31.0.2/24 dev eth0",
            "route replace 0.0.0.0/0 via 172.31.0.1 dev eth0",
        ],
        "armed when made"
    );

    let t1 = tmp.path().join("t1");
    let taken = pool.take(&t1).await.unwrap();
    assert_eq!(
        taken.addr,
        Some(Ipv4Addr::new(172, 31, 0, 2)),
        "the task's now"
    );
    until("refilled", || pool.stats().ready == 2).await;
    pool.release(&t1, false).await;
    until("reused", || pool.stats().ready == 3).await;
    let reused = inside(&dir.join("n1"));
    let tail = &reused[reused.len() - 3..];
    assert_eq!(
        tail[0], "link set eth0 up",
        "re-armed after the scrub: {reused:?}"
    );
    assert_eq!(
        tail[1], "addr replace 172.31.0.5/24 dev eth0",
        "a fresh lease"
    );
    assert!(
        leases.given_back.lock().unwrap().is_empty(),
        "the task's address is the bridge table's to free, not the pool's"
    );

    pool.shutdown().await;
    let back = leases.given_back.lock().unwrap().clone();
    let mut addrs: Vec<Ipv4Addr> = back.iter().map(|(a, _)| *a).collect();
    addrs.sort();
    assert_eq!(
        addrs,
        [
            Ipv4Addr::new(172, 31, 0, 3),
            Ipv4Addr::new(172, 31, 0, 4),
            Ipv4Addr::new(172, 31, 0, 5)
        ],
        "every ready namespace's lease comes back"
    );
    for (addr, deleted) in back {
        assert!(
            deleted >= 3,
            "{addr} given back before the host ends were deleted"
        );
    }
}

/// A restarted agent deletes what the earlier one kept in the pool's directory.
#[tokio::test]
async fn a_new_pool_deletes_what_an_earlier_agent_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("n1"), "").unwrap();
    std::fs::write(dir.join("r7"), "").unwrap();
    let fake = Arc::new(FakeHostNet::new());
    let _pool = NetnsPool::new(fake, Ns::Host, "rdr0", &dir, cfg(0, 0)).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// Removes, even when the test fails, every namespace a root test made under its dir.
struct NsGuard(PathBuf);

impl Drop for NsGuard {
    fn drop(&mut self) {
        fn walk(d: &Path) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p);
                } else {
                    crate::net::remove_netns(&p);
                }
            }
        }
        walk(&self.0);
    }
}

/// `ip ARGS` inside the namespace at `ns`, its output.
fn ip_in(ns: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The real pool over rtnetlink, with its bridge in a namespace of the test's own (nothing
/// of the host's is touched): a task that adds an address, a route, a neighbour and a link
/// in its pooled namespace leaves none of them to the next task given that namespace, and
/// a namespace with a socket still open is not reused. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_namespace_carries_nothing_of_its_last_task() {
    use crate::hostnet::netlink::NetlinkHostNet;
    use crate::hostnet::{plan, Route};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _guard = NsGuard(tmp.path().to_path_buf());
    let net = NetlinkHostNet::shared().unwrap();
    let h = tmp.path().join("host");
    net.create_netns(&h).await.unwrap();
    let host = Ns::Path(h.clone());
    let gw: std::net::Ipv4Addr = "10.88.0.1".parse().unwrap();
    net.apply(&host, &plan::local_bridge("tbr0", gw, 16))
        .await
        .unwrap();
    let pool = NetnsPool::new(
        net.clone(),
        host.clone(),
        "tbr0",
        &tmp.path().join("pool"),
        PoolConfig {
            quiet: Duration::from_millis(50),
            ..cfg(1, 4)
        },
    )
    .unwrap();
    pool.start();
    let wait = |what: &'static str, f: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait("one ready", &|| pool.stats().ready == 1);

    // Task 1 takes it, is attached, then changes everything it can.
    let t1 = tmp.path().join("t1");
    let v1 = pool.take(&t1).await.unwrap().veth;
    let route = Route::via("0.0.0.0/0".parse().unwrap(), Some(gw), "eth0");
    let up = |v: &str, up| NetOp::SetLink {
        name: v.into(),
        set: LinkSet {
            up: Some(up),
            ..Default::default()
        },
    };
    net.apply(&host, &[up(&v1, true)]).await.unwrap();
    let ns1 = Ns::Path(t1.clone());
    let addr: std::net::Ipv4Addr = "10.88.0.2".parse().unwrap();
    net.apply(
        &ns1,
        &plan::pooled_inside("eth0", addr, 16, std::slice::from_ref(&route)),
    )
    .await
    .unwrap();
    assert!(ip_in(&t1, &["-4", "addr"]).contains("10.88.0.2/16"));
    net.apply(
        &ns1,
        &[
            NetOp::AddBridge {
                name: "evil0".into(),
            },
            NetOp::ReplaceAddr {
                dev: "eth0".into(),
                addr: "10.99.0.1".parse().unwrap(),
                prefix: 24,
            },
            NetOp::ReplaceRoute(Route::via(
                "10.98.0.0/16".parse().unwrap(),
                Some(gw),
                "eth0",
            )),
            NetOp::ReplaceNeigh {
                dev: "eth0".into(),
                ip: "10.88.0.77".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 77],
            },
        ],
    )
    .await
    .unwrap();
    assert!(ip_in(&t1, &["neigh"]).contains("10.88.0.77"));

    // Detached: its host end down, released, scrubbed and kept.
    net.apply(&host, &[up(&v1, false)]).await.unwrap();
    pool.release(&t1, false).await;
    assert!(!t1.exists());
    wait("scrubbed", &|| {
        let s = pool.stats();
        s.scrubbing == 0 && s.ready == 2
    });

    // Task 2 gets the same namespace (the same host end) and finds none of task 1's state.
    let mut got = None;
    for i in 0..2 {
        let t = tmp.path().join(format!("t2-{i}"));
        if pool.take(&t).await.unwrap().veth == v1 {
            got = Some(t);
            break;
        }
    }
    let t2 = got.expect("the released namespace is handed out again");
    let links = ip_in(&t2, &["-o", "link"]);
    assert!(!links.contains("evil0"), "{links}");
    assert_eq!(links.lines().count(), 2, "lo and eth0 only: {links}");
    let addrs = ip_in(&t2, &["-4", "-o", "addr"]);
    assert!(
        !addrs.contains("10.99.0.1") && !addrs.contains("10.88.0.2"),
        "{addrs}"
    );
    assert!(ip_in(&t2, &["-4", "route"]).trim().is_empty());
    assert!(
        ip_in(&t2, &["-4", "route", "show", "table", "all", "dev", "eth0"])
            .trim()
            .is_empty()
    );
    assert!(ip_in(&t2, &["neigh"]).trim().is_empty());
    // It works for task 2 as a fresh one would.
    net.apply(&host, &[up(&v1, true)]).await.unwrap();
    net.apply(
        &Ns::Path(t2.clone()),
        &plan::pooled_inside("eth0", "10.88.0.3".parse().unwrap(), 16, &[route]),
    )
    .await
    .unwrap();
    let r = ip_in(&t2, &["-4", "route"]);
    assert!(r.contains("default via 10.88.0.1 dev eth0"), "{r}");

    // A socket left open in it (passed to someone else): never reused.
    let f = std::fs::File::open(&t2).unwrap();
    let sock = std::thread::spawn(move || {
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::UdpSocket::bind("0.0.0.0:5353").unwrap()
    })
    .join()
    .unwrap();
    net.apply(&host, &[up(&v1, false)]).await.unwrap();
    pool.release(&t2, false).await;
    wait("deleted", &|| {
        let s = pool.stats();
        s.scrubbing == 0 && s.pending_delete == 0
    });
    let hosts = ip_in(&h, &["-o", "link"]);
    assert!(
        !hosts.contains(&format!("{v1}@")),
        "its host end is gone: {hosts}"
    );
    drop(sock);

    pool.shutdown().await;
    assert_eq!(
        std::fs::read_dir(tmp.path().join("pool")).unwrap().count(),
        0
    );
}
