//! Field-level difference of two specs in their JSON form: what `rctl apply --dry-run` and
//! `rctl diff` print for an object that an apply updates.
//!
//! Invariants:
//! - Pure: takes two `serde_json::Value`s, returns the changed leaves in path order.
//! - An absent field and a `null` one are the same (both "unset"), so a spec that gains a
//!   `None` default shows no change.
//! - Objects are compared key by key and arrays of the same length element by element; an
//!   array whose length changes is reported whole (its elements have no identity to match on).

use serde_json::Value;

/// One changed field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where, as `a.b[0].c` (empty for the whole value).
    pub path: String,
    /// Its value before (`None`: unset).
    pub old: Option<Value>,
    /// Its value after (`None`: unset).
    pub new: Option<Value>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or("(unset)".to_string(), Value::to_string);
        let path = if self.path.is_empty() {
            "(spec)"
        } else {
            &self.path
        };
        write!(f, "{path}: {} -> {}", show(&self.old), show(&self.new))
    }
}

/// The changed leaves from `old` to `new`, in path order.
pub fn diff(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    walk("", some(old), some(new), &mut out);
    out
}

/// `None` for `null` (unset).
fn some(v: &Value) -> Option<&Value> {
    (!v.is_null()).then_some(v)
}

fn walk(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<Change>) {
    match (old, new) {
        (None, None) => {}
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(&p, a.get(k).and_then(some), b.get(k).and_then(some), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                walk(&format!("{path}[{i}]"), some(x), some(y), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Change {
            path: path.to_string(),
            old: a.cloned(),
            new: b.cloned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(old: Value, new: Value) -> Vec<String> {
        diff(&old, &new).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Value, Value, Vec<&str>)> = vec![
            ("equal", json!({"a": 1}), json!({"a": 1}), vec![]),
            (
                "scalar changed",
                json!({"image": "a:1", "replicas": 1}),
                json!({"image": "a:2", "replicas": 3}),
                vec![r#"image: "a:1" -> "a:2""#, "replicas: 1 -> 3"],
            ),
            (
                "added and removed",
                json!({"a": 1}),
                json!({"b": true}),
                vec!["a: 1 -> (unset)", "b: (unset) -> true"],
            ),
            ("null is unset", json!({"a": null}), json!({}), vec![]),
            (
                "nested",
                json!({"r": {"limits": {"cpu": 1, "mem": 2}}}),
                json!({"r": {"limits": {"cpu": 2, "mem": 2}}}),
                vec!["r.limits.cpu: 1 -> 2"],
            ),
            (
                "array same length by element",
                json!({"ports": [{"p": 80}, {"p": 443}]}),
                json!({"ports": [{"p": 80}, {"p": 8443}]}),
                vec!["ports[1].p: 443 -> 8443"],
            ),
            (
                "array length changed whole",
                json!({"env": ["A=1"]}),
                json!({"env": ["A=1", "B=2"]}),
                vec![r#"env: ["A=1"] -> ["A=1","B=2"]"#],
            ),
            (
                "type changed",
                json!({"a": {"x": 1}}),
                json!({"a": [1]}),
                vec![r#"a: {"x":1} -> [1]"#],
            ),
            ("root scalar", json!(1), json!(2), vec!["(spec): 1 -> 2"]),
        ];
        for (name, old, new, want) in cases {
            assert_eq!(lines(old, new), want, "{name}");
        }
    }
}
