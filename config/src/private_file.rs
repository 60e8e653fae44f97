//! Crash-safe writing of private (mode 0600) files: keys, tokens and certificates.
//!
//! It lives here, std-only, because every crate that writes a secret named by the
//! configuration (reservations: admin token and challenge key; certs: certificate keys)
//! already depends on `config`, and a home in either of them would make the other depend on
//! it for 80 lines of file handling.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How [`write_private_file`] puts the finished file at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Only if nothing is there: a hard link, atomic, fails if the path exists.
    New,
    /// Over whatever is there: a rename, so a reader sees the old file or the new one.
    Replace,
}

/// A [`write_private_file`] that failed: the file it failed on (the temporary file, the
/// target or its directory) and why.
#[derive(Debug)]
pub struct PrivateWriteError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for PrivateWriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for PrivateWriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes `contents` to `path` with mode 0600, crash-safely: the contents go to a fresh
/// temporary file in the same directory (0600, fsynced), which is then placed at `path` as
/// `placement` says; the directory is fsynced so the name survives a crash. A reader never
/// sees a partial file.
pub fn write_private_file(
    path: &Path,
    contents: &[u8],
    placement: Placement,
) -> Result<(), PrivateWriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(temporary_name(path));
    let failed_at = |at: &Path| {
        let path = at.to_path_buf();
        move |source| PrivateWriteError { path, source }
    };
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()
    };
    let placed = write().map_err(failed_at(&tmp)).and_then(|()| {
        match placement {
            Placement::New => std::fs::hard_link(&tmp, path),
            Placement::Replace => std::fs::rename(&tmp, path),
        }
        .map_err(failed_at(path))
    });
    // Gone already after a rename; after a hard link or a failure it is not needed.
    let _ = std::fs::remove_file(&tmp);
    placed?;
    sync_dir(dir).map_err(failed_at(dir))
}

/// `.<name>.<pid>.<n>.<nanos>.tmp`: unique among this process's writes (the counter) and
/// other processes' (the pid), and unlikely to meet a leftover of a crashed process that had
/// the same pid (the clock). `create_new` refuses a clash rather than sharing a file.
fn temporary_name(path: &Path) -> String {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        ".{file_name}.{}.{}.{nanos:08x}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes a directory's entries (a new or renamed file) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn new_is_0600_complete_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private_file(&path, b"first", Placement::New).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = write_private_file(&path, b"second", Placement::New).unwrap_err();
        assert_eq!(e.path, path);
        assert_eq!(e.source.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(names(dir.path()), vec![std::ffi::OsString::from("key.pem")]);
    }

    #[test]
    fn replace_swaps_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, b"old and longer").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private_file(&path, b"new", Placement::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            names(dir.path()),
            vec![std::ffi::OsString::from("cert.pem")]
        );
    }

    #[test]
    fn missing_directory_names_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("key.pem");
        let e = write_private_file(&path, b"x", Placement::New).unwrap_err();
        assert_eq!(e.source.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(e.path.parent(), path.parent());
    }
}
