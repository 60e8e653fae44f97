//! The on-disk certificate store: `<dir>/certs/<name>/{cert.pem,key.pem}` and the ACME
//! account in `<dir>/account.json`. Directories are 0700 and files 0600 (keys are secrets);
//! writes go to a temporary file that is renamed, so a crash never leaves half a PEM.

use crate::error::CertError;
use crate::pem::{leaf_info, normalize_name};
use crate::schedule::Validity;
use meshgate_config::private_file::{Placement, write_private_file};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A certificate found in the store.
#[derive(Debug, Clone)]
pub struct StoredCert {
    /// The store key: the certificate's primary name (`*.domain` for the farmer wildcard).
    pub key: String,
    /// DNS names the leaf covers.
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key_pem: String,
    pub validity: Validity,
}

impl StoredCert {
    /// A certificate from its PEM chain and key, checked to be a usable pair; `key` is its
    /// store key (primary name).
    pub fn from_pem(key: &str, chain_pem: String, key_pem: String) -> Result<Self, CertError> {
        let (validity, names) = leaf_info(&chain_pem)?;
        crate::pem::certified_key(&chain_pem, &key_pem)?;
        Ok(StoredCert {
            key: normalize_name(key)?,
            names,
            chain_pem,
            key_pem,
            validity,
        })
    }
}

#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    /// Opens (creating with mode 0700) the store directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CertError> {
        let dir = dir.into();
        create_private_dir(&dir)?;
        create_private_dir(&dir.join("certs"))?;
        Ok(CertStore { dir })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn cert_dir(&self, key: &str) -> Result<PathBuf, CertError> {
        let key = normalize_name(key)?;
        // `*` is awkward in file names; the wildcard's directory is `_wildcard.<domain>`.
        let file = match key.strip_prefix("*.") {
            Some(rest) => format!("_wildcard.{rest}"),
            None => key,
        };
        Ok(self.dir.join("certs").join(file))
    }

    /// Writes a certificate chain and its key under `key`.
    pub fn save(&self, key: &str, chain_pem: &str, key_pem: &str) -> Result<(), CertError> {
        let dir = self.cert_dir(key)?;
        create_private_dir(&dir)?;
        // Key first: a chain on disk always has its key next to it.
        write_private(&dir.join("key.pem"), key_pem.as_bytes())?;
        write_private(&dir.join("cert.pem"), chain_pem.as_bytes())
    }

    /// Loads the certificate stored under `key`, if any.
    pub fn load(&self, key: &str) -> Result<Option<StoredCert>, CertError> {
        let dir = self.cert_dir(key)?;
        let cert_path = dir.join("cert.pem");
        if !cert_path.exists() {
            return Ok(None);
        }
        let chain_pem =
            fs::read_to_string(&cert_path).map_err(|e| CertError::file(&cert_path, e))?;
        let key_path = dir.join("key.pem");
        let key_pem = fs::read_to_string(&key_path).map_err(|e| CertError::file(&key_path, e))?;
        let (validity, names) =
            leaf_info(&chain_pem).map_err(|e| CertError::file(&cert_path, e))?;
        // Fail here, not at handshake time, when the pair is unusable.
        crate::pem::certified_key(&chain_pem, &key_pem).map_err(|e| CertError::file(&dir, e))?;
        Ok(Some(StoredCert {
            key: normalize_name(key)?,
            names,
            chain_pem,
            key_pem,
            validity,
        }))
    }

    /// Every stored certificate; unreadable entries are returned as errors, not skipped silently.
    pub fn load_all(&self) -> Vec<Result<StoredCert, CertError>> {
        let certs = self.dir.join("certs");
        let entries = match fs::read_dir(&certs) {
            Ok(e) => e,
            Err(e) => return vec![Err(CertError::file(&certs, e))],
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let key = match file.strip_prefix("_wildcard.") {
                Some(rest) => format!("*.{rest}"),
                None => file,
            };
            match self.load(&key) {
                Ok(Some(c)) => out.push(Ok(c)),
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// Reads a secret-bearing file of the store (e.g. `account.json`).
    pub(crate) fn read_file(&self, name: &str) -> Result<Option<String>, CertError> {
        let path = self.dir.join(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CertError::file(&path, e)),
        }
    }

    /// Writes a file of the store with mode 0600.
    pub(crate) fn write_file(&self, name: &str, contents: &[u8]) -> Result<(), CertError> {
        write_private(&self.dir.join(name), contents)
    }
}

/// Creates `dir` (and parents) with mode 0700, and tightens an existing one.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CertError::file(dir, format!("cannot create directory: {e}")))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| CertError::file(dir, format!("cannot set mode 0700: {e}")))
}

/// Writes `contents` to `path` with mode 0600, crash-safely, replacing what is there: a
/// reader sees the old file or the new one, never a torn one.
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    write_private_file(path, contents, Placement::Replace)
        .map_err(|e| CertError::file(path, format!("cannot write: {}", e.source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_complete_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let first = vec![b'a'; 50_000];
        write_private(&path, &first).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), first);
        // A stale, readable leftover of an interrupted write does not matter.
        fs::write(dir.path().join("key.tmp"), b"junk").unwrap();
        let second = vec![b'b'; 70_000];
        write_private(&path, &second).unwrap();
        assert_eq!(fs::read(&path).unwrap(), second);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let tmp_left = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .any(|n| n.starts_with(".key.pem."));
        assert!(!tmp_left, "temporary files are renamed away");
    }
}
