//! [`Shared`]: one copy of a value that many records hold, such as the frozen spec every task
//! of a rollout carries. Cloning it is a reference count; writing through it copies the value
//! first if another record still holds it (copy on write), so sharing never changes what any
//! record holds. It serializes as the value itself: the formats (raft entries, snapshots, the
//! wire) do not change, and a decoded record holds its own copy until
//! [`crate::store::Store::share_task_specs`] folds equal ones together.
//!
//! Why: at 150,000 tasks (issue 20) the tasks' own copies of their service's spec were most
//! of the store, and every copy-on-write of the task map deep-cloned them.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value held by many records (see the module doc).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Shared<T>(Arc<T>);

impl<T> Shared<T> {
    /// Whether `a` and `b` are the same copy (not merely equal values).
    pub fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl<T> From<T> for Shared<T> {
    fn from(v: T) -> Self {
        Shared(Arc::new(v))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone> DerefMut for Shared<T> {
    /// Copies the value first when another record holds it.
    fn deref_mut(&mut self) -> &mut T {
        Arc::make_mut(&mut self.0)
    }
}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Shared::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_writes_copy_and_the_format_is_the_value() {
        let a = Shared::from(vec![1, 2]);
        let mut b = a.clone();
        assert!(Shared::same(&a, &b));
        b.push(3);
        assert!(!Shared::same(&a, &b), "a write copies a shared value");
        assert_eq!((*a).clone(), vec![1, 2]);
        assert_eq!(serde_json::to_string(&b).unwrap(), "[1,2,3]");
        let c: Shared<Vec<i32>> = serde_json::from_str("[1,2]").unwrap();
        assert_eq!(c, a);
        assert!(!Shared::same(&c, &a));
    }
}
