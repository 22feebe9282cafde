//! A linearizability checker for histories of register operations: the Wing–Gong search
//! (1993) with Lowe's memoization of `(linearized set, model state)` (2017), as Porcupine and
//! Knossos run it. Pure: it takes a recorded history and returns a verdict; no clock, no I/O.
//!
//! A history is a list of [`Op`]s, each with the time its client invoked it and the time the
//! answer came back. An operation whose answer never came (a timeout, a dropped connection, a
//! deposed leader: the write may or may not have taken effect) has no return time: it is
//! treated as returning after everything else, which lets the search place it anywhere after its
//! invocation, including after every other operation (where a register write is never
//! observed, i.e. "it did not happen"). Reads that failed carry no information and are left
//! out of the history by the recorder.
//!
//! Invariants:
//! - The verdict is exact: `Ok` means a linearization exists, and the witness order returned
//!   respects real time (an operation that returned before another was invoked comes first) and
//!   the register's sequential semantics.
//! - Linearizability is local (Herlihy & Wing): a history over many registers is linearizable
//!   iff each register's sub-history is, so [`check`] splits by key and searches each alone.
//! - The search is bounded by [`Limits::max_steps`]; beyond it the verdict is `Unknown` (never a
//!   false `Ok` or a false violation).

use std::collections::{BTreeMap, HashSet};

/// What an operation did to its register.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Set the register to this value.
    Write(u64),
    /// Read the register and saw this value (`None`: the register did not exist / was unset).
    Read(Option<u64>),
}

/// One client operation on one register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which register (linearizability is checked per key).
    pub key: String,
    /// Which client issued it (for reports only).
    pub client: usize,
    /// When the client invoked it (any monotonic unit, e.g. nanoseconds since the run began).
    pub invoke: u64,
    /// When the answer arrived; `None` when its outcome is unknown.
    pub ret: Option<u64>,
    /// What it did (for a read: what it saw).
    pub action: Action,
}

/// Bounds on the search.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Search steps (calls tried) per key before giving up with [`Verdict::Unknown`].
    pub max_steps: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: 20_000_000,
        }
    }
}

/// The outcome for one register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Linearizable; the witness lists the indices (into the key's ops, see [`KeyReport`]) in
    /// linearization order.
    Ok {
        /// Indices of the key's operations in a valid sequential order.
        witness: Vec<usize>,
    },
    /// No linearization exists. `longest` is the longest prefix of operations the search could
    /// linearize; `stuck_at` the operations that were candidates next and could not go.
    Violation {
        /// Longest linearizable prefix found.
        longest: Vec<usize>,
        /// The minimal unlinearized operations at that point.
        stuck_at: Vec<usize>,
    },
    /// The search hit [`Limits::max_steps`].
    Unknown,
}

/// The verdict for one register, with the operations it was computed over.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// The register.
    pub key: String,
    /// Its operations, in the order the verdict's indices refer to.
    pub ops: Vec<Op>,
    /// The verdict.
    pub verdict: Verdict,
    /// Search steps spent.
    pub steps: u64,
}

/// The verdict for a whole history.
#[derive(Debug, Clone)]
pub struct Report {
    /// One per register, in key order.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// True when every register's history is linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.keys
            .iter()
            .all(|k| matches!(k.verdict, Verdict::Ok { .. }))
    }
    /// Registers with a violation.
    pub fn violations(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, Verdict::Violation { .. }))
    }
    /// Registers the search gave up on.
    pub fn unknown(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, Verdict::Unknown))
    }
}

/// Checks `history` (registers start unset: `Read(None)`) for linearizability, key by key.
pub fn check(history: &[Op], limits: Limits) -> Report {
    check_with_initial(history, &BTreeMap::new(), limits)
}

/// [`check`], where the registers named in `initial` start with that value (writes completed
/// before the history began).
pub fn check_with_initial(
    history: &[Op],
    initial: &BTreeMap<String, u64>,
    limits: Limits,
) -> Report {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    let keys = by_key
        .into_iter()
        .map(|(key, ops)| {
            let init = initial.get(key).copied();
            let (verdict, steps) = check_register(&ops, init, limits);
            KeyReport {
                key: key.to_string(),
                ops,
                verdict,
                steps,
            }
        })
        .collect();
    Report { keys }
}

/// One call or return event in the doubly linked list the search walks.
#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    /// For a call: index of its return entry.
    partner: usize,
    prev: usize,
    next: usize,
}

/// A fixed-size bit set of operation indices (the memo key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Applies `action` to register state `state`: the new state if the action is legal.
fn step(state: Option<u64>, action: &Action) -> Option<Option<u64>> {
    match action {
        Action::Write(v) => Some(Some(*v)),
        Action::Read(seen) => (*seen == state).then_some(state),
    }
}

/// Wing–Gong with memoization over one register's operations.
fn check_register(ops: &[Op], initial: Option<u64>, limits: Limits) -> (Verdict, u64) {
    let n = ops.len();
    if n == 0 {
        return (
            Verdict::Ok {
                witness: Vec::new(),
            },
            0,
        );
    }
    // Events sorted by time; at equal times calls come before returns (operations touching at
    // an instant are concurrent). Unknown returns go after everything.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, true, i));
        events.push((op.ret.unwrap_or(u64::MAX), false, i));
    }
    events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // Entries 1..=2n are events; 0 is the head sentinel and 2n+1 the tail sentinel.
    let head = 0;
    let tail = 2 * n + 1;
    let mut list = vec![
        Entry {
            op: usize::MAX,
            is_call: false,
            partner: 0,
            prev: 0,
            next: 0,
        };
        2 * n + 2
    ];
    let mut ret_entry = vec![0usize; n];
    for (pos, &(_, is_call, op)) in events.iter().enumerate() {
        let idx = pos + 1;
        list[idx] = Entry {
            op,
            is_call,
            partner: 0,
            prev: idx - 1,
            next: idx + 1,
        };
        if !is_call {
            ret_entry[op] = idx;
        }
    }
    list[head].next = 1;
    list[tail].prev = 2 * n;
    for idx in 1..=2 * n {
        if list[idx].is_call {
            list[idx].partner = ret_entry[list[idx].op];
        }
    }

    let lift = |list: &mut Vec<Entry>, call: usize| {
        let ret = list[call].partner;
        let (p, nx) = (list[call].prev, list[call].next);
        list[p].next = nx;
        list[nx].prev = p;
        let (p, nx) = (list[ret].prev, list[ret].next);
        list[p].next = nx;
        list[nx].prev = p;
    };
    // Unlift in reverse order of lifting: the return first was removed last, so restore it
    // last... both entries keep their own prev/next, so re-linking each is enough when undone
    // in LIFO order.
    let unlift = |list: &mut Vec<Entry>, call: usize| {
        let ret = list[call].partner;
        let (p, nx) = (list[ret].prev, list[ret].next);
        list[p].next = ret;
        list[nx].prev = ret;
        let (p, nx) = (list[call].prev, list[call].next);
        list[p].next = call;
        list[nx].prev = call;
    };

    let mut state = initial;
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, Option<u64>)> = HashSet::new();
    // (call entry lifted, state before it)
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut stuck_at: Vec<usize> = Vec::new();
    let mut steps = 0u64;
    let mut entry = list[head].next;
    while list[head].next != tail {
        steps += 1;
        if steps > limits.max_steps {
            return (Verdict::Unknown, steps);
        }
        if list[entry].is_call {
            let op = list[entry].op;
            let next_state = step(state, &ops[op].action);
            let mut advanced = false;
            if let Some(s) = next_state {
                let mut bits = linearized.clone();
                bits.set(op);
                if cache.insert((bits.clone(), s)) {
                    stack.push((entry, state));
                    state = s;
                    linearized = bits;
                    lift(&mut list, entry);
                    entry = list[head].next;
                    advanced = true;
                }
            }
            if !advanced {
                entry = list[entry].next;
            }
        } else {
            // A return reached before its call was linearized: backtrack.
            if stack.len() >= longest.len() {
                longest = stack.iter().map(|&(e, _)| list[e].op).collect();
                stuck_at = minimal_calls(&list, head, tail);
            }
            let Some((call, prev_state)) = stack.pop() else {
                return (Verdict::Violation { longest, stuck_at }, steps);
            };
            state = prev_state;
            linearized.clear(list[call].op);
            unlift(&mut list, call);
            entry = list[call].next;
        }
    }
    let witness = stack.iter().map(|&(e, _)| list[e].op).collect();
    (Verdict::Ok { witness }, steps)
}

/// The calls before the first return in the list: the operations that could go next.
fn minimal_calls(list: &[Entry], head: usize, tail: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut e = list[head].next;
    while e != tail && list[e].is_call {
        out.push(list[e].op);
        e = list[e].next;
    }
    out
}

/// Checks that `order` (indices into `ops`) is a valid linearization: every operation once,
/// real-time order respected, register semantics from `initial`. For tests of the checker.
pub fn is_valid_linearization(ops: &[Op], initial: Option<u64>, order: &[usize]) -> bool {
    if order.len() != ops.len() {
        return false;
    }
    let mut seen = vec![false; ops.len()];
    for &i in order {
        if i >= ops.len() || seen[i] {
            return false;
        }
        seen[i] = true;
    }
    // Real time: if a returned before b was invoked, a precedes b.
    for (pa, &a) in order.iter().enumerate() {
        for &b in &order[..pa] {
            if let Some(ra) = ops[a].ret {
                if ra < ops[b].invoke {
                    return false;
                }
            }
        }
    }
    let mut state = initial;
    for &i in order {
        match step(state, &ops[i].action) {
            Some(s) => state = s,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: usize, invoke: u64, ret: Option<u64>, v: u64) -> Op {
        Op {
            key: "x".into(),
            client,
            invoke,
            ret,
            action: Action::Write(v),
        }
    }
    fn r(client: usize, invoke: u64, ret: u64, v: Option<u64>) -> Op {
        Op {
            key: "x".into(),
            client,
            invoke,
            ret: Some(ret),
            action: Action::Read(v),
        }
    }

    fn verdict(ops: &[Op]) -> Verdict {
        let rep = check(ops, Limits::default());
        assert_eq!(rep.keys.len(), 1);
        let k = &rep.keys[0];
        if let Verdict::Ok { witness } = &k.verdict {
            assert!(
                is_valid_linearization(&k.ops, None, witness),
                "witness {witness:?} is not a linearization"
            );
        }
        k.verdict.clone()
    }

    #[test]
    fn empty_and_sequential_histories_are_linearizable() {
        assert!(check(&[], Limits::default()).is_linearizable());
        let h = [
            r(0, 0, 1, None),
            w(0, 2, Some(3), 1),
            r(1, 4, 5, Some(1)),
            w(1, 6, Some(7), 2),
            r(0, 8, 9, Some(2)),
        ];
        assert!(matches!(verdict(&h), Verdict::Ok { .. }));
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_rejected() {
        // w(1) is acknowledged at 3; a read invoked at 4 still sees the old value.
        let h = [
            w(0, 0, Some(1), 1),
            w(0, 2, Some(3), 2),
            r(1, 4, 5, Some(1)),
        ];
        let Verdict::Violation { longest, stuck_at } = verdict(&h) else {
            panic!("stale read accepted");
        };
        assert_eq!(longest, vec![0, 1]);
        assert_eq!(stuck_at, vec![2]);
    }

    #[test]
    fn a_lost_acknowledged_write_is_rejected() {
        // Both writes acknowledged in sequence, then every later read sees neither.
        let h = [
            w(0, 0, Some(1), 1),
            w(1, 2, Some(3), 2),
            r(2, 4, 5, None),
            r(2, 6, 7, None),
        ];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn concurrent_writes_may_be_seen_in_either_order_but_not_both_ways() {
        // w1 and w2 overlap: a later read may see either…
        let either = |seen| {
            [
                w(0, 0, Some(10), 1),
                w(1, 1, Some(9), 2),
                r(2, 11, 12, Some(seen)),
            ]
        };
        assert!(matches!(verdict(&either(1)), Verdict::Ok { .. }));
        assert!(matches!(verdict(&either(2)), Verdict::Ok { .. }));
        // …but two sequential reads cannot see 1 then 2 and then 1 again.
        let mut flip = either(1).to_vec();
        flip.push(r(2, 13, 14, Some(2)));
        flip.push(r(2, 15, 16, Some(1)));
        assert!(matches!(verdict(&flip), Verdict::Violation { .. }));
    }

    #[test]
    fn a_read_of_a_value_never_written_is_rejected() {
        let h = [w(0, 0, Some(1), 1), r(1, 2, 3, Some(7))];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn a_read_may_see_a_concurrent_write_before_it_is_acknowledged() {
        let h = [
            w(0, 0, Some(10), 1),
            r(1, 2, 3, Some(1)),
            r(1, 4, 5, Some(1)),
        ];
        assert!(matches!(verdict(&h), Verdict::Ok { .. }));
        // Once a read saw the new value, a later read must not see the old one.
        let h = [w(0, 0, Some(10), 1), r(1, 2, 3, Some(1)), r(1, 4, 5, None)];
        assert!(matches!(verdict(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn an_unknown_write_may_have_happened_or_not() {
        // Never acknowledged: a later read may see it…
        let seen = [w(0, 0, None, 1), r(1, 5, 6, Some(1))];
        assert!(matches!(verdict(&seen), Verdict::Ok { .. }));
        // …or not…
        let unseen = [w(0, 0, None, 1), r(1, 5, 6, None)];
        assert!(matches!(verdict(&unseen), Verdict::Ok { .. }));
        // …but not before it was invoked, and not "on, off, on" without another write.
        let early = [r(1, 0, 1, Some(1)), w(0, 2, None, 1)];
        assert!(matches!(verdict(&early), Verdict::Violation { .. }));
        let flicker = [
            w(0, 0, None, 1),
            r(1, 5, 6, Some(1)),
            r(1, 7, 8, None),
            r(1, 9, 10, Some(1)),
        ];
        assert!(matches!(verdict(&flicker), Verdict::Violation { .. }));
    }

    #[test]
    fn registers_are_checked_independently_and_initial_values_count() {
        let mut a = r(0, 0, 1, Some(5));
        a.key = "a".into();
        let mut b = w(1, 0, Some(1), 1);
        b.key = "b".into();
        let mut b2 = r(1, 2, 3, Some(2));
        b2.key = "b".into();
        let init = BTreeMap::from([("a".to_string(), 5)]);
        let rep = check_with_initial(&[a.clone(), b.clone()], &init, Limits::default());
        assert!(rep.is_linearizable());
        // Without the initial value, "a" read 5 out of nowhere.
        assert!(!check(&[a.clone(), b.clone()], Limits::default()).is_linearizable());
        let rep = check_with_initial(&[a, b, b2], &init, Limits::default());
        let bad: Vec<&str> = rep.violations().map(|k| k.key.as_str()).collect();
        assert_eq!(bad, vec!["b"]);
    }

    #[test]
    fn the_step_limit_gives_unknown_not_a_verdict() {
        let h: Vec<Op> = (0..12).map(|i| w(i, 0, Some(100), i as u64)).collect();
        let rep = check(&h, Limits { max_steps: 3 });
        assert_eq!(rep.unknown().count(), 1);
        assert!(!rep.is_linearizable());
    }

    #[test]
    fn many_concurrent_clients_finish_fast_thanks_to_the_memo() {
        // 10 clients, 40 rounds each: each round every client writes its own value then reads
        // the last writer's value; all overlapping within a round. Without memoization the
        // search is factorial in the concurrency; with it this takes milliseconds.
        let mut h = Vec::new();
        for round in 0..40u64 {
            let base = round * 100;
            for c in 0..10usize {
                h.push(w(c, base, Some(base + 50), round * 10 + c as u64));
            }
            for c in 0..10usize {
                h.push(r(c, base + 60, base + 70, Some(round * 10 + 9)));
            }
        }
        let rep = check(&h, Limits::default());
        assert!(rep.is_linearizable());
        assert!(rep.keys[0].steps < 1_000_000, "{} steps", rep.keys[0].steps);
        // One stale read at the end (round 39's readers see round 38's last value) is caught.
        h.push(r(0, 40 * 100, 40 * 100 + 1, Some(38 * 10 + 9)));
        assert!(!check(&h, Limits::default()).is_linearizable());
    }
}
