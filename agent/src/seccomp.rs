//! The seccomp profile of containers and RUN steps: Docker's default profile
//! (moby `profiles/seccomp/default.json`) for x86_64, x86 and x32, as an OCI `linux.seccomp`.
//!
//! It allows what ordinary programs use and answers everything else with EPERM: no user,
//! mount or other namespaces (`unshare`, `setns`, `clone` with `CLONE_NEW*`; `clone3` says
//! ENOSYS so libcs fall back to `clone`), no `mount`, `keyctl`, `bpf`, `perf_event_open`,
//! `userfaultfd`, kernel modules, `kexec`, `io_uring`, AF_VSOCK sockets or odd `personality`
//! values. Docker's groups conditioned on capabilities are resolved for Rudder's fixed
//! default capability set (`crate::bundle::capabilities`): only `chroot` (CAP_SYS_CHROOT)
//! is in. A service opts out with `security_opt: [seccomp=unconfined]`.
//!
//! The profile is data (`seccomp_default.json`, the OCI config form), compiled in and parsed
//! once; a unit test keeps it parseable and its key denials in place. For crun the agent also
//! compiles it once to its BPF program ([`Precompiled`]), which crun loads without compiling.

use std::sync::OnceLock;

mod bpf;
pub use bpf::{Precompiled, ANNOTATION};

use oci_spec::runtime::LinuxSeccomp;

const PROFILE: &str = include_str!("seccomp_default.json");

/// The spec option that runs a task without a profile.
pub const UNCONFINED: &str = "seccomp=unconfined";

/// Docker's default profile.
pub fn default_profile() -> LinuxSeccomp {
    static P: OnceLock<LinuxSeccomp> = OnceLock::new();
    P.get_or_init(|| serde_json::from_str(PROFILE).expect("the compiled-in seccomp profile"))
        .clone()
}

/// The profile for a task with these `security_opt`s: none when it opts out.
pub fn for_task(security_opt: &[String]) -> Option<LinuxSeccomp> {
    (!security_opt.iter().any(|o| o == UNCONFINED)).then(default_profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{Arch, LinuxSeccompAction};

    fn allowed(p: &LinuxSeccomp, name: &str) -> bool {
        p.syscalls().as_ref().unwrap().iter().any(|s| {
            s.action() == LinuxSeccompAction::ScmpActAllow && s.names().iter().any(|n| n == name)
        })
    }

    #[test]
    fn the_default_profile_parses_and_denies_what_docker_denies() {
        let p = default_profile();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        assert_eq!(
            p.architectures().clone().unwrap(),
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
        );
        for ok in [
            "read", "execve", "openat2", "clone", "socket", "chroot", "setuid",
        ] {
            assert!(allowed(&p, ok), "{ok} should be allowed");
        }
        for denied in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "keyctl",
            "add_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "init_module",
            "kexec_load",
            "io_uring_setup",
            "open_by_handle_at",
            "reboot",
            "pivot_root",
        ] {
            assert!(!allowed(&p, denied), "{denied} should be denied");
        }
        // clone only without namespace flags.
        let clone = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names() == &["clone".to_string()])
            .unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!(arg.value(), 0x7E02_0000);
        assert_eq!(arg.value_two(), Some(0));
        assert!(for_task(&[]).is_some());
        assert!(for_task(&[UNCONFINED.to_string()]).is_none());
    }
}
