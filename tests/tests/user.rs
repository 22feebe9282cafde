//! The image's `USER` and `rctl exec --user` on a real lab: names resolve in the container's
//! own /etc/passwd and /etc/group (Docker's rules), for a RUN step, `rctl run`, a service and
//! `rctl exec`; an unknown name is refused with Docker's message, never run as root.

use rudder_tests::{lab_with_busybox, pinned_service, running_task};

const DOCKERFILE: &str = "FROM busybox:latest\n\
RUN echo 'nobody:x:65534:65534:nobody:/home/nobody:/bin/sh' >> /etc/passwd && \
    echo 'nogroup:x:65534:' > /etc/group && echo 'audio:x:29:nobody' >> /etc/group\n\
USER nobody\n\
RUN echo \"run-as uid=$(id -u) groups=$(id -G) home=$HOME\"\n\
CMD [\"sh\", \"-c\", \"echo uid=$(id -u) groups=$(id -G) home=$HOME\"]\n";

#[test]
fn image_user_by_name_is_honoured_everywhere() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("us", 1)?;
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
    let c = ctx.to_str().unwrap();

    // A RUN step after `USER nobody`.
    let out = lab.rctl(&["build", "-t", "who:1", c])?;
    assert!(
        out.contains("run-as uid=65534 groups=65534 29 home=/home/nobody"),
        "{out}"
    );
    // `rctl run`.
    let run = lab.rctl(&["run", "--rm", "who:1"])?;
    assert_eq!(run, "uid=65534 groups=65534 29 home=/home/nobody\n");

    // A service, and `rctl exec` into it: as the image's user, or as another one.
    let host = lab.lab.hosts[0].name.clone();
    lab.apply(
        tmp.path(),
        "who.yaml",
        &pinned_service("who", "who:1", &host),
    )?;
    let task = running_task(&lab, "who")?;
    let name = task["name"].as_str().unwrap().to_string();
    let id = |args: &[&str]| {
        let mut a = vec!["exec"];
        a.extend_from_slice(args);
        a.extend_from_slice(&[&name, "--", "sh", "-c", "echo $(id -u):$(id -g) $HOME"]);
        lab.rctl(&a)
    };
    assert_eq!(id(&[])?, "65534:65534 /home/nobody\n");
    let pid = lab.task_pid(&task, "pid").expect("the container's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    assert_eq!(id(&["--user", "root"])?, "0:0 /root\n");
    assert_eq!(id(&["--user", "4242"])?, "4242:0 /\n");
    assert_eq!(id(&["-u", "nobody:audio"])?, "65534:29 /home/nobody\n");
    let e = id(&["--user", "nosuch"]).unwrap_err().to_string();
    assert!(
        e.contains("unable to find user nosuch: no matching entries in passwd file"),
        "{e}"
    );

    // An unknown name: the container is refused, and so is a RUN step as it.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nUSER nosuch\nCMD [\"id\", \"-u\"]\n",
    )?;
    lab.rctl(&["build", "-t", "bad:1", c])?;
    let e = lab.rctl(&["run", "--rm", "bad:1"]).unwrap_err().to_string();
    assert!(
        e.contains("unable to find user nosuch: no matching entries in passwd file"),
        "{e}"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nUSER nosuch\nRUN id -u\n",
    )?;
    let e = lab
        .rctl(&["build", "-t", "bad:2", c])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RUN (line 3): user: unable to find user nosuch: no matching entries"),
        "{e}"
    );
    Ok(())
}
