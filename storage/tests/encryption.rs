//! Encryption at rest, end to end through `open_with` and the real sled files.

use std::fs;
use std::path::{Path, PathBuf};

use hearth_storage::{
    Batch, Error, KEY_FILE, KdfParams, KeySource, Keyspace, Options, STORE_DIR, SledStore, Store,
    open_with,
};

/// Small Argon2 costs so the tests stay fast in debug builds.
fn options() -> Options {
    Options {
        kdf: KdfParams {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        },
        cache_capacity: 4 << 20,
        ..Options::default()
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Opens the raw (unsealed) backend of a data dir, to tamper with stored values.
fn raw_backend(dir: &Path) -> SledStore {
    SledStore::open(&dir.join(STORE_DIR), 4 << 20, false).unwrap()
}

#[tokio::test]
async fn canary_never_reaches_the_disk() {
    const CANARY: &[u8] = b"CANARY-7f3a9c-plaintext-must-not-hit-disk";
    for key in [
        KeySource::KeyFile,
        KeySource::Passphrase("canary pass".to_owned()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), key, &options()).unwrap();
        for ks in Keyspace::ALL {
            store.put(ks, "canary", CANARY).await.unwrap();
        }
        // A value big enough for sled to write it as a separate blob file.
        store
            .put(Keyspace::DocChunks, "big", CANARY.repeat(8_000))
            .await
            .unwrap();
        let mut batch = Batch::new();
        for i in 0..50u32 {
            batch.put(
                Keyspace::Audit,
                i.to_be_bytes(),
                [CANARY, &i.to_be_bytes()].concat(),
            );
        }
        store.batch(batch).await.unwrap();
        store.flush().await.unwrap();
        store.close().await.unwrap();

        let files = files_under(dir.path());
        assert!(files.len() >= 3, "expected sled files, found {files:?}");
        let mut store_bytes = 0;
        for file in &files {
            let bytes = fs::read(file).unwrap();
            store_bytes += bytes.len();
            assert!(
                !contains(&bytes, CANARY),
                "plaintext found in {}",
                file.display()
            );
            assert!(
                !contains(&bytes, b"CANARY"),
                "plaintext found in {}",
                file.display()
            );
        }
        // The writes did reach the disk, sealed: the files hold at least the big value's size.
        assert!(
            store_bytes > CANARY.len() * 8_000,
            "only {store_bytes} bytes on disk"
        );

        // Nor does the store key itself appear in the database files.
        if let Ok(text) = fs::read_to_string(dir.path().join(KEY_FILE)) {
            let key = hex::decode(text.trim_end().rsplit(' ').next().unwrap()).unwrap();
            for file in files.iter().filter(|f| !f.ends_with(KEY_FILE)) {
                assert!(
                    !contains(&fs::read(file).unwrap(), &key),
                    "store key found in {}",
                    file.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn wrong_passphrase_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(
        dir.path(),
        KeySource::Passphrase("right one".to_owned()),
        &options(),
    )
    .unwrap();
    store.put(Keyspace::Keyring, "k", "v").await.unwrap();
    store.close().await.unwrap();

    let err = open_with(
        dir.path(),
        KeySource::Passphrase("wrong one".to_owned()),
        &options(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
    let store_path = dir.path().join(STORE_DIR);
    assert_eq!(
        err.to_string(),
        format!(
            "wrong passphrase or key file for store at {}",
            store_path.display()
        )
    );
    // No key, no passphrase in the error, in either form.
    assert!(!format!("{err} {err:?}").contains("one"), "{err:?}");

    let store = open_with(
        dir.path(),
        KeySource::Passphrase("right one".to_owned()),
        &options(),
    )
    .unwrap();
    assert_eq!(
        store.get(Keyspace::Keyring, "k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn wrong_key_file_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    for d in [dir.path(), other.path()] {
        let store = open_with(d, KeySource::KeyFile, &options()).unwrap();
        store.put(Keyspace::Outbox, "k", "v").await.unwrap();
        store.close().await.unwrap();
    }
    // Put the other store's (valid, 0600) key file in place of ours.
    fs::copy(other.path().join(KEY_FILE), dir.path().join(KEY_FILE)).unwrap();
    let err = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("wrong passphrase or key file for store at"),
        "{err}"
    );
}

#[tokio::test]
async fn key_source_mismatch_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    open_with(dir.path(), KeySource::KeyFile, &options())
        .unwrap()
        .close()
        .await
        .unwrap();
    let err = open_with(
        dir.path(),
        KeySource::Passphrase("pw".to_owned()),
        &options(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("created with a key file, but was opened with a passphrase"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    open_with(
        dir.path(),
        KeySource::Passphrase("pw".to_owned()),
        &options(),
    )
    .unwrap()
    .close()
    .await
    .unwrap();
    let err = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap_err();
    assert!(
        err.to_string()
            .contains("created with a passphrase, but was opened with a key file"),
        "{err}"
    );
    assert!(!dir.path().join(KEY_FILE).exists());
}

#[tokio::test]
async fn bit_flip_on_disk_fails_that_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    store
        .put(Keyspace::SyncStates, "peer-a", "state a")
        .await
        .unwrap();
    store
        .put(Keyspace::SyncStates, "peer-b", "state b")
        .await
        .unwrap();
    store.close().await.unwrap();

    {
        let mut raw = raw_backend(dir.path());
        let mut sealed = raw.get(Keyspace::SyncStates, b"peer-a").unwrap().unwrap();
        let last = sealed.len() - 1;
        sealed[last / 2] ^= 0x04;
        raw.put(Keyspace::SyncStates, b"peer-a", &sealed).unwrap();
        raw.flush().unwrap();
    }

    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    let err = store.get(Keyspace::SyncStates, "peer-a").await.unwrap_err();
    match &err {
        Error::Integrity { keyspace, key } => {
            assert_eq!(*keyspace, Keyspace::SyncStates);
            assert_eq!(key.as_bytes(), b"peer-a");
        }
        other => panic!("expected an integrity error, got {other:?}"),
    }
    assert!(err.to_string().contains("sync_states/\"peer-a\""), "{err}");
    assert!(!err.to_string().contains("state a"), "{err}");
    assert_eq!(
        store
            .get(Keyspace::SyncStates, "peer-b")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"state b"[..])
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn swapped_records_on_disk_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    store
        .put(Keyspace::Keyring, "doc-1", "key one")
        .await
        .unwrap();
    store
        .put(Keyspace::Keyring, "doc-2", "key two")
        .await
        .unwrap();
    store
        .put(Keyspace::Keyring, "doc-3", "key three")
        .await
        .unwrap();
    store.close().await.unwrap();

    {
        let mut raw = raw_backend(dir.path());
        let one = raw.get(Keyspace::Keyring, b"doc-1").unwrap().unwrap();
        let two = raw.get(Keyspace::Keyring, b"doc-2").unwrap().unwrap();
        raw.put(Keyspace::Keyring, b"doc-1", &two).unwrap();
        raw.put(Keyspace::Keyring, b"doc-2", &one).unwrap();
        raw.flush().unwrap();
    }

    let store = open_with(dir.path(), KeySource::KeyFile, &options()).unwrap();
    for key in ["doc-1", "doc-2"] {
        let err = store.get(Keyspace::Keyring, key).await.unwrap_err();
        assert!(
            matches!(&err, Error::Integrity { key: k, .. } if k.as_bytes() == key.as_bytes()),
            "{key}: {err:?}"
        );
    }
    assert_eq!(
        store
            .get(Keyspace::Keyring, "doc-3")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"key three"[..])
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn unusable_data_dir_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("data");
    fs::write(&blocker, b"a file where the data dir should be").unwrap();
    let err = open_with(&blocker, KeySource::KeyFile, &options()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(text.contains(&blocker.display().to_string()), "{text}");
    assert!(text.contains("--data"), "{text}");
}
