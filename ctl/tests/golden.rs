//! Golden context files (`tests/golden/v<N>/ctl/`): what `rctl local up` wrote, read by every
//! later `rctl`. Files of a version are never rewritten; see `tests/golden/README.md`.

use std::path::PathBuf;

use rudder_ctl::context;

fn dir(v: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/golden/v{v}/ctl"))
}

#[test]
fn v1_context_file_loads() {
    let path = dir(1).join("context.json");
    if std::env::var_os("RUDDER_UPDATE_GOLDEN").is_some() && !path.exists() {
        let ctx: context::Context = serde_json::from_value(serde_json::json!({
            "name": "lab",
            "controller": "https://10.213.1.1:4243",
            "controllers": ["https://10.213.1.1:4243", "https://10.213.2.1:4243"],
            "registry": "10.213.1.1:5000",
            "ca": "/root/.rudder/lab/ca.pem",
            "cert": "/root/.rudder/lab/admin.pem",
            "key": "/root/.rudder/lab/admin-key.pem",
        }))
        .unwrap();
        context::save(&path, &ctx).unwrap();
    }
    let ctx = context::load(&path).unwrap();
    assert_eq!(ctx.name, "lab");
    assert_eq!(
        ctx.controller_urls(),
        ["https://10.213.1.1:4243", "https://10.213.2.1:4243"]
    );
    assert_eq!(ctx.registry, "10.213.1.1:5000");
    assert_eq!(
        ctx.key.as_deref(),
        Some(std::path::Path::new("/root/.rudder/lab/admin-key.pem"))
    );
}

/// The oldest layout: one controller URL, no credentials.
#[test]
fn v1_single_controller_context_loads() {
    let path = dir(1).join("context-single.json");
    if std::env::var_os("RUDDER_UPDATE_GOLDEN").is_some() && !path.exists() {
        std::fs::write(
            &path,
            r#"{"controller":"http://10.213.1.1:4243","registry":"10.213.1.1:5000"}"#,
        )
        .unwrap();
    }
    let ctx = context::load(&path).unwrap();
    assert_eq!(ctx.controller_urls(), ["http://10.213.1.1:4243"]);
    assert!(ctx.credentials().unwrap().is_none());
}
