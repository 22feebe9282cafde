//! The fleet simulator's short run, as CI runs it: tens of hollow hosts and a few hundred tasks
//! against three real controllers (needs `cargo build --workspace --bins` first, as the lab
//! tests do), with the churn scenarios; every phase must converge and no replica slot may run
//! twice once converged; a fourth controller joins (a snapshot install) before the leader
//! is killed.

use std::time::Duration;

use rudder_agent::hollow::Behaviour;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_converges_through_churn_without_running_a_slot_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = rudder_fleetsim::Config {
        hosts: 20,
        tasks: 300,
        per_service: 50,
        controllers: 3,
        behaviour: Behaviour {
            start_latency: Duration::from_millis(20),
            fail_rate: 0.0,
            run_for: None,
            seed: 7,
            full_assignments: false,
        },
        churn: true,
        churn_share: 0.1,
        churn_minutes: 1,
        update_tasks: 0,
        drain_hosts: 0,
        join_member: true,
        failover: true,
        controller_bin: rudder_fleetsim::controller_bin(),
        dir: dir.path().to_path_buf(),
        poll: Duration::from_millis(200),
        timeout: Duration::from_secs(60),
        hold: Duration::from_secs(2),
        controller_log: "warn".into(),
        keep: false,
        rate: 0.0,
        election_timeout_ms: None,
    };
    let report = rudder_fleetsim::run(cfg).await.expect("the run");
    assert!(report.converged);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(report
        .lines
        .iter()
        .any(|l| l.contains("S1 scheduling delay")));
    assert!(report
        .lines
        .iter()
        .any(|l| l.starts_with("snapshot install: c4 joined")));
    assert!(report.lines.iter().any(|l| l.contains("failover")));
}
