//! Configuration of the certificate manager; the gateway builds it from `[tls.acme]`.

use crate::error::CertError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// Certificates, keys and the ACME account live here (dirs 0700, files 0600).
    pub state_dir: PathBuf,
    /// The farmer's domain: `*.<domain>` and `<domain>` are issued by DNS-01.
    #[serde(default)]
    pub farmer_domain: Option<String>,
    pub acme: AcmeConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub renewal: RenewPolicy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// `"letsencrypt"`, `"letsencrypt-staging"`, `"local-dev-ca"` (no ACME: leaves come from
    /// the development CA in `<state_dir>/dev-ca`) or a directory URL (`https://…/dir`).
    pub directory: String,
    /// The account's contact email (sent as `mailto:<email>`).
    pub contact_email: String,
    /// A PEM root to trust for the ACME server's own HTTPS (test servers such as Pebble).
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// Challenge tried first for custom domains; the other one is the fallback.
    #[serde(default)]
    pub challenge: CustomChallenge,
    /// How long one order may take (challenge validation and issuance), in seconds.
    #[serde(default = "default_order_timeout")]
    pub order_timeout_secs: f64,
}

fn default_order_timeout() -> f64 {
    90.0
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directory {
    Acme(String),
    LocalDevCa,
}

impl AcmeConfig {
    /// Resolves the configured directory name or URL.
    pub fn directory(&self) -> Result<Directory, CertError> {
        use instant_acme::LetsEncrypt;
        Ok(match self.directory.as_str() {
            "letsencrypt" => Directory::Acme(LetsEncrypt::Production.url().to_string()),
            "letsencrypt-staging" => Directory::Acme(LetsEncrypt::Staging.url().to_string()),
            "local-dev-ca" => Directory::LocalDevCa,
            url if url.starts_with("https://") || url.starts_with("http://") => {
                Directory::Acme(url.to_string())
            }
            other => {
                return Err(CertError::Config(format!(
                    "acme.directory: {other:?} is neither \"letsencrypt\", \
                     \"letsencrypt-staging\", \"local-dev-ca\" nor an http(s) URL"
                )));
            }
        })
    }

    /// The account contact URL, checked for the obvious mistakes before any server sees it.
    pub fn contact(&self) -> Result<String, CertError> {
        let email = self.contact_email.trim();
        let email = email.strip_prefix("mailto:").unwrap_or(email);
        if email.is_empty() || email.contains(char::is_whitespace) || email.contains(',') {
            return Err(CertError::Config(format!(
                "acme.contact_email: {:?} is not a single email address",
                self.contact_email
            )));
        }
        Ok(format!("mailto:{email}"))
    }
}

/// The challenge for custom domains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum CustomChallenge {
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Where the DNS-01 responder listens (UDP and TCP); `null` disables it.
    #[serde(default = "default_dns_listen")]
    pub listen: Option<SocketAddr>,
    /// The host name in the zone's SOA/NS records: the target of the farmer's
    /// `_acme-challenge.<domain> NS` record. Defaults to `<domain>`.
    #[serde(default)]
    pub ns_host: Option<String>,
}

fn default_dns_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 53)))
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: default_dns_listen(),
            ns_host: None,
        }
    }
}

/// When to renew and how to retry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewPolicy {
    /// Renew at this fraction of the lifetime (2/3).
    pub renew_at_fraction: f64,
    /// Renewal is pulled earlier by a random part of this fraction of the lifetime, so many
    /// certificates issued together do not renew together.
    pub jitter_fraction: f64,
    /// First retry delay after a failed order; doubles per failure up to `backoff_max_secs`.
    pub backoff_initial_secs: f64,
    pub backoff_max_secs: f64,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        RenewPolicy {
            renew_at_fraction: 2.0 / 3.0,
            jitter_fraction: 0.05,
            backoff_initial_secs: 60.0,
            backoff_max_secs: 86400.0,
        }
    }
}

impl RenewPolicy {
    /// Rejects values that would make the schedule meaningless.
    pub fn validate(&self) -> Result<(), CertError> {
        let bad = |field: &str, v: f64, want: &str| {
            Err(CertError::Config(format!(
                "renewal.{field}: {v} is not {want}"
            )))
        };
        if !(self.renew_at_fraction > 0.0 && self.renew_at_fraction <= 1.0) {
            return bad("renew_at_fraction", self.renew_at_fraction, "in (0, 1]");
        }
        if !(0.0..=0.5).contains(&self.jitter_fraction) {
            return bad("jitter_fraction", self.jitter_fraction, "in [0, 0.5]");
        }
        for (field, v) in [
            ("backoff_initial_secs", self.backoff_initial_secs),
            ("backoff_max_secs", self.backoff_max_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v, "a non-negative number of seconds");
            }
        }
        Ok(())
    }

    pub fn backoff_initial(&self) -> Duration {
        Duration::try_from_secs_f64(self.backoff_initial_secs).unwrap_or(Duration::from_secs(60))
    }

    /// At most 30 days, so arithmetic on it never overflows.
    pub fn backoff_max(&self) -> Duration {
        Duration::try_from_secs_f64(self.backoff_max_secs)
            .unwrap_or(Duration::from_secs(86400))
            .min(Duration::from_secs(30 * 86400))
    }
}
