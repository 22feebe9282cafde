//! Hostile image layers on a real lab (one host), from the audit's appendix scripts: a rootfs
//! whose whiteout `.wh...` names `..` (M3), a GNU sparse entry that expands to 32 GiB (M5),
//! and a build whose RUN step creates `/.wh...` (M3, through commit). Each is refused with an
//! error that says why, nothing beside the layer in the content store's `tmp/` is removed,
//! nothing is expanded, and the store's directories are private to root (H2).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rudder_tests::lab_with_busybox;

/// `mk_wh_escape.py`: `./`, `keep`, `.wh...` (whiteout target `..`).
fn wh_escape(path: &Path) -> anyhow::Result<()> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "./", std::io::empty())?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(2);
    b.append_data(&mut h, "keep", &b"ok"[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(0);
    b.append_data(&mut h, ".wh...", std::io::empty())?;
    fs::write(path, b.into_inner()?)?;
    Ok(())
}

/// `mk_sparse_bomb.py`: one GNU sparse header, no data, `real` bytes of holes.
fn sparse_bomb(path: &Path, real: u64) -> anyhow::Result<()> {
    fn number(field: &mut [u8], n: u64) {
        // GNU base-256: what tar writes for sizes of 8 GiB and more.
        field.fill(0);
        let len = field.len();
        field[len - 8..].copy_from_slice(&n.to_be_bytes());
        field[0] = 0x80;
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_path("bomb")?;
    h.set_mode(0o644);
    h.set_size(0);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    number(&mut gnu.sparse[0].offset, real);
    gnu.sparse[0].numbytes.copy_from_slice(b"00000000000\0");
    number(&mut gnu.realsize, real);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 1024]);
    fs::write(path, bytes)?;
    Ok(())
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                todo.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[test]
fn hostile_layers_are_refused_and_the_store_is_private() -> anyhow::Result<()> {
    let (lab, tmp) = lab_with_busybox("ly", 1)?;
    let images = lab.host("h1").data_dir.join("images");

    // H2: the content store is root's alone, down to the layer directories.
    for dir in ["", "blobs", "blobs/sha256", "layers", "tmp"] {
        assert_eq!(mode_of(&images.join(dir)), 0o700, "images/{dir}");
    }

    let canary = images.join("tmp/canary");
    fs::write(&canary, "alive")?;

    // M3 through an image: the layer is refused, naming the whiteout.
    let tar = tmp.path().join("wh-escape.tar");
    wh_escape(&tar)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "whesc:1"])?;
    let err = lab
        .rctl(&["run", "--rm", "--node", "h1", "whesc:1", "/keep"])
        .expect_err("a layer with a whiteout of '..' ran");
    let msg = format!("{err:#}");
    eprintln!("whiteout image: {msg}");
    assert!(
        msg.contains("whiteout") && msg.contains("layer sha256:"),
        "{msg}"
    );
    assert!(canary.exists(), "the whiteout emptied the store's tmp/");

    // M5: the sparse bomb is refused from its header; nothing is expanded.
    let tar = tmp.path().join("sparse-bomb.tar");
    sparse_bomb(&tar, 32 << 30)?;
    lab.rctl(&["image", "import", tar.to_str().unwrap(), "bomb:1"])?;
    let err = lab
        .rctl(&["run", "--rm", "--node", "h1", "bomb:1", "/bomb"])
        .expect_err("a 32 GiB sparse layer ran");
    let msg = format!("{err:#}");
    eprintln!("sparse bomb: {msg}");
    assert!(msg.contains("16 GiB"), "{msg}");
    assert!(
        du(&images.join("tmp")) < 1 << 20,
        "the bomb left bytes in tmp/"
    );

    // M3 through a build: a RUN step that creates /.wh... (committed verbatim) is refused
    // when its layer is unpacked.
    let ctx = tmp.path().join("wh");
    fs::create_dir_all(&ctx)?;
    fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox:latest\nRUN touch /.wh...\n",
    )?;
    let err = lab
        .rctl(&["build", "-t", "wh:1", "--node", "h1", ctx.to_str().unwrap()])
        .expect_err("a build whose layer whites out '..' succeeded");
    let msg = format!("{err:#}");
    eprintln!("whiteout build: {msg}");
    assert!(msg.contains("whiteout"), "{msg}");
    assert!(
        canary.exists(),
        "the build's whiteout emptied the store's tmp/"
    );
    Ok(())
}
