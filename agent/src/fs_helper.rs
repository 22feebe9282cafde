//! `rudder-agent fs-helper --root ROOT --expect ROOTFS pack PATH | unpack DEST`: the only
//! code that touches a container's files for `rctl cp`. A short-lived child of the agent
//! (dispatched before any async runtime): it chroots into the container's root —
//! `/proc/<init pid>/root`, so the container's own mounts are seen as the container sees them
//! — and then writes a tar of PATH on stdout, or unpacks the tar on stdin at DEST
//! (`rudder_image::copy` rules).
//!
//! Invariants: the root is opened once and checked to be the container's root filesystem (the
//! same inode as its bundle's `rootfs` mount), then entered through that open directory, so a
//! pid reused meanwhile cannot make it another process's root; after the chroot nothing
//! outside the container's root can be named, so symlinks and `..` inside the container
//! resolve inside it, whatever the container put there.
//!
//! Exit codes: 0 done; 2 a path does not exist (stderr: the path); 1 anything else (stderr:
//! the message).

use std::io::{BufReader, BufWriter};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rudder_image::copy::{self, CopyError, Layout};

/// Exit code for a missing path (its name on stderr).
pub const EXIT_NOT_FOUND: i32 = 2;

/// `rudder-agent fs-helper`'s arguments: what to do inside a container's root.
#[derive(Debug, Clone, clap::Args)]
pub struct HelperArgs {
    /// The container's root: `/proc/<init pid>/root`.
    #[arg(long)]
    pub root: PathBuf,
    /// The container's root filesystem as the host sees it (`<container dir>/bundle/rootfs`);
    /// `root` must be the same directory.
    #[arg(long)]
    pub expect: PathBuf,
    /// The operation.
    #[command(subcommand)]
    pub op: Op,
}

/// What the helper does, in the container's mount namespace.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Op {
    /// Write a tar of PATH (one top-level member named after it) on stdout.
    Pack {
        /// The path in the container.
        path: String,
        /// Pack what a symlink at PATH points to, not the link.
        #[arg(long)]
        follow_link: bool,
    },
    /// Unpack the tar on stdin at DEST.
    Unpack {
        /// The directory in the container.
        dest: String,
        /// The top-level directory's contents go into DEST.
        #[arg(long)]
        contents: bool,
        /// Members as named, into the directory DEST.
        #[arg(long, conflicts_with = "contents")]
        raw: bool,
        /// Keep the members' owners (uid and gid) instead of making them root's.
        #[arg(long)]
        owners: bool,
    },
}

impl HelperArgs {
    /// The command that runs this helper: the agent's own executable (`agent_exe`) with
    /// [`to_args`](Self::to_args); stdio is the caller's to set. The one launcher of the
    /// helper (cp, build's COPY, volume copies).
    pub fn command(&self, agent_exe: &std::path::Path) -> std::process::Command {
        let mut cmd = std::process::Command::new(agent_exe);
        cmd.args(self.to_args());
        cmd
    }

    /// The agent's command line for this helper.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "fs-helper".to_string(),
            "--root".into(),
            self.root.display().to_string(),
            "--expect".into(),
            self.expect.display().to_string(),
        ];
        match &self.op {
            Op::Pack { path, follow_link } => {
                v.push("pack".into());
                if *follow_link {
                    v.push("--follow-link".into());
                }
                v.extend(["--".into(), path.clone()]);
            }
            Op::Unpack {
                dest,
                contents,
                raw,
                owners,
            } => {
                v.push("unpack".into());
                if *owners {
                    v.push("--owners".into());
                }
                if *contents {
                    v.push("--contents".into());
                }
                if *raw {
                    v.push("--raw".into());
                }
                v.extend(["--".into(), dest.clone()]);
            }
        }
        v
    }
}

/// A path inside the container: relative ones are taken from its root, as `docker cp` does.
fn in_root(p: &str) -> PathBuf {
    Path::new("/").join(p)
}

/// Enters the container's root: opened once, checked, then made the root through that open
/// directory.
fn enter(root: &Path, expect: &Path) -> Result<(), String> {
    let dir = std::fs::File::open(root).map_err(|e| format!("open {}: {e}", root.display()))?;
    let (got, want) = (
        dir.metadata()
            .map_err(|e| format!("stat {}: {e}", root.display()))?,
        std::fs::metadata(expect).map_err(|e| format!("stat {}: {e}", expect.display()))?,
    );
    if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
        return Err(format!(
            "{} is not the container's root filesystem (it stopped?)",
            root.display()
        ));
    }
    nix::unistd::fchdir(&dir).map_err(|e| format!("fchdir: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Entry point of `rudder-agent fs-helper`. Never returns.
pub fn main(args: &HelperArgs) -> ! {
    let res = enter(&args.root, &args.expect)
        .map_err(|e| (1, e))
        .and_then(|()| {
            run(&args.op).map_err(|e| match e {
                CopyError::NotFound(p) => (EXIT_NOT_FOUND, p),
                e => (1, e.to_string()),
            })
        });
    match res {
        Ok(()) => std::process::exit(0),
        Err((code, msg)) => {
            eprint!("{msg}");
            std::process::exit(code)
        }
    }
}

fn run(op: &Op) -> Result<(), CopyError> {
    match op {
        Op::Pack { path, follow_link } => {
            let p = in_root(path);
            let out = BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
            copy::pack(&p, &copy::top_name(&p), *follow_link, out)?;
            Ok(())
        }
        Op::Unpack {
            dest,
            contents,
            raw,
            owners,
        } => {
            let layout = match (*contents, *raw) {
                (true, _) => Layout::Contents,
                (_, true) => Layout::Raw,
                _ => Layout::Named,
            };
            // Keep a trailing slash: it says DEST must be a directory.
            let mut d = in_root(dest).into_os_string();
            if dest.ends_with('/') && !d.to_string_lossy().ends_with('/') {
                d.push("/");
            }
            let input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
            copy::unpack_owned(input, Path::new(&d), layout, true, *owners)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        FsHelper(HelperArgs),
    }

    fn round_trip(op: Op) {
        let args = HelperArgs {
            root: "/proc/1/root".into(),
            expect: "/c/bundle/rootfs".into(),
            op,
        };
        let mut argv = vec!["rudder-agent".to_string()];
        argv.extend(args.to_args());
        let Cmd::FsHelper(parsed) = Cli::try_parse_from(&argv).unwrap().cmd;
        assert_eq!(format!("{parsed:?}"), format!("{args:?}"), "{argv:?}");
    }

    #[test]
    fn the_command_line_parses_back() {
        round_trip(Op::Pack {
            path: "-odd name".into(),
            follow_link: true,
        });
        round_trip(Op::Pack {
            path: "/etc".into(),
            follow_link: false,
        });
        round_trip(Op::Unpack {
            dest: "/tmp/".into(),
            contents: true,
            raw: false,
            owners: true,
        });
        round_trip(Op::Unpack {
            dest: "x".into(),
            contents: false,
            raw: true,
            owners: false,
        });
    }

    #[test]
    fn a_root_that_is_not_the_container_s_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("a")).unwrap();
        std::fs::create_dir(t.path().join("b")).unwrap();
        let e = enter(&t.path().join("a"), &t.path().join("b")).unwrap_err();
        assert!(e.contains("is not the container's root filesystem"), "{e}");
    }
}
