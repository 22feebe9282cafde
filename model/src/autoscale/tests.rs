//! Table tests of the autoscaling policy: validation, single evaluations, and a small simulated
//! service whose load is spread over its running tasks (a load balancer), evaluated every second.

use super::*;
use crate::spec::tests_support::spec;

const S: u64 = 1000;

fn auto(min: u64, max: u64, cpu: Option<u64>, mem: Option<u64>) -> Autoscale {
    Autoscale {
        min,
        max,
        cpu_percent: cpu,
        memory_percent: mem,
        window: 30 * S,
        scale_up_delay: 0,
        scale_down_delay: 60 * S,
    }
}

/// 0.2 cpu and 100 MiB reserved, 1 cpu and 200 MiB limit.
fn resources() -> Resources {
    let mut r = Resources::default();
    r.reservations.cpus = 200;
    r.reservations.memory = 100 << 20;
    r.limits.cpus = 1000;
    r.limits.memory = 200 << 20;
    r
}

#[test]
fn validation_names_the_field() {
    let base = || {
        let mut s = spec("web", 1);
        s.resources = resources();
        s.autoscale = Some(auto(1, 3, Some(50), None));
        s
    };
    assert_eq!(base().validate(), Ok(()));
    type Edit = Box<dyn Fn(&mut ServiceSpec)>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().min = 0),
            "autoscale.min",
            "at least 1",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().max = 0),
            "autoscale.max",
            "at least min (1)",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().max = 20_000),
            "autoscale.max",
            "at most",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().cpu_percent = None),
            "autoscale",
            "set a target",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().cpu_percent = Some(0)),
            "autoscale.cpu_percent",
            "1 to 100",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().memory_percent = Some(101)),
            "autoscale.memory_percent",
            "1 to 100",
        ),
        (
            Box::new(|s| s.resources = Resources::default()),
            "autoscale.cpu_percent",
            "set resources.reservations.cpus or resources.limits.cpus",
        ),
        (
            Box::new(|s| {
                s.resources.reservations.memory = 0;
                s.resources.limits.memory = 0;
                s.autoscale.as_mut().unwrap().memory_percent = Some(80);
            }),
            "autoscale.memory_percent",
            "memory reservation (or limit)",
        ),
        (
            Box::new(|s| s.mode = ServiceMode::Global),
            "autoscale",
            "only a replicated service",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().window = 500),
            "autoscale.window",
            "from 1s",
        ),
        (
            Box::new(|s| s.autoscale.as_mut().unwrap().scale_down_delay = 2 * 3_600_000),
            "autoscale.scale_down_delay",
            "at most 1h",
        ),
    ];
    for (i, (edit, field, message)) in cases.into_iter().enumerate() {
        let mut s = base();
        edit(&mut s);
        let e = s
            .validate()
            .expect_err(&format!("case {i} must be refused"));
        assert_eq!(e.field, field, "case {i}: {e}");
        assert!(e.message.contains(message), "case {i}: {e}");
    }
}

#[test]
fn manifest_form_with_defaults() {
    let s: ServiceSpec = serde_json::from_value(serde_json::json!({
        "name": "web", "image": "x",
        "resources": {"limits": {"cpus": 0.5}},
        "autoscale": {"min": 1, "max": 4, "cpu_percent": 60},
    }))
    .unwrap();
    let a = s.autoscale.clone().unwrap();
    assert_eq!(
        (a.window, a.scale_up_delay, a.scale_down_delay),
        (30 * S, 15 * S, 120 * S)
    );
    assert_eq!(s.validate(), Ok(()));
    // Only a limit: the target is a share of the limit.
    let t = a.targets(&s.resources);
    assert_eq!((t[0].basis, t[0].basis_name), (500, "limit"));
    // A reservation wins over the limit.
    let t = auto(1, 2, Some(50), Some(50)).targets(&resources());
    assert_eq!((t[0].basis, t[0].basis_name), (200, "reservation"));
    assert_eq!((t[1].basis, t[1].basis_name), (100 << 20, "reservation"));
    let e = serde_json::from_value::<ServiceSpec>(serde_json::json!({
        "name": "web", "image": "x", "autoscale": {"min": 1, "max": 2, "cpu": 5},
    }))
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
}

#[test]
fn replicas_of_an_autoscaled_spec_are_the_autoscalers() {
    let mut s = spec("web", 7);
    s.autoscale = Some(auto(2, 5, Some(50), None));
    // New: its replicas inside the bounds.
    keep_replicas(None, &mut s);
    assert_eq!(s.replicas, 5);
    // Re-applied: the current count stays, inside the new bounds.
    let mut cur = s.clone();
    cur.replicas = 3;
    s.replicas = 1;
    keep_replicas(Some(&cur), &mut s);
    assert_eq!(s.replicas, 3);
    s.autoscale = Some(auto(4, 5, Some(50), None));
    keep_replicas(Some(&cur), &mut s);
    assert_eq!(s.replicas, 4);
    // Not autoscaled: untouched.
    let mut plain = spec("web", 9);
    keep_replicas(Some(&cur), &mut plain);
    assert_eq!(plain.replicas, 9);
}

fn sample(at: u64, cpu: u64) -> Sample {
    Sample {
        at,
        cpu_millis: cpu,
        memory_bytes: 10 << 20,
    }
}

/// `n` tasks each with samples of `cpu` millicpus every 2 s over the 30 s before `now`.
fn steady(n: usize, cpu: u64, now: u64) -> Vec<TaskSamples> {
    (0..n)
        .map(|i| TaskSamples {
            task: format!("t{i}"),
            samples: (0..15)
                .map(|k| sample(now - k * 2 * S, cpu))
                .rev()
                .collect(),
        })
        .collect()
}

#[test]
fn single_evaluations() {
    let now = 1_000 * S;
    struct Case {
        name: &'static str,
        spec: Autoscale,
        replicas: u64,
        tasks: Vec<TaskSamples>,
        want: Option<u64>,
        reason: &'static str,
    }
    let cases = vec![
        Case {
            name: "no samples: no opinion",
            spec: auto(1, 3, Some(50), None),
            replicas: 2,
            tasks: vec![TaskSamples {
                task: "t0".into(),
                samples: vec![sample(now - 40 * S, 900)],
            }],
            want: None,
            reason: "",
        },
        Case {
            name: "within the 10% tolerance",
            spec: auto(1, 5, Some(50), None),
            replicas: 2,
            tasks: steady(2, 109, now), // 54.5% of 200m against 50%
            want: None,
            reason: "",
        },
        Case {
            name: "the HPA formula, clamped to max",
            spec: auto(1, 3, Some(50), None),
            replicas: 1,
            tasks: steady(1, 360, now), // 180%: ceil(1 × 180/50) = 4
            want: Some(3),
            reason: "cpu 180% of reservation over 30s, target 50% (max 3)",
        },
        Case {
            name: "up to what the usage needs",
            spec: auto(1, 10, Some(50), None),
            replicas: 2,
            tasks: steady(2, 250, now), // 125% each: ceil(2 × 125/50) = 5
            want: Some(5),
            reason: "cpu 125% of reservation over 30s, target 50%",
        },
        Case {
            name: "tasks without samples use nothing when scaling up",
            spec: auto(1, 10, Some(50), None),
            replicas: 4,
            tasks: steady(1, 300, now), // 300m over 4 tasks: 3 needed, not 12
            want: None,
            reason: "",
        },
        Case {
            name: "memory and cpu: the higher wins",
            spec: auto(1, 10, Some(50), Some(50)),
            replicas: 1,
            tasks: vec![TaskSamples {
                task: "t0".into(),
                samples: vec![Sample {
                    at: now,
                    cpu_millis: 100,
                    memory_bytes: 150 << 20,
                }],
            }],
            want: Some(3),
            reason: "memory 150% of reservation",
        },
        Case {
            name: "below min",
            spec: auto(3, 5, Some(50), None),
            replicas: 1,
            tasks: vec![],
            want: Some(3),
            reason: "below min 3",
        },
        Case {
            name: "above max",
            spec: auto(1, 2, Some(50), None),
            replicas: 4,
            tasks: steady(4, 100, now),
            want: Some(2),
            reason: "above max 2",
        },
        Case {
            name: "rate: at most +4 from 1",
            spec: auto(1, 100, Some(50), None),
            replicas: 1,
            tasks: steady(1, 2000, now), // 1000%: 20 asked
            want: Some(5),
            reason: "at most +4 per 15s",
        },
        Case {
            name: "rate: at most double from 10",
            spec: auto(1, 100, Some(10), None),
            replicas: 10,
            tasks: steady(10, 200, now), // 100% against 10%: 100 asked
            want: Some(20),
            reason: "at most +10 per 15s",
        },
    ];
    for c in cases {
        let mut p = Policy::default();
        let got = p.evaluate(&c.spec, &resources(), c.replicas, &c.tasks, now);
        assert_eq!(got.as_ref().map(|d| d.to), c.want, "{}: {got:?}", c.name);
        if let Some(d) = got {
            assert_eq!(d.from, c.replicas, "{}", c.name);
            assert!(d.reason.contains(c.reason), "{}: {}", c.name, d.reason);
        }
    }
}

#[test]
fn scale_down_waits_for_the_highest_recommendation_to_leave_the_window() {
    let a = auto(1, 5, Some(50), None);
    let mut p = Policy::default();
    // A fresh policy (a new leader) stands for the current count for a whole delay.
    let t0 = 1_000 * S;
    assert_eq!(
        p.evaluate(&a, &resources(), 3, &steady(3, 10, t0), t0),
        None
    );
    assert_eq!(
        p.evaluate(
            &a,
            &resources(),
            3,
            &steady(3, 10, t0 + 59 * S),
            t0 + 59 * S
        ),
        None
    );
    let d = p
        .evaluate(
            &a,
            &resources(),
            3,
            &steady(3, 10, t0 + 61 * S),
            t0 + 61 * S,
        )
        .unwrap();
    assert_eq!((d.from, d.to), (3, 1));
    assert_eq!(d.reason, "cpu 5% of reservation over 30s, target 50%");
    assert_eq!(d.describe(), format!("scaled 3→1: {}", d.reason));
}

#[test]
fn scale_up_waits_for_the_lowest_recommendation_to_leave_the_window() {
    let mut a = auto(1, 5, Some(50), None);
    a.scale_up_delay = 10 * S;
    let mut p = Policy::default();
    let t0 = 1_000 * S;
    for k in 0..10 {
        let t = t0 + k * S;
        let d = p.evaluate(&a, &resources(), 1, &steady(1, 300, t), t);
        assert_eq!(d, None, "at +{k}s the policy has not seen a whole delay");
    }
    let t = t0 + 10 * S;
    let d = p
        .evaluate(&a, &resources(), 1, &steady(1, 300, t), t)
        .unwrap();
    assert_eq!(d.to, 3, "{d:?}");
}

/// A replicated service behind a load balancer: `load(t)` millicpus spread evenly over its tasks
/// that run, each sampled every 2 s once it has run 3 s; the policy runs every second and its
/// decisions take effect at once. Returns the replicas over time (one per second).
fn simulate(a: &Autoscale, start: u64, secs: u64, load: impl Fn(u64) -> u64) -> Vec<u64> {
    let mut p = Policy::default();
    let mut replicas = start;
    // (task id, started at, samples)
    let mut tasks: Vec<(String, u64, Vec<Sample>)> = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    let t0 = 10_000 * S;
    for sec in 0..secs {
        let now = t0 + sec * S;
        while tasks.len() < replicas as usize {
            tasks.push((format!("t{next}"), now, Vec::new()));
            next += 1;
        }
        tasks.truncate(replicas as usize);
        let ready = tasks.iter().filter(|t| t.1 + 3 * S <= now).count().max(1) as u64;
        if sec % 2 == 0 {
            for t in tasks.iter_mut().filter(|t| t.1 + 3 * S <= now) {
                t.2.push(sample(now, load(sec) / ready));
            }
        }
        let view: Vec<TaskSamples> = tasks
            .iter()
            .map(|(id, _, s)| TaskSamples {
                task: id.clone(),
                samples: s.clone(),
            })
            .collect();
        if let Some(d) = p.evaluate(a, &resources(), replicas, &view, now) {
            assert_eq!(d.from, replicas);
            replicas = d.to;
        }
        out.push(replicas);
    }
    out
}

fn changes(series: &[u64]) -> usize {
    series.windows(2).filter(|w| w[0] != w[1]).count()
}

/// Non-decreasing up to its peak, non-increasing after it.
fn one_hump(series: &[u64]) -> bool {
    let peak = series
        .iter()
        .position(|&n| n == *series.iter().max().unwrap())
        .unwrap();
    series[..=peak].windows(2).all(|w| w[0] <= w[1])
        && series[peak..].windows(2).all(|w| w[0] >= w[1])
}

#[test]
fn steady_load_scales_up_and_back_down_after_the_delay() {
    let mut a = auto(1, 3, Some(50), None);
    a.window = 10 * S;
    a.scale_up_delay = 5 * S;
    a.scale_down_delay = 30 * S;
    // 250m from 5 s to 60 s (2.5 × the 100m target per task), then nothing.
    let r = simulate(&a, 1, 150, |t| if (5..60).contains(&t) { 250 } else { 0 });
    assert!(one_hump(&r), "{r:?}");
    // The 10 s average climbs (1 → 2 → 3) and the up delay holds each step 5 s.
    let up = r.iter().position(|&n| n == 3).expect("reached 3");
    assert!(up <= 25, "3 replicas only at {up}s: {r:?}");
    assert!(r[..10].iter().all(|&n| n == 1), "before the delay: {r:?}");
    // The load ends at 60 s; 3 stays the highest recommendation until 30 s after it.
    let down = r.iter().rposition(|&n| n == 3).unwrap() + 1;
    assert!((90..=105).contains(&down), "left 3 at {down}s: {r:?}");
    assert_eq!(r[149], 1, "{r:?}");
}

#[test]
fn a_flapping_load_does_not_flap() {
    let mut a = auto(1, 4, Some(50), None);
    a.window = 10 * S;
    a.scale_up_delay = 5 * S;
    a.scale_down_delay = 60 * S;
    // 300m for 20 s, nothing for 20 s, for 5 minutes: one scale-up, then steady.
    let r = simulate(&a, 1, 300, |t| if (t / 20) % 2 == 0 { 300 } else { 0 });
    assert_eq!(changes(&r), 1, "{r:?}");
    assert_eq!(r[299], 3, "{r:?}");
    // Bursts of 900m for 3 s every 20 s (135m on average): the replicas only ever go up, to
    // what the bursts' peak average needs, and stay there while the bursts go on.
    let r = simulate(&a, 1, 300, |t| if t % 20 < 3 { 900 } else { 0 });
    assert!(r.windows(2).all(|w| w[0] <= w[1]), "{r:?}");
    assert!(changes(&r) <= 2, "{r:?}");
    // A load that alternates around the target faster than the up delay (each window's
    // average swings 16 % above and below it) changes nothing.
    let r = simulate(&a, 1, 300, |t| if t % 4 < 2 { 20 } else { 180 });
    assert_eq!(changes(&r), 0, "{r:?}");
}

#[test]
fn a_spike_shorter_than_the_up_delay_does_not_scale_up() {
    let mut a = auto(1, 4, Some(50), None);
    a.window = 10 * S;
    a.scale_up_delay = 15 * S;
    // One sample of 2 cpus at 30 s weighs on the 10 s average for 10 s: less than the delay.
    let r = simulate(&a, 1, 120, |t| if t == 30 { 2000 } else { 50 });
    assert!(r.iter().all(|&n| n == 1), "{r:?}");
}

#[test]
fn decisions_apply_only_to_the_count_they_were_made_on() {
    let mut store = crate::Store::default();
    let mut s = spec("web", 1);
    s.resources = resources();
    s.autoscale = Some(auto(1, 3, Some(50), None));
    store
        .apply(
            1,
            crate::Command::PutService {
                id: "s1".into(),
                spec: Box::new(s.clone()),
                now: 1,
            },
        )
        .unwrap();
    let decision = |from, to| crate::Command::Autoscale {
        service: "web".into(),
        decision: Decision {
            at: 5,
            from,
            to,
            reason: "cpu".into(),
        },
    };
    store.apply(2, decision(1, 3)).unwrap();
    assert_eq!(store.services["web"].spec.replicas, 3);
    assert_eq!(
        store.services["web"].spec_version, 1,
        "scaling rolls nothing"
    );
    // Stale (made on 1 replica): ignored.
    store.apply(3, decision(1, 2)).unwrap();
    assert_eq!(store.services["web"].spec.replicas, 3);
    // Clamped to the bounds in force.
    store.apply(4, decision(3, 9)).unwrap();
    assert_eq!(store.services["web"].spec.replicas, 3);
    assert_eq!(store.services["web"].autoscale_decisions.len(), 1);
    // A re-apply of the manifest (replicas: 1) keeps the autoscaler's count.
    store
        .apply(
            5,
            crate::Command::PutService {
                id: "x".into(),
                spec: Box::new(s.clone()),
                now: 6,
            },
        )
        .unwrap();
    assert_eq!(store.services["web"].spec.replicas, 3);
    for i in 0..12 {
        let from = store.services["web"].spec.replicas;
        let to = if from == 3 { 2 } else { 3 };
        store.apply(10 + i, decision(from, to)).unwrap();
    }
    assert_eq!(
        store.services["web"].autoscale_decisions.len(),
        KEPT_DECISIONS
    );
    // Without autoscale: ignored, and the manifest's replicas rule again.
    s.autoscale = None;
    store
        .apply(
            30,
            crate::Command::PutService {
                id: "x".into(),
                spec: Box::new(s),
                now: 7,
            },
        )
        .unwrap();
    assert_eq!(store.services["web"].spec.replicas, 1);
    store.apply(31, decision(1, 2)).unwrap();
    assert_eq!(store.services["web"].spec.replicas, 1);
}

#[test]
fn a_reapplied_manifest_leaves_the_autoscalers_count_unchanged() {
    use crate::apply::{plan, Action, Manifests};
    let mut s = spec("web", 1);
    s.resources = resources();
    s.autoscale = Some(auto(1, 3, Some(50), None));
    let m = Manifests {
        services: vec![s.clone()],
        ..Default::default()
    };
    let mut store = crate::Store::default();
    let mut n = 0;
    let mut ids = || {
        n += 1;
        format!("id{n}")
    };
    let p = plan(&store, m.clone(), 1, &mut ids).unwrap();
    store.apply(1, p.command.unwrap()).unwrap();
    let up = crate::Command::Autoscale {
        service: "web".into(),
        decision: Decision {
            at: 2,
            from: 1,
            to: 3,
            reason: "cpu".into(),
        },
    };
    store.apply(2, up).unwrap();
    // The manifest still says `replicas: 1`: nothing to do, nothing proposed.
    let p = plan(&store, m, 3, &mut ids).unwrap();
    assert_eq!(p.results[0].action, Action::Unchanged);
    assert!(p.command.is_none());
    // New bounds: updated, and the count brought inside them.
    s.autoscale = Some(auto(1, 2, Some(50), None));
    let m = Manifests {
        services: vec![s],
        ..Default::default()
    };
    let p = plan(&store, m, 4, &mut ids).unwrap();
    assert_eq!(p.results[0].action, Action::Updated);
    store.apply(3, p.command.unwrap()).unwrap();
    assert_eq!(store.services["web"].spec.replicas, 2);
}
