//! The chaos soak (issue 20): a real lab hit by seeded faults while clients write, read, scale
//! and update; the invariants are checked and printed as a report (see [`soak`]). The pure
//! parts — the fault [`plan`], the slot and resource [`check`]s — have their unit tests here;
//! the register history goes to [`crate::linearizability`].

pub mod check;
pub mod plan;
pub mod soak;

pub use soak::{run, Config, Outcome};
