use super::*;

/// The program compiled here is crun's own, byte for byte: crun keeps the program it compiled
/// in its state dir (`ROOT/ID/seccomp.bpf`) for a created container. Needs root and crun (CI's
/// install-deps installs it).
#[test]
fn the_default_profile_compiles_to_what_crun_compiles() {
    let ours = compile(&crate::seccomp::default_profile()).expect("compile with libseccomp");
    assert_eq!(ours.len() % 8, 0);

    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("state");
    let bundle = t.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    // `create` wants the program to exist; it never runs (the container is not started).
    let program = bundle.join("rootfs/init");
    std::fs::write(&program, b"").unwrap();
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cli = crate::runtime::pick_runtime("crun", &root);
    assert_eq!(
        cli.binary, "crun",
        "this test needs crun (.ci/install-deps)"
    );
    let id = format!("rudder-seccomp-test-{}", std::process::id());
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_root(Some(
        oci_spec::runtime::RootBuilder::default()
            .path(bundle.join("rootfs"))
            .build()
            .unwrap(),
    ));
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec!["/init".into()]));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().unwrap();
    linux.set_seccomp(Some(crate::seccomp::default_profile()));
    // One level under the root of each hierarchy: `delete` removes all of it.
    linux.set_cgroups_path(Some(format!("/{id}").into()));
    spec.set_linux(Some(linux));
    spec.save(bundle.join("config.json")).unwrap();

    // The container's init inherits the command's stdio: a file, not a pipe that would
    // stay open until the init exits.
    let err_file = t.path().join("create.err");
    let created = cli
        .command(["create", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .status()
        .unwrap();
    let theirs = std::fs::read(root.join(&id).join("seccomp.bpf"));
    let deleted = cli
        .delete_force(&id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        created.success(),
        "crun create: {}",
        std::fs::read_to_string(&err_file).unwrap_or_default()
    );
    assert!(deleted.success(), "crun delete");
    let theirs = theirs.expect("crun keeps the program it compiled");
    assert!(
        ours == theirs,
        "{} bytes here, {} from crun",
        ours.len(),
        theirs.len()
    );
}

#[test]
fn the_precompiled_program_is_base64_of_the_program() {
    let p = Precompiled::compile(&crate::seccomp::default_profile()).unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&p.base64)
        .unwrap();
    assert_eq!(raw, compile(&p.profile).unwrap());
}

#[test]
fn odd_profiles_are_refused_with_the_field_named() {
    let mut v = serde_json::to_value(crate::seccomp::default_profile()).unwrap();
    v["defaultAction"] = "SCMP_ACT_ALLOW".into();
    // errno with an action that carries none.
    let p: LinuxSeccomp = serde_json::from_value(v.clone()).unwrap();
    let e = compile(&p).unwrap_err().to_string();
    assert!(e.contains("defaultErrnoRet"), "{e}");

    let mut v = serde_json::to_value(crate::seccomp::default_profile()).unwrap();
    v["syscalls"][0]["action"] = "SCMP_ACT_NOTIFY".into();
    let p: LinuxSeccomp = serde_json::from_value(v).unwrap();
    let e = compile(&p).unwrap_err().to_string();
    assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
}

#[test]
fn conditions_on_one_argument_are_split_as_crun_splits_them() {
    let two_on_arg0 = serde_json::json!([
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"},
    ]);
    let (c, repeats) = conditions(&two_on_arg0).unwrap();
    assert!(repeats);
    assert_eq!(c.len(), 2);
    let distinct = serde_json::json!([
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
        {"index": 1, "value": 7, "valueTwo": 3, "op": "SCMP_CMP_MASKED_EQ"},
    ]);
    let (c, repeats) = conditions(&distinct).unwrap();
    assert!(!repeats);
    assert_eq!(
        (c[1].arg, c[1].op, c[1].datum_a, c[1].datum_b),
        (1, 7, 7, 3)
    );
    let bad = serde_json::json!([{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]);
    assert!(conditions(&bad).is_err());
}
