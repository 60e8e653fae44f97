//! The fleet key and sealing: private keys and other secrets are stored in etcd only as
//! XChaCha20-Poly1305 ciphertext under the fleet key (a 0600 file every gateway of the fleet
//! holds), bound to the etcd key they are stored at, so a sealed value moved to another key
//! does not open.
//!
//! A sealed value is `MGSEAL1` ‖ key id (8 bytes) ‖ nonce (24) ‖ ciphertext+tag. The key id
//! (a hash of the fleet key) lets a gateway with the wrong key say so plainly instead of
//! failing to decrypt: a wrong fleet key fails closed with a clear error.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 7] = b"MGSEAL1";
const ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = MAGIC.len() + ID_LEN + NONCE_LEN;

/// Why a fleet key could not be loaded or a value not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("fleet key {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error(
        "{what} was sealed under fleet key {sealed_with}, this gateway's fleet key is {ours}: \
         every gateway of the fleet needs the same key_file"
    )]
    WrongKey {
        what: String,
        sealed_with: String,
        ours: String,
    },
    #[error("{what} is not a sealed value (or is truncated)")]
    NotSealed { what: String },
    #[error("{what} does not open under the fleet key (tampered, or moved from another key)")]
    Tampered { what: String },
}

/// The fleet's symmetric key (32 bytes).
#[derive(Clone)]
pub struct FleetKey {
    key: [u8; 32],
    id: [u8; ID_LEN],
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetKey({})", self.id_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl FleetKey {
    pub fn from_bytes(key: [u8; 32]) -> FleetKey {
        let digest = blake3::derive_key("meshgate fleet key id v1", &key);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        FleetKey { key, id }
    }

    /// A new random key.
    pub fn generate() -> FleetKey {
        let mut key = [0u8; 32];
        rand::fill(&mut key[..]);
        FleetKey::from_bytes(key)
    }

    /// The key as the key file holds it: 64 hex characters and a newline.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex(&self.key))
    }

    /// Reads the key file: it must be mode 0600 (or stricter) and hold 64 hex characters.
    pub fn load(path: &Path) -> Result<FleetKey, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |reason: String| SealError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {mode:03o} lets others read it; chmod 600 it"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        unhex32(text.trim())
            .map(FleetKey::from_bytes)
            .ok_or_else(|| err("expected 64 hex characters (meshgate fleet keygen)".into()))
    }

    /// A short public name of the key (not secret): shows which key sealed a value.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.key.into())
    }

    /// Seals `plain` for storage at `location` (the etcd key it is written to).
    pub fn seal(&self, location: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce[..]);
        let sealed = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: location.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 sealing cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed for `location`. A value sealed under another key fails with
    /// [`SealError::WrongKey`] naming both key ids.
    pub fn open(&self, location: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let what = location.to_string();
        if sealed.len() < HEADER_LEN + 16 || &sealed[..MAGIC.len()] != MAGIC {
            return Err(SealError::NotSealed { what });
        }
        let id = &sealed[MAGIC.len()..MAGIC.len() + ID_LEN];
        if id != self.id {
            return Err(SealError::WrongKey {
                what,
                sealed_with: hex(id),
                ours: self.id_hex(),
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[MAGIC.len() + ID_LEN..HEADER_LEN]);
        self.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed[HEADER_LEN..],
                    aad: location.as_bytes(),
                },
            )
            .map_err(|_| SealError::Tampered { what })
    }
}

/// True when `bytes` is a sealed value (any key).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN + 16 && &bytes[..MAGIC.len()] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_under_its_key_and_location() {
        let k = FleetKey::generate();
        let sealed = k.seal("/meshgate/f/certs/a", b"-----BEGIN PRIVATE KEY-----");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"));
        assert_eq!(
            k.open("/meshgate/f/certs/a", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(matches!(
            k.open("/meshgate/f/certs/b", &sealed),
            Err(SealError::Tampered { .. })
        ));
        let other = FleetKey::generate();
        let e = other.open("/meshgate/f/certs/a", &sealed).unwrap_err();
        assert!(matches!(e, SealError::WrongKey { .. }));
        assert!(e.to_string().contains(&k.id_hex()), "{e}");
        assert!(matches!(
            k.open("x", b"plain"),
            Err(SealError::NotSealed { .. })
        ));
    }

    #[test]
    fn the_key_file_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.key");
        let k = FleetKey::generate();
        std::fs::write(&path, k.to_file_text()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = FleetKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(FleetKey::load(&path).unwrap().id_hex(), k.id_hex());
        std::fs::write(&path, "short\n").unwrap();
        assert!(FleetKey::load(&path).is_err());
    }
}
