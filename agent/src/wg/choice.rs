//! Which WireGuard implementation drives a host's interface: a pure decision over what the
//! host shows (the interface's current kind, whether the kernel module is loaded) and the
//! operator's preference, so that every combination is table-tested without root.
//!
//! Invariants: an existing interface decides for itself (a kernel WireGuard link stays kernel,
//! a TUN device is a running or restartable userspace device, adopted as such), since replacing
//! it would cut every session; anything else of that name is refused, never deleted. A missing
//! interface is made kernel WireGuard when the kernel can (creating the link also loads the
//! module, so an unloaded module is still worth a try), unless the operator asked for
//! userspace; only a failed kernel link falls back to userspace, and only where the operator
//! did not insist on the kernel.

use super::Backend;

/// The interface as the host shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// No link of that name.
    Missing,
    /// A kernel WireGuard link.
    WireGuard,
    /// A TUN device (userspace WireGuard's).
    Tun,
    /// Something else; the text says what.
    Other(String),
}

/// Whether the kernel module is loaded (`/sys/module/wireguard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    /// Loaded (or built in).
    Loaded,
    /// Not loaded now: creating a link may still load it.
    NotLoaded,
}

/// The operator's preference (`RUDDER_WG_BACKEND`: `kernel`, `userspace`, or unset/`auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    /// Kernel where it works, else userspace.
    #[default]
    Auto,
    /// Kernel only: no userspace fallback.
    Kernel,
    /// Userspace even where the kernel has WireGuard.
    Userspace,
}

impl Preference {
    /// Parses `RUDDER_WG_BACKEND`'s value; unknown text is an error naming the choices.
    pub fn parse(v: Option<&str>) -> Result<Preference, String> {
        match v.map(str::trim) {
            None | Some("") | Some("auto") => Ok(Preference::Auto),
            Some("kernel") => Ok(Preference::Kernel),
            Some("userspace") => Ok(Preference::Userspace),
            Some(other) => Err(format!(
                "RUDDER_WG_BACKEND={other:?}: expected auto, kernel or userspace"
            )),
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Use the existing interface with this backend.
    Adopt(Backend),
    /// Create a kernel WireGuard link, then decide with [`after_kernel_add`].
    TryKernel,
    /// Create the userspace device.
    Userspace,
    /// Refuse: the reason says why.
    Refuse(String),
}

/// The decision before any link is made.
pub fn choose(existing: &Existing, module: Module, pref: Preference) -> Choice {
    match (existing, pref) {
        (Existing::Other(detail), _) => Choice::Refuse(format!(
            "exists and is not a WireGuard or TUN device: {detail}"
        )),
        (Existing::WireGuard, Preference::Userspace) => Choice::Refuse(
            "is a kernel WireGuard link but userspace was asked for (RUDDER_WG_BACKEND); \
             delete the link or unset the preference"
                .into(),
        ),
        (Existing::Tun, Preference::Kernel) => Choice::Refuse(
            "is a userspace WireGuard TUN device but the kernel was asked for \
             (RUDDER_WG_BACKEND); delete the device or unset the preference"
                .into(),
        ),
        (Existing::WireGuard, _) => Choice::Adopt(Backend::Kernel),
        (Existing::Tun, _) => Choice::Adopt(Backend::Userspace),
        (Existing::Missing, Preference::Userspace) => Choice::Userspace,
        // Either way the link is tried: making it loads the module on demand.
        (Existing::Missing, Preference::Kernel | Preference::Auto) => {
            let _ = module;
            Choice::TryKernel
        }
    }
}

/// The decision once a kernel link was tried: `added` says whether it was made; `module` is
/// what the host showed, for the message.
pub fn after_kernel_add(added: bool, module: Module, pref: Preference) -> Result<Backend, String> {
    match (added, pref) {
        (true, _) => Ok(Backend::Kernel),
        (false, Preference::Kernel) => Err(format!(
            "the kernel refused a WireGuard link ({}) and RUDDER_WG_BACKEND=kernel forbids \
             the userspace fallback",
            match module {
                Module::Loaded => "module loaded",
                Module::NotLoaded => "module not loaded and not loadable",
            }
        )),
        (false, _) => Ok(Backend::Userspace),
    }
}

/// What the host shows about the module.
pub fn module_state(sys_module: &std::path::Path) -> Module {
    if sys_module.join("wireguard").exists() {
        Module::Loaded
    } else {
        Module::NotLoaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Existing::*;
    use Module::*;
    use Preference as P;

    #[test]
    fn choose_table() {
        let other = || Other("a link of kind \"bridge\"".into());
        let cases: Vec<(Existing, Module, Preference, &str)> = vec![
            (Missing, Loaded, P::Auto, "try-kernel"),
            (Missing, NotLoaded, P::Auto, "try-kernel"),
            (Missing, Loaded, P::Kernel, "try-kernel"),
            (Missing, NotLoaded, P::Kernel, "try-kernel"),
            (Missing, Loaded, P::Userspace, "userspace"),
            (Missing, NotLoaded, P::Userspace, "userspace"),
            (WireGuard, Loaded, P::Auto, "adopt-kernel"),
            (WireGuard, Loaded, P::Kernel, "adopt-kernel"),
            (WireGuard, Loaded, P::Userspace, "refuse"),
            (Tun, NotLoaded, P::Auto, "adopt-userspace"),
            (Tun, Loaded, P::Auto, "adopt-userspace"),
            (Tun, Loaded, P::Userspace, "adopt-userspace"),
            (Tun, Loaded, P::Kernel, "refuse"),
            (other(), Loaded, P::Auto, "refuse"),
            (other(), NotLoaded, P::Userspace, "refuse"),
        ];
        for (existing, module, pref, want) in cases {
            let got = match choose(&existing, module, pref) {
                Choice::Adopt(Backend::Kernel) => "adopt-kernel",
                Choice::Adopt(Backend::Userspace) => "adopt-userspace",
                Choice::TryKernel => "try-kernel",
                Choice::Userspace => "userspace",
                Choice::Refuse(_) => "refuse",
            };
            assert_eq!(got, want, "{existing:?} {module:?} {pref:?}");
        }
    }

    #[test]
    fn after_kernel_add_table() {
        assert_eq!(after_kernel_add(true, Loaded, P::Auto), Ok(Backend::Kernel));
        assert_eq!(
            after_kernel_add(true, NotLoaded, P::Kernel),
            Ok(Backend::Kernel)
        );
        assert_eq!(
            after_kernel_add(false, NotLoaded, P::Auto),
            Ok(Backend::Userspace)
        );
        let e = after_kernel_add(false, NotLoaded, P::Kernel).unwrap_err();
        assert!(e.contains("forbids the userspace fallback"), "{e}");
        assert!(after_kernel_add(false, Loaded, P::Kernel).is_err());
    }

    #[test]
    fn preference_parse() {
        assert_eq!(Preference::parse(None), Ok(P::Auto));
        assert_eq!(Preference::parse(Some("")), Ok(P::Auto));
        assert_eq!(Preference::parse(Some("auto")), Ok(P::Auto));
        assert_eq!(Preference::parse(Some(" kernel ")), Ok(P::Kernel));
        assert_eq!(Preference::parse(Some("userspace")), Ok(P::Userspace));
        assert!(Preference::parse(Some("boringtun"))
            .unwrap_err()
            .contains("expected auto, kernel or userspace"));
    }

    #[test]
    fn module_state_reads_sys_module() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(module_state(dir.path()), NotLoaded);
        std::fs::create_dir(dir.path().join("wireguard")).unwrap();
        assert_eq!(module_state(dir.path()), Loaded);
    }
}
