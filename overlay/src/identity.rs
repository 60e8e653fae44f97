//! Node identity: one ed25519 key per node, stored in a 0600 key file.
//!
//! The X25519 key used for Noise link handshakes is *derived* from the ed25519 key (the
//! SHA-512-expanded ed25519 secret scalar is the X25519 secret; its public key is the
//! birational (Montgomery) image of the ed25519 public key). One secret file therefore
//! covers signing and key agreement, and a peer can check that a Noise static key belongs to
//! an ed25519 identity with no extra signature.

use std::io::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::addr;

/// Errors loading or creating a key file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:03o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("key file {path} already exists (use --force to overwrite)")]
    Exists { path: PathBuf },
}

const HEADER: &str = "# meshgate overlay identity: ed25519 secret seed (hex). Keep secret.";

/// A node's long-term identity.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.address())
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Identity {
        let seed = Zeroizing::new(rand::random::<[u8; 32]>());
        Identity::from_seed(&seed)
    }

    /// The identity for a given 32-byte ed25519 seed (used by the simulator and tests).
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        Identity {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// Loads an existing key file; refuses group/world-readable or malformed files.
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        check_mode(path, &meta)?;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let malformed = |reason: &str| IdentityError::Malformed {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines
            .next()
            .ok_or_else(|| malformed("no key line (expected 64 hex characters)"))?;
        if lines.next().is_some() {
            return Err(malformed("more than one key line"));
        }
        let seed = Zeroizing::new(
            decode_hex32(line).ok_or_else(|| malformed("key line is not 64 hex characters"))?,
        );
        Ok(Identity::from_seed(&seed))
    }

    /// Loads the key file, or creates it (mode 0600) with a fresh identity if it is absent.
    pub fn load_or_create(path: &Path) -> Result<Identity, IdentityError> {
        match std::fs::metadata(path) {
            Ok(_) => Identity::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate();
                id.save(path, false)?;
                Ok(id)
            }
            Err(source) => Err(IdentityError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the key file with mode 0600. Without `overwrite`, an existing file is an error.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), IdentityError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).mode(0o600);
        if overwrite {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let mut f = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
        // An overwritten file keeps its old mode: force 0600.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        let body = Zeroizing::new(format!(
            "{HEADER}\n{}\n",
            encode_hex(self.signing.as_bytes())
        ));
        f.write_all(body.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// The ed25519 public key (the node id).
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The node's overlay address (see `addr::address_for_key`).
    pub fn address(&self) -> Ipv6Addr {
        addr::address_for_key(&self.public_key())
    }

    /// Signs a message with the node key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    /// The X25519 secret derived from the ed25519 key (for the Noise static key).
    pub(crate) fn x25519_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_scalar_bytes())
    }

    /// The X25519 public key matching [`Identity::x25519_secret`].
    #[cfg(test)]
    pub(crate) fn x25519_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_montgomery().to_bytes()
    }
}

/// Verifies an ed25519 signature (strict: rejects malleable encodings and small-order keys).
pub(crate) fn verify(public_key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    vk.verify_strict(msg, &Signature::from_bytes(sig)).is_ok()
}

/// The X25519 public key bound to an ed25519 public key, if the key is a valid point.
pub(crate) fn x25519_for_ed25519(public_key: &[u8; 32]) -> Option<[u8; 32]> {
    let vk = VerifyingKey::from_bytes(public_key).ok()?;
    if vk.is_weak() {
        return None;
    }
    Some(vk.to_montgomery().to_bytes())
}

fn check_mode(path: &Path, meta: &std::fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly 64 hex characters.
pub fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(s[2 * i])? << 4 | nib(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_load_roundtrip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = Identity::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(crate::is_overlay_address(&std::net::IpAddr::V6(
            a.address()
        )));
        assert!(matches!(
            a.save(&path, false),
            Err(IdentityError::Exists { .. })
        ));
    }

    #[test]
    fn readable_by_others_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::generate().save(&path, false).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(
            err,
            IdentityError::Permissions { mode: 0o644, .. }
        ));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn malformed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        for body in [
            "",
            "# only a comment\n",
            "zz\n",
            &"ab".repeat(33),
            "00\n00\n",
        ] {
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = Identity::load(&path).unwrap_err();
            assert!(matches!(err, IdentityError::Malformed { .. }), "{body:?}");
            assert!(err.to_string().contains("node.key"));
        }
    }

    #[test]
    fn x25519_key_is_bound_to_the_ed25519_key() {
        let id = Identity::generate();
        let secret = x25519_dalek::StaticSecret::from(*id.x25519_secret());
        let public = x25519_dalek::PublicKey::from(&secret);
        assert_eq!(public.to_bytes(), id.x25519_public());
        assert_eq!(
            x25519_for_ed25519(&id.public_key()),
            Some(id.x25519_public())
        );
    }

    #[test]
    fn signatures_verify_only_for_the_signed_message() {
        let id = Identity::generate();
        let sig = id.sign(b"hello");
        assert!(verify(&id.public_key(), b"hello", &sig));
        assert!(!verify(&id.public_key(), b"hellp", &sig));
        assert!(!verify(&Identity::generate().public_key(), b"hello", &sig));
    }
}
