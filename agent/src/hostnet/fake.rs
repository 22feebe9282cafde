//! A recording [`HostNet`] for tests: it remembers every call, answers `observe` from a
//! settable [`Observed`], and can be told to fail an op.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{HostNet, HostNetError, NetOp, Ns, Observed};

/// One call made to the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Observe(Ns),
    Apply(Ns, Vec<NetOp>),
    LoadNft(String),
    CreateNetns(std::path::PathBuf),
}

#[derive(Default)]
pub struct FakeHostNet {
    calls: Mutex<Vec<Call>>,
    observed: Mutex<BTreeMap<Ns, Observed>>,
    /// An op whose `Display` text contains this fails (with EPERM).
    fail_on: Mutex<Option<String>>,
}

impl FakeHostNet {
    pub fn new() -> FakeHostNet {
        FakeHostNet::default()
    }

    /// What `observe(ns)` answers from now on.
    pub fn set_observed(&self, ns: Ns, seen: Observed) {
        self.observed.lock().expect("fake lock").insert(ns, seen);
    }

    /// Makes the first op whose text contains `needle` fail.
    pub fn fail_on(&self, needle: &str) {
        *self.fail_on.lock().expect("fake lock") = Some(needle.to_string());
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("fake lock").clone()
    }

    /// Every op applied in `ns`, as `ip`-like text, in order.
    pub fn ops(&self, ns: &Ns) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Apply(n, ops) if &n == ns => Some(ops),
                _ => None,
            })
            .flatten()
            .map(|o| o.to_string())
            .collect()
    }
}

#[async_trait::async_trait]
impl HostNet for FakeHostNet {
    async fn observe(&self, ns: &Ns) -> Result<Observed, HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::Observe(ns.clone()));
        Ok(self
            .observed
            .lock()
            .expect("fake lock")
            .get(ns)
            .cloned()
            .unwrap_or_default())
    }

    async fn apply(&self, ns: &Ns, ops: &[NetOp]) -> Result<(), HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::Apply(ns.clone(), ops.to_vec()));
        let fail = self.fail_on.lock().expect("fake lock").clone();
        if let Some(needle) = fail {
            if let Some(op) = ops.iter().find(|o| o.to_string().contains(&needle)) {
                return Err(HostNetError::Netlink {
                    op: op.to_string(),
                    link: op.link().to_string(),
                    ns: ns.to_string(),
                    source: std::io::Error::from_raw_os_error(libc::EPERM),
                });
            }
        }
        Ok(())
    }

    async fn load_nft(&self, ruleset: &str) -> Result<(), HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::LoadNft(ruleset.to_string()));
        Ok(())
    }

    /// Records the call and makes the file (so the path exists, as a real one would).
    async fn create_netns(&self, path: &std::path::Path) -> Result<(), HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::CreateNetns(path.to_path_buf()));
        std::fs::File::create(path).map_err(|source| HostNetError::Netns {
            ns: path.display().to_string(),
            source,
        })?;
        Ok(())
    }
}
