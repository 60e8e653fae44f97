//! `[fleet]`: several gateways sharing reservations, tokens and certificates on etcd. Without
//! the table a gateway is on its own (embedded store), as before.

use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[fleet]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// The fleet's name: its keys live under `/meshgate/<name>/` in etcd.
    pub name: String,
    /// etcd member endpoints, `http://host:port` or `https://host:port`.
    pub etcd: Vec<String>,
    /// The fleet key (0600, 64 hex characters, the same on every gateway): seals private
    /// keys before they are stored in etcd.
    pub key_file: PathBuf,
    /// This gateway's public addresses, for the fleet's DNS answers.
    #[serde(default)]
    pub advertise: Vec<IpAddr>,
    /// This gateway's id in the fleet; default: its overlay address, or its host name when
    /// it has no overlay node.
    #[serde(default)]
    pub id: Option<String>,
    /// TLS towards etcd (needed for `https://` endpoints).
    #[serde(default)]
    pub tls: Option<FleetTls>,
    /// etcd user name (etcd's own authentication); needs `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// File (0600) holding the etcd user's password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Lease TTL of this gateway's member record: a dead gateway leaves the member list
    /// after at most this long.
    #[serde(default = "default_member_ttl_secs")]
    pub member_ttl_secs: u64,
    /// How long one etcd call may take across retries on every member before the store
    /// counts etcd as unavailable (admin writes then answer 503).
    #[serde(default = "default_call_budget_ms")]
    pub call_budget_ms: u64,
    /// How long a gateway waits for etcd at start before serving from its saved cache.
    #[serde(default = "default_start_wait_ms")]
    pub start_wait_ms: u64,
}

/// `[fleet.tls]`: etcd's CA and this gateway's client certificate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetTls {
    /// CA certificate (PEM) that signs the etcd members' server certificates.
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, 0600).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_member_ttl_secs() -> u64 {
    10
}
fn default_call_budget_ms() -> u64 {
    2000
}
fn default_start_wait_ms() -> u64 {
    3000
}

impl Fleet {
    pub fn member_ttl(&self) -> Duration {
        Duration::from_secs(self.member_ttl_secs)
    }
    pub fn call_budget(&self) -> Duration {
        Duration::from_millis(self.call_budget_ms)
    }
    pub fn start_wait(&self) -> Duration {
        Duration::from_millis(self.start_wait_ms)
    }

    /// Checks the table; on error the field (below `fleet.`) and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, msg: &str| Err((field.to_string(), msg.to_string()));
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !name_ok {
            return bad("name", "expected 1 to 63 of a-z, 0-9, '-', '_', '.'");
        }
        if self.etcd.is_empty() {
            return bad(
                "etcd",
                "expected at least one endpoint like `http://10.0.0.1:2379`",
            );
        }
        for (i, e) in self.etcd.iter().enumerate() {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            match rest {
                Some(hostport) if !hostport.is_empty() && !hostport.contains('/') => {}
                _ => {
                    return Err((
                        format!("etcd.{i}"),
                        format!("`{e}`: expected `http://host:port` or `https://host:port`"),
                    ));
                }
            }
            if e.starts_with("https://") && self.tls.is_none() {
                return Err((
                    format!("etcd.{i}"),
                    format!("`{e}` is https: set [fleet.tls] ca_file"),
                ));
            }
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return bad("tls.cert_file", "cert_file and key_file go together");
        }
        if self.user.is_some() != self.password_file.is_some() {
            return bad("user", "user and password_file go together");
        }
        if let Some(id) = &self.id {
            let ok = !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !ok {
                return bad(
                    "id",
                    "expected 1 to 128 of A-Z, a-z, 0-9, '-', '_', '.', ':'",
                );
            }
        }
        if self.member_ttl_secs < 2 {
            return bad("member_ttl_secs", "expected at least 2 seconds");
        }
        if self.call_budget_ms < 100 {
            return bad("call_budget_ms", "expected at least 100 milliseconds");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(extra: &str) -> Result<Fleet, String> {
        let text = format!(
            "name = \"farm\"\netcd = [\"http://127.0.0.1:2379\"]\nkey_file = \"/k\"\n{extra}"
        );
        let f: Fleet = toml::from_str(&text).map_err(|e| e.to_string())?;
        f.validate()
            .map_err(|(field, msg)| format!("{field}: {msg}"))?;
        Ok(f)
    }

    #[test]
    fn defaults_and_checks() {
        let f = fleet("").unwrap();
        assert_eq!(f.member_ttl(), Duration::from_secs(10));
        assert!(f.advertise.is_empty() && f.id.is_none());
        assert!(
            fleet("user = \"gw\"")
                .unwrap_err()
                .contains("password_file")
        );
        let https = "etcd = [\"https://127.0.0.1:2379\"]";
        assert!(
            toml::from_str::<Fleet>(https).is_err(),
            "name and key_file are required"
        );
        let e = fleet("[tls]\ncert_file = \"/c\"\nca_file = \"/ca\"").unwrap_err();
        assert!(e.contains("key_file"), "{e}");
        assert!(fleet("id = \"a b\"").is_err());
        assert!(fleet("id = \"fd00::1\"").is_ok());
        assert!(fleet("advertise = [\"203.0.113.7\", \"2001:db8::7\"]").is_ok());
    }
}
