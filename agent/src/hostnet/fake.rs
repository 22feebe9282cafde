//! A recording [`HostNet`] for tests: it remembers every call, answers `observe` from a
//! settable [`Observed`], and can be told to fail an op.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{HostNet, HostNetError, NetOp, Ns, Observed, Occupancy};

/// One call made to the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Observe(Ns),
    Apply(Ns, Vec<NetOp>),
    LoadNft(String),
    CreateNetns(std::path::PathBuf),
    MoveNetns(std::path::PathBuf, std::path::PathBuf),
    Occupancy(std::path::PathBuf),
    DeleteConntrack(Vec<super::conntrack::CtFilter>),
}

#[derive(Default)]
pub struct FakeHostNet {
    calls: Mutex<Vec<Call>>,
    observed: Mutex<BTreeMap<Ns, Observed>>,
    /// An op whose `Display` text contains this fails (with EPERM).
    fail_on: Mutex<Option<String>>,
    /// What `occupancy` answers.
    occupied: Mutex<Occupancy>,
    /// What `observe` answers for a namespace not given by `set_observed`.
    observed_else: Mutex<Observed>,
}

impl FakeHostNet {
    pub fn new() -> FakeHostNet {
        FakeHostNet::default()
    }

    /// What `observe(ns)` answers from now on.
    pub fn set_observed(&self, ns: Ns, seen: Observed) {
        self.observed.lock().expect("fake lock").insert(ns, seen);
    }

    /// What `observe` answers for any namespace not given by [`FakeHostNet::set_observed`].
    pub fn set_observed_else(&self, seen: Observed) {
        *self.observed_else.lock().expect("fake lock") = seen;
    }

    /// Makes the first op whose text contains `needle` fail.
    pub fn fail_on(&self, needle: &str) {
        *self.fail_on.lock().expect("fake lock") = Some(needle.to_string());
    }

    /// What `occupancy` answers from now on.
    pub fn set_occupied(&self, o: Occupancy) {
        *self.occupied.lock().expect("fake lock") = o;
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
            .unwrap_or_else(|| self.observed_else.lock().expect("fake lock").clone()))
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

    /// Records the call and renames the file.
    async fn move_netns(
        &self,
        from: &std::path::Path,
        to: &std::path::Path,
    ) -> Result<(), HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::MoveNetns(from.to_path_buf(), to.to_path_buf()));
        std::fs::rename(from, to).map_err(|source| HostNetError::Netns {
            ns: from.display().to_string(),
            source,
        })
    }

    async fn occupancy(&self, path: &std::path::Path) -> Result<Occupancy, HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::Occupancy(path.to_path_buf()));
        Ok(*self.occupied.lock().expect("fake lock"))
    }

    async fn delete_conntrack(
        &self,
        filters: &[super::conntrack::CtFilter],
    ) -> Result<usize, HostNetError> {
        self.calls
            .lock()
            .expect("fake lock")
            .push(Call::DeleteConntrack(filters.to_vec()));
        Ok(0)
    }
}
