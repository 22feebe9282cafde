//! `rctl exec [-i] [-t] TASK -- CMD…`: runs a command in a running task's container, on
//! whichever host it runs (the controller relays to that host's agent), and exits with the
//! command's exit code.
//!
//! `-i` streams stdin to the command (its end becomes the command's end of file); `-t` runs it
//! on a terminal whose size follows the local one; with both, while attached, the local
//! terminal (when stdin is one) is in raw mode, so every key, ^C included, goes to the
//! command. The terminal is restored however the command ends, errors included.

use std::io::{IsTerminal, Read, Write};

use rudder_proto::v1::exec_input::Msg as In;
use rudder_proto::v1::exec_output::Msg as Out;
use rudder_proto::v1::{ExecInput, ExecStart, TerminalSize};
use tokio::sync::mpsc;

use crate::context::Context;

/// The local terminal in raw mode; restored when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSADRAIN,
            &self.saved,
        );
    }
}

/// The size of the terminal on stdout (or stdin), if either is one.
fn terminal_size() -> Option<TerminalSize> {
    for fd in [1, 0] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes a winsize to the pointer, valid for the call.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        if ok && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(TerminalSize {
                rows: ws.ws_row.into(),
                cols: ws.ws_col.into(),
            });
        }
    }
    None
}

fn input(msg: In) -> ExecInput {
    ExecInput { msg: Some(msg) }
}

/// How `rctl exec` runs its command, beside the task and the command itself.
#[derive(Debug, Default, Clone)]
pub struct ExecOptions<'a> {
    /// Stream stdin to the command.
    pub interactive: bool,
    /// On a terminal.
    pub tty: bool,
    /// Another user than the task's (`user[:group]`).
    pub user: Option<&'a str>,
    /// `KEY=VALUE`, or `KEY` for this machine's value of KEY (left out when unset), as
    /// `docker exec --env`.
    pub env: &'a [String],
    /// Another working directory than the task's.
    pub workdir: Option<&'a str>,
}

/// `--env` entries as sent: `KEY` alone takes this machine's value (and is left out when
/// unset here), as `docker exec -e KEY` does.
fn env_entries(env: &[String], lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    env.iter()
        .filter_map(|e| match e.contains('=') {
            true => Some(e.clone()),
            false => lookup(e).map(|v| format!("{e}={v}")),
        })
        .collect()
}

/// Runs `command` in `task`; returns its exit code.
pub async fn run(
    ctx: &Context,
    task: &str,
    command: &[String],
    o: ExecOptions<'_>,
) -> anyhow::Result<i32> {
    let ExecOptions {
        interactive,
        tty,
        user,
        env,
        workdir,
    } = o;
    if command.is_empty() {
        anyhow::bail!("no command given: rctl exec TASK -- CMD…");
    }
    let mut client = crate::connect(ctx).await?;
    let (tx, rx) = mpsc::channel(16);
    tx.send(input(In::Start(ExecStart {
        task: task.to_string(),
        cmd: command.to_vec(),
        tty,
        stdin: interactive,
        size: if tty { terminal_size() } else { None },
        user: user.unwrap_or_default().to_string(),
        env: env_entries(env, |k| std::env::var(k).ok()),
        workdir: workdir.unwrap_or_default().to_string(),
    })))
    .await?;
    let mut outputs = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(crate::status_err)?
        .into_inner();
    // Attached: from here until the end, the local terminal is raw when keys go to the
    // command (without -i, ^C stays local and ends rctl, which ends the command).
    let _raw = if tty && interactive && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if interactive {
        let tx = tx.clone();
        // A plain thread: reading stdin blocks, and must not hold up the runtime's exit.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(input(In::CloseStdin(true)));
                        return;
                    }
                    Ok(n) => {
                        if tx
                            .blocking_send(input(In::Stdin(buf[..n].to_vec())))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }
    if tty && terminal_size().is_some() {
        let tx = tx.clone();
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some(size) = terminal_size() {
                    if tx.send(input(In::Resize(size))).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let Some(msg) = outputs.message().await.map_err(crate::status_err)? else {
            anyhow::bail!("exec: the connection ended before the command did");
        };
        match msg.msg {
            Some(Out::Stdout(b)) => {
                stdout.write_all(&b)?;
                stdout.flush()?;
            }
            Some(Out::Stderr(b)) => {
                stderr.write_all(&b)?;
                stderr.flush()?;
            }
            Some(Out::ExitCode(code)) => return Ok(code),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_key_takes_this_machines_value_or_is_left_out() {
        let env = [
            "A=1".to_string(),
            "HOME".into(),
            "UNSET".into(),
            "B=".into(),
        ];
        let lookup = |k: &str| (k == "HOME").then(|| "/root".to_string());
        assert_eq!(env_entries(&env, lookup), ["A=1", "HOME=/root", "B="]);
    }
}
