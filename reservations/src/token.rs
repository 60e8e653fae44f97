//! Secrets of the admin API: the farmer's admin token, deployer tokens (stored hashed) and the
//! server key that binds domain-challenge tokens to their owner.
//!
//! - A token is `mg_<id>_<secret>`: `id` (8 random bytes, hex) finds the stored record,
//!   `secret` (32 random bytes, hex) is checked against `blake3(secret)` in constant time.
//!   Only the hash is stored, so a copy of the store does not hand out tokens.
//! - The admin token lives in a 0600 file; it is created on first start when missing.
//! - A domain's challenge token is `blake3::keyed_hash(server key, "meshgate-challenge-v1" ‖
//!   owner ‖ fqdn)` in hex: deterministic for (owner, fqdn), unguessable without the key, so a
//!   TXT record published for one owner does not prove ownership for another, and a token for
//!   one gateway is worthless on another.

use meshgate_config::private_file::{Placement, write_private_file};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use subtle::ConstantTimeEq;

const PREFIX: &str = "mg_";

/// Errors loading or creating secret files.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets other users read a secret; chmod 600 it")]
    Permissions { path: String, mode: u32 },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a secret file, refusing it if group or others can read it. `Ok(None)` when missing.
fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Permissions {
            path: path.display().to_string(),
            mode,
        });
    }
    std::fs::read(path).map(Some).map_err(io_err(path))
}

/// Writes a new secret file with mode 0600 (fails if it exists), crash-safely (see
/// [`write_private_file`] with [`Placement::New`]). A reader never sees a partial file.
fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), SecretError> {
    write_private_file(path, contents, Placement::New).map_err(|e| io_err(&e.path)(e.source))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::fill(&mut out[..]);
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A token split into its lookup id and its secret part.
pub struct ParsedToken<'a> {
    pub id: &'a str,
    secret: [u8; 32],
}

/// Splits `mg_<id>_<secret>`; `None` for anything else.
pub fn parse_token(token: &str) -> Option<ParsedToken<'_>> {
    let rest = token.trim().strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    unhex::<8>(id)?;
    Some(ParsedToken {
        id,
        secret: unhex::<32>(secret)?,
    })
}

impl ParsedToken<'_> {
    /// Constant-time comparison against a stored hash.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let Some(stored) = unhex::<32>(stored_hash) else {
            return false;
        };
        blake3::hash(&self.secret).as_bytes().ct_eq(&stored).into()
    }
}

/// A freshly minted token: the text handed to the user once, and what gets stored.
pub struct NewToken {
    pub token: String,
    pub id: String,
    pub hash: String,
}

/// Mints a random token.
pub fn new_token() -> NewToken {
    let id = hex(&random_bytes::<8>());
    let secret = random_bytes::<32>();
    NewToken {
        token: format!("{PREFIX}{id}_{}", hex(&secret)),
        hash: hex(blake3::hash(&secret).as_bytes()),
        id,
    }
}

/// A deployer token as stored: no secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredToken {
    pub id: String,
    pub owner: String,
    /// Hex blake3 of the secret part.
    pub hash: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// The farmer's admin token, kept only as its hash in memory.
#[derive(Clone)]
pub struct AdminToken {
    hash: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// From the token text (e.g. from configuration).
    pub fn from_token(token: &str) -> Self {
        AdminToken {
            hash: *blake3::hash(token.trim().as_bytes()).as_bytes(),
        }
    }

    /// Loads the admin token from a 0600 file, creating the file with a new random token when
    /// it does not exist. Returns the token text too, so a first start can print where it is.
    pub fn load_or_create(path: &Path) -> Result<(Self, String), SecretError> {
        let text = match read_secret_file(path)? {
            Some(bytes) => String::from_utf8(bytes).map_err(|_| SecretError::Invalid {
                path: path.display().to_string(),
                reason: "not UTF-8".into(),
            })?,
            None => {
                let token = new_token().token;
                write_secret_file(path, format!("{token}\n").as_bytes())?;
                token
            }
        };
        let text = text.trim().to_string();
        if text.len() < 16 {
            return Err(SecretError::Invalid {
                path: path.display().to_string(),
                reason: "an admin token needs at least 16 characters".into(),
            });
        }
        Ok((Self::from_token(&text), text))
    }

    /// Constant-time check of a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        blake3::hash(presented.trim().as_bytes())
            .as_bytes()
            .ct_eq(&self.hash)
            .into()
    }
}

/// The server key challenge tokens are derived from.
#[derive(Clone)]
pub(crate) struct ChallengeKey([u8; 32]);

impl std::fmt::Debug for ChallengeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChallengeKey(..)")
    }
}

impl ChallengeKey {
    /// The key from its 32 secret bytes (a shared store keeps them sealed).
    pub(crate) fn from_bytes(key: [u8; 32]) -> Self {
        ChallengeKey(key)
    }

    /// A new random key.
    pub(crate) fn generate() -> Self {
        ChallengeKey(random_bytes::<32>())
    }

    /// The secret bytes, to be sealed before they leave the process.
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.0
    }

    /// Loads the key from a 0600 file (64 hex chars), creating it when missing.
    pub(crate) fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        match read_secret_file(path)? {
            Some(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                unhex::<32>(text.trim())
                    .map(ChallengeKey)
                    .ok_or_else(|| SecretError::Invalid {
                        path: path.display().to_string(),
                        reason: "expected 64 hex characters".into(),
                    })
            }
            None => {
                let key = random_bytes::<32>();
                write_secret_file(path, format!("{}\n", hex(&key)).as_bytes())?;
                Ok(ChallengeKey(key))
            }
        }
    }

    /// The TXT value that proves `owner` controls `fqdn`.
    pub(crate) fn token_for(&self, owner: &str, fqdn: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"meshgate-challenge-v1\0");
        h.update(owner.as_bytes());
        h.update(b"\0");
        h.update(fqdn.as_bytes());
        format!("mgv1-{}", hex(h.finalize().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_file_is_0600_complete_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let contents = vec![b'x'; 100_000];
        write_secret_file(&path, &contents).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), contents);
        assert_eq!(read_secret_file(&path).unwrap(), Some(contents.clone()));
        // An existing file is kept; no temporary file is left behind either way.
        let e = write_secret_file(&path, b"other").unwrap_err();
        assert!(e.to_string().contains("admin.token"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), contents);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.token")]);
    }

    #[test]
    fn token_round_trip_and_mismatch() {
        let t = new_token();
        let parsed = parse_token(&t.token).unwrap();
        assert_eq!(parsed.id, t.id);
        assert!(parsed.matches(&t.hash));
        let other = new_token();
        assert!(!parsed.matches(&other.hash));
        assert!(parse_token("mg_zz_00").is_none());
        assert!(parse_token("Bearer x").is_none());
    }

    #[test]
    fn admin_token_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let (admin, text) = AdminToken::load_or_create(&path).unwrap();
        assert!(admin.matches(&text));
        assert!(!admin.matches("nope"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, text2) = AdminToken::load_or_create(&path).unwrap();
        assert_eq!(text, text2);
        assert!(again.matches(&text));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            AdminToken::load_or_create(&path),
            Err(SecretError::Permissions { .. })
        ));
    }

    #[test]
    fn challenge_tokens_bind_owner_and_domain() {
        let key = ChallengeKey::from_bytes([7; 32]);
        let a = key.token_for("alice", "shop.example");
        assert_eq!(a, key.token_for("alice", "shop.example"));
        assert_ne!(a, key.token_for("bob", "shop.example"));
        assert_ne!(a, key.token_for("alice", "blog.example"));
        assert_ne!(
            a,
            ChallengeKey::from_bytes([8; 32]).token_for("alice", "shop.example")
        );
    }
}
