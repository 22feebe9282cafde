//! Backup files round-trip the store; wrong keys, tampered and truncated files are refused with
//! errors that say which; a restored log starts a one-member cluster from the backup's store.

use std::sync::Arc;

use rudder_controller::storage::RedbStorage;
use rudder_model::store::{ClusterSecrets, ManagerInfo};
use rudder_model::{Command, Store};
use rudder_pki::backup::{self, BackupError, BackupKey};

fn store_with_services(n: usize) -> Store {
    let mut s = Store::default();
    for i in 0..n {
        let spec = serde_json::from_value(serde_json::json!({
            "name": format!("svc{i}"), "image": "busybox:latest",
        }))
        .expect("service spec");
        s.apply(
            i as u64 + 2,
            Command::PutService {
                id: format!("id{i}"),
                spec: Box::new(spec),
                now: 1,
            },
        )
        .expect("apply");
    }
    let ca = rudder_pki::ca::ClusterCa::generate("rudder", std::time::SystemTime::now()).unwrap();
    s.secrets = Some(ClusterSecrets {
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_pem: ca.key_pem().to_string(),
        join_tokens: Default::default(),
    });
    for id in 1..=3 {
        s.managers.insert(
            id,
            ManagerInfo {
                addr: format!("10.0.0.{id}:4243"),
                registry: format!("10.0.0.{id}:5000"),
            },
        );
    }
    s
}

#[test]
fn backup_round_trip_and_refusals() {
    let store = store_with_services(20);
    let key = BackupKey::generate().unwrap();
    let file = backup::seal(&key, serde_json::to_vec(&store).unwrap()).unwrap();
    let back: Store = serde_json::from_slice(&backup::open(&key, file.clone()).unwrap()).unwrap();
    assert_eq!(back, store);

    let e = backup::open(&BackupKey::generate().unwrap(), file.clone()).unwrap_err();
    assert!(matches!(e, BackupError::WrongKey), "{e}");
    assert_eq!(
        e.to_string(),
        "backup: wrong backup key (its fingerprint does not match the key this backup was written with)"
    );

    let mut tampered = file.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let e = backup::open(&key, tampered).unwrap_err();
    assert!(e.to_string().contains("tampered"), "{e}");

    let e = backup::open(&key, file[..file.len() / 2].to_vec()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn a_restored_log_is_a_one_member_cluster_with_the_backups_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    let keys = Arc::new(
        rudder_controller::crypt::DataKeys::load_or_create(&dir.path().join("certs")).unwrap(),
    );
    let backup_store = store_with_services(5);
    let me = ManagerInfo {
        addr: "10.0.0.2:4243".into(),
        registry: "10.0.0.2:5000".into(),
    };
    let store = rudder_controller::restored_store(&backup_store, 2, me.clone()).unwrap();
    let path = dir.path().join("raft.redb");
    let s = RedbStorage::create_restored(&path, &[2], keys.clone(), &store).unwrap();
    let snap = s.latest_snapshot().unwrap().expect("snapshot");
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![2]);
    let restored: Store = serde_json::from_slice(&snap.data).unwrap();
    assert_eq!(restored.services, backup_store.services);
    assert_eq!(restored.secrets, backup_store.secrets);
    assert_eq!(restored.managers.len(), 1);
    assert_eq!(restored.managers.get(&2), Some(&me));
    drop(s);
    // Never over an existing log.
    let Err(e) = RedbStorage::create_restored(&path, &[2], keys, &store) else {
        panic!("a restore over an existing log was accepted");
    };
    assert!(
        e.to_string().contains("restore needs a new raft log"),
        "{e}"
    );
}
