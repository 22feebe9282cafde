//! `rctl login HOST [-u USER] [--password-stdin] [--insecure]` and `rctl logout HOST`: the
//! credentials `rctl image push/pull` use for registries outside the cluster (the cluster's own
//! registry needs none: rctl reaches it with the context's admin certificate).
//!
//! They are kept in `auth.json` beside the default context: `$RUDDER_CONFIG/auth.json` when
//! `RUDDER_CONFIG` names a directory, else `~/.rudder/auth.json`, mode 0600, in docker's
//! `{"auths": {"HOST": {"auth": base64(user:password)}}}` layout. HOST is `host[:port]`
//! exactly as image references name it. A login is checked against the registry (`GET /v2/`
//! answering its challenge) before anything is stored.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use rudder_image::{AuthFile, Credentials, RegistryClient};

/// Where credentials are stored: `$RUDDER_CONFIG/auth.json`, else `~/.rudder/auth.json`.
pub fn auth_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUDDER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("auth.json");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".rudder").join("auth.json")
}

/// The credentials stored for `host`, if any.
pub fn stored_credentials(host: &str) -> anyhow::Result<Option<Credentials>> {
    Ok(AuthFile::load(&auth_path())?.get(host))
}

pub async fn login(
    host: &str,
    username: Option<&str>,
    password_stdin: bool,
    insecure: bool,
) -> anyhow::Result<()> {
    check_host(host)?;
    let username = match username {
        Some(u) => u.to_string(),
        None if password_stdin => {
            anyhow::bail!("login {host}: --password-stdin needs the user name (-u USER)")
        }
        None => prompt("Username: ")?,
    };
    anyhow::ensure!(!username.is_empty(), "login {host}: empty user name");
    anyhow::ensure!(
        !username.contains(':'),
        "login {host}: a user name cannot contain ':'"
    );
    let password = if password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the password from stdin")?;
        s.trim_end_matches(['\n', '\r']).to_string()
    } else {
        read_password("Password: ")?
    };
    anyhow::ensure!(!password.is_empty(), "login {host}: empty password");
    let credentials = Credentials::new(username, password);

    let client = RegistryClient::remote(host, insecure, Some(credentials.clone()))?;
    client
        .ping()
        .await
        .map_err(|e| super::image::explain_remote(e, host, insecure))?;

    let path = auth_path();
    let mut file = AuthFile::load(&path)?;
    file.set(host, &credentials);
    file.save(&path)?;
    println!(
        "login succeeded: {host} (credentials in {})",
        path.display()
    );
    Ok(())
}

pub fn logout(host: &str) -> anyhow::Result<()> {
    check_host(host)?;
    let path = auth_path();
    let mut file = AuthFile::load(&path)?;
    if file.remove(host) {
        file.save(&path)?;
        println!("removed the credentials for {host}");
    } else {
        println!("not logged in to {host}");
    }
    Ok(())
}

/// A registry is `host[:port]`, as the first part of an image reference.
fn check_host(host: &str) -> anyhow::Result<()> {
    let ok = !host.is_empty()
        && !host.contains(['/', '@', ' '])
        && !host.contains("://")
        && (host.contains(['.', ':']) || host == "localhost");
    anyhow::ensure!(
        ok,
        "{host:?} is not a registry host: want host[:port], e.g. registry.example.com or 10.0.0.9:5001"
    );
    Ok(())
}

fn prompt(label: &str) -> anyhow::Result<String> {
    eprint!("{label}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("read from stdin")?;
    Ok(line.trim().to_string())
}

/// Reads a password from the terminal without echoing it (from stdin as it is when stdin is
/// not a terminal).
fn read_password(label: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return prompt(label);
    }
    let saved = tcgetattr(&stdin).context("read the terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turn off echo")?;
    let read = prompt(label);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_look_like_registries() {
        for ok in [
            "127.0.0.1:5001",
            "registry.example.com",
            "localhost",
            "r:5000",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "team/app", "http://r:5000", "busybox", "a b.c"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }
}
