//! The store key and the key file that holds it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::Error;

/// Length of the store key in bytes.
pub(crate) const KEY_LEN: usize = 32;

/// First word of a key file, so that a random file is refused with a clear message.
const KEY_FILE_HEADER: &str = "hearth-store-key-v1 ";

/// A key file is one short line; anything bigger is not ours and is not read into memory.
const MAX_KEY_FILE_LEN: u64 = 256;

/// The 32-byte store key. Wiped from memory on drop, never printed.
pub(crate) struct StoreKey(Zeroizing<[u8; KEY_LEN]>);

impl StoreKey {
    /// A fresh key from the operating system's generator.
    pub(crate) fn random() -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(key.as_mut_slice())?;
        Ok(StoreKey(key))
    }

    /// Takes ownership of derived key bytes.
    pub(crate) fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> Self {
        StoreKey(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

/// Fills `buf` from the operating system's generator, as an error value rather than a panic.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Random {
        detail: e.to_string(),
    })
}

/// Reads the key file at `path`; `Ok(None)` when it does not exist.
pub(crate) fn load(path: &Path) -> Result<Option<StoreKey>, Error> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read key file", path, e)),
    };
    // Check the open file, not the path, so the checks and the read see the same file.
    let meta = file
        .metadata()
        .map_err(|e| Error::io("read key file", path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_file_error(
                path,
                format!(
                    "it is open to other users (mode {mode:03o}); run `chmod 600 {}` and try again",
                    path.display()
                ),
            ));
        }
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(not_a_key_file(path));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE_LEN)
        .read_to_string(&mut text)
        .map_err(|_| not_a_key_file(path))?;
    let hex_key = text
        .trim_end()
        .strip_prefix(KEY_FILE_HEADER)
        .ok_or_else(|| not_a_key_file(path))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(hex_key, key.as_mut_slice()).map_err(|_| not_a_key_file(path))?;
    Ok(Some(StoreKey(key)))
}

/// Creates the key file at `path` with a fresh key, readable by its owner only.
///
/// If another process created it first, that file's key is used instead.
pub(crate) fn create(path: &Path) -> Result<StoreKey, Error> {
    let key = StoreKey::random()?;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The mode is set at creation, so the key is never readable by others, not even briefly.
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return load(path)?.ok_or_else(|| not_a_key_file(path));
        }
        Err(e) => return Err(Error::io("create key file", path, e)),
    };
    let text = Zeroizing::new(format!(
        "{KEY_FILE_HEADER}{}\n",
        hex::encode(key.as_bytes())
    ));
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write key file", path, e))?;
    // Make the new directory entry durable too; a key file lost to a crash would orphan the store.
    if let Some(parent) = path.parent() {
        let dir = File::open(parent).map_err(|e| Error::io("sync directory", parent, e))?;
        dir.sync_all()
            .map_err(|e| Error::io("sync directory", parent, e))?;
    }
    Ok(key)
}

fn key_file_error(path: &Path, problem: String) -> Error {
    Error::KeyFile {
        path: path.to_path_buf(),
        problem,
    }
}

fn not_a_key_file(path: &Path) -> Error {
    key_file_error(
        path,
        "it is not a Hearth store key file; restore the original key file from your backup"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_key_file_is_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        let key = create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = load(&path).unwrap().unwrap();
        assert_eq!(key.as_bytes(), again.as_bytes());
        // A second create keeps the existing key rather than replacing it.
        let third = create(&path).unwrap();
        assert_eq!(key.as_bytes(), third.as_bytes());
        assert_eq!(format!("{key:?}"), "StoreKey(<redacted>)");
    }

    #[test]
    fn missing_key_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&dir.path().join("absent")).unwrap().is_none());
    }

    #[cfg(unix)]
    #[test]
    fn open_permissions_are_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains("644"), "{err}");
    }

    #[test]
    fn foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        std::fs::write(&path, b"hello world\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("not a Hearth store key file"), "{err}");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        assert!(load(&path).is_err());
    }
}
