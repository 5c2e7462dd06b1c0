//! The files a node keeps in its data dir, beside the store.

use std::fs::{self, File, OpenOptions};
#[cfg(feature = "api")]
use std::io::{ErrorKind, Write};
#[cfg(feature = "api")]
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
#[cfg(feature = "api")]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Held (by an OS file lock) while a node runs on the data dir.
pub const LOCK_FILE: &str = "node.lock";
/// The API bearer token, mode 0600.
#[cfg(feature = "api")]
pub const TOKEN_FILE: &str = "token";
/// The address the API actually bound, as `host:port`; removed on clean exit.
#[cfg(feature = "api")]
pub const API_ADDR_FILE: &str = "api.addr";

/// How long a held data dir lock is retried before another node counts as running.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(500);
/// Token length in random bytes; printed as hex.
#[cfg(feature = "api")]
const TOKEN_BYTES: usize = 32;
/// Most bytes read from a token file: the hex token, a line end and room for spaces.
#[cfg(feature = "api")]
const MAX_TOKEN_FILE_LEN: u64 = 256;

/// Creates the data dir (0700: it holds the key file and token) if missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::DataDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Takes the data dir's exclusive lock, refusing at once when another node holds it.
///
/// The lock is an OS advisory lock on an open file, so it vanishes with the process even
/// after SIGKILL; a stale `node.lock` file never blocks a restart.
pub(crate) fn lock(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::File {
            what: "cannot open lock file",
            path: path.clone(),
            source,
        })?;
    // A lock released a moment ago can still be held by a child process that this process
    // forked (for any reason) and that has not reached exec yet: the child shares the open
    // file until exec closes it. So a held lock is retried briefly before it counts.
    let deadline = std::time::Instant::now() + LOCK_RETRY;
    loop {
        match file.try_lock() {
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break lock_result(other, file, dir, path),
        }
    }
}

fn lock_result(
    result: Result<(), fs::TryLockError>,
    file: File,
    dir: &Path,
    path: PathBuf,
) -> Result<File, Error> {
    match result {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(Error::AlreadyRunning {
            path: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(Error::File {
            what: "cannot lock",
            path,
            source,
        }),
    }
}

/// Reads the API token, creating it (0600) on first start.
#[cfg(feature = "api")]
pub(crate) fn load_or_create_token(dir: &Path) -> Result<String, Error> {
    let path = dir.join(TOKEN_FILE);
    if let Some(token) = read_token(dir)? {
        return Ok(token);
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| Error::File {
        what: "cannot draw randomness for",
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let token = hex::encode(bytes);
    write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// Reads the API token from `<data_dir>/token`; `None` when there is none yet (the node
/// creates it on first start).
///
/// A token file that other users can read (any group or world permission bit) is refused
/// with an error that says to `chmod 600` it, as the store key file is: whoever reads the
/// token controls the node. So is a file that is not a token.
#[cfg(feature = "api")]
pub fn read_token(data_dir: &Path) -> Result<Option<String>, Error> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(TOKEN_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::File {
                what: "cannot read",
                path,
                source,
            });
        }
    };
    // Check the open file, not the path, so the check and the read see the same file.
    let meta = file.metadata().map_err(|source| Error::File {
        what: "cannot read",
        path: path.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::OpenToOthers { path, mode });
    }
    let corrupt = |path: PathBuf| Error::CorruptFile {
        path,
        detail: format!("expected {} hex characters", TOKEN_BYTES * 2),
    };
    // A token is one short line; read no more than that allows, whatever the file holds.
    let mut text = String::new();
    if file
        .take(MAX_TOKEN_FILE_LEN)
        .read_to_string(&mut text)
        .is_err()
    {
        return Err(corrupt(path));
    }
    let token = text.trim();
    if token.len() != TOKEN_BYTES * 2 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(corrupt(path));
    }
    Ok(Some(token.to_string()))
}

/// Writes a new file with mode 0600, failing if it already exists, and syncs it.
#[cfg(feature = "api")]
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let err = |source| Error::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Publishes the bound API address. Written to a temporary name and renamed, so a client
/// never reads a half-written address.
#[cfg(feature = "api")]
pub(crate) fn write_api_addr(dir: &Path, addr: SocketAddr) -> Result<PathBuf, Error> {
    let path = dir.join(API_ADDR_FILE);
    let tmp = dir.join(format!("{API_ADDR_FILE}.tmp"));
    let err = |source| Error::File {
        what: "cannot write",
        path: path.clone(),
        source,
    };
    fs::write(&tmp, format!("{addr}\n")).map_err(err)?;
    fs::rename(&tmp, &path).map_err(err)?;
    Ok(path)
}

/// Removes `api.addr` on a clean exit; a missing file is fine.
#[cfg(feature = "api")]
pub(crate) fn remove_api_addr(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::File {
            what: "cannot remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn second_lock_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err();
        assert!(matches!(err, Error::AlreadyRunning { .. }), "{err}");
        assert!(err.to_string().contains("already running"));
    }

    #[test]
    fn lock_is_released_when_the_holder_drops() {
        let dir = tempfile::tempdir().unwrap();
        drop(lock(dir.path()).unwrap());
        lock(dir.path()).unwrap();
    }

    #[cfg(feature = "api")]
    #[test]
    fn token_is_created_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_token(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), first);
    }

    #[cfg(feature = "api")]
    #[test]
    fn a_token_open_to_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let token = load_or_create_token(dir.path()).unwrap();
        let path = dir.path().join(TOKEN_FILE);
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_or_create_token(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("chmod 600") && err.contains("open to other users"),
                "{err}"
            );
            assert!(read_token(dir.path()).is_err());
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_token(dir.path()).unwrap(), Some(token));
        assert_eq!(
            read_token(tempfile::tempdir().unwrap().path()).unwrap(),
            None
        );
    }

    #[cfg(feature = "api")]
    #[test]
    fn corrupt_token_names_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        fs::write(&path, "not hex").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create_token(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("token is corrupt") && err.contains("remove it"),
            "{err}"
        );
    }
}
