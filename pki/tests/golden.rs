//! Golden files of the controller's key material at rest (`tests/golden/v<N>/controller/`): the
//! data-key keyring (`certs/raft-dek`), the CA key sealed under it (`certs/ca-key.sealed`) with
//! its certificate, a raft log entry encrypted at rest, and a backup file.
//!
//! Every key here is a TEST key made for these files (the keyring's key is all `0x11`, the
//! backup key all `0x22`, the CA was generated for them): none protects anything real.
//! Files of a version are never rewritten; see `tests/golden/README.md` for adding a version.

use std::path::PathBuf;

use rudder_pki::backup::{self, BackupKey};
use rudder_pki::crypt::{self, Context, DataKeys};

fn dir(v: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/golden/v{v}/controller"))
}

/// The replicated formats' golden files, which these encrypt.
fn raft(v: u32, name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../tests/golden/v{v}/raft"))
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn generating(path: &std::path::Path) -> bool {
    std::env::var_os("RUDDER_UPDATE_GOLDEN").is_some() && !path.exists()
}

const TEST_DEK: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const TEST_BACKUP_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";

#[test]
fn v1_keyring_sealed_ca_and_encrypted_entry_open() {
    let certs = dir(1).join("certs");
    let entry_plain = raft(1, "entry-01-set-secrets.json");
    if generating(&certs.join("raft-dek")) {
        std::fs::create_dir_all(&certs).unwrap();
        let keyring =
            format!(r#"{{"version":1,"current":{{"id":1,"key":"{TEST_DEK}"}},"previous":[]}}"#);
        crypt::write_private_atomic(&certs.join("raft-dek"), keyring.as_bytes()).unwrap();
        let keys = DataKeys::load(&certs).unwrap().unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600);
        let ca = rudder_pki::ca::ClusterCa::generate("golden-test", at).unwrap();
        std::fs::write(certs.join("ca.pem"), ca.cert_pem()).unwrap();
        crypt::seal_ca_key(&certs, &keys, ca.key_pem()).unwrap();
        let rec = keys.seal(Context::Entry(1), &entry_plain).unwrap();
        std::fs::write(dir(1).join("entry-1.rec"), rec).unwrap();
    }
    let keys = DataKeys::load(&certs).unwrap().expect("the keyring");
    assert_eq!(keys.current_id(), 1);
    let ca = crypt::load_sealed_ca(&certs)
        .unwrap()
        .expect("the sealed ca");
    assert_eq!(
        ca.cert_pem(),
        std::fs::read_to_string(certs.join("ca.pem")).unwrap()
    );
    let rec = std::fs::read(dir(1).join("entry-1.rec")).unwrap();
    assert_eq!(crypt::record_key_id(&rec), Some(1));
    assert_eq!(keys.open(Context::Entry(1), &rec).unwrap(), entry_plain);
    assert!(
        keys.open(Context::Entry(2), &rec).is_err(),
        "bound to its index"
    );
}

#[test]
fn v1_backup_opens() {
    let path = dir(1).join("backup.rdrbk");
    let store = raft(1, "snapshot.json");
    let key = BackupKey::parse(TEST_BACKUP_KEY).unwrap();
    if generating(&path) {
        std::fs::create_dir_all(dir(1)).unwrap();
        std::fs::write(&path, backup::seal(&key, store.clone()).unwrap()).unwrap();
    }
    let plain = backup::open(&key, std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(plain, store);
}
