//! The certificate manager's configuration: the typed settings it runs on, their defaults and
//! checks, and the conversion from the gateway's `data_dir`, `domains` and `[tls.acme]`.

use crate::error::CertError;
use meshgate_config::gateway::GatewayConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CertConfig {
    /// Certificates, keys and the ACME account live here (dirs 0700, files 0600).
    pub state_dir: PathBuf,
    /// The farmer's domain: `*.<domain>` and `<domain>` are issued by DNS-01.
    pub farmer_domain: Option<String>,
    pub acme: AcmeConfig,
    pub dns: DnsConfig,
    pub renewal: RenewPolicy,
}

impl CertConfig {
    /// Certificates kept in `state_dir` and obtained as `acme` says; no farmer domain, the
    /// default DNS responder and renewal policy.
    pub fn new(state_dir: impl Into<PathBuf>, acme: AcmeConfig) -> Self {
        CertConfig {
            state_dir: state_dir.into(),
            farmer_domain: None,
            acme,
            dns: DnsConfig::default(),
            renewal: RenewPolicy::default(),
        }
    }
}

/// The gateway's certificate settings: state in `<data_dir>/certs`, the first of `domains` as
/// the farmer domain, the rest from `[tls.acme]` (an error when that table is absent).
impl TryFrom<&GatewayConfig> for CertConfig {
    type Error = CertError;

    fn try_from(config: &GatewayConfig) -> Result<Self, CertError> {
        let acme = config
            .tls
            .acme
            .as_ref()
            .ok_or_else(|| CertError::Config("no [tls.acme] table".into()))?;
        let challenge = match acme.challenge.as_str() {
            "http-01" => CustomChallenge::Http01,
            "tls-alpn-01" => CustomChallenge::TlsAlpn01,
            other => {
                return Err(CertError::Config(format!(
                    "tls.acme.challenge: {other:?} is neither \"http-01\" nor \"tls-alpn-01\""
                )));
            }
        };
        Ok(CertConfig {
            state_dir: config.data_dir.join("certs"),
            farmer_domain: config.domains.first().map(|d| d.to_string()),
            acme: AcmeConfig {
                directory: acme.directory.clone(),
                contact_email: acme.contact.trim_start_matches("mailto:").to_string(),
                ca_root: acme.directory_ca.clone(),
                challenge,
                order_timeout_secs: acme.order_timeout_secs.unwrap_or(DEFAULT_ORDER_TIMEOUT),
            },
            dns: DnsConfig {
                listen: acme
                    .dns_responder
                    .then(|| acme.dns_listen.unwrap_or(DEFAULT_DNS_LISTEN)),
                ns_host: acme.ns_host.clone(),
            },
            renewal: RenewPolicy::default(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// `"letsencrypt"`, `"letsencrypt-staging"`, `"local-dev-ca"` (no ACME: leaves come from
    /// the development CA in `<state_dir>/dev-ca`) or a directory URL (`https://…/dir`).
    pub directory: String,
    /// The account's contact email (sent as `mailto:<email>`).
    pub contact_email: String,
    /// A PEM root to trust for the ACME server's own HTTPS (test servers such as Pebble).
    pub ca_root: Option<PathBuf>,
    /// Challenge tried first for custom domains; the other one is the fallback.
    pub challenge: CustomChallenge,
    /// How long one order may take (challenge validation and issuance), in seconds.
    pub order_timeout_secs: f64,
}

impl AcmeConfig {
    /// `directory` (see the field) with account contact `contact_email`; HTTP-01 first,
    /// 90 s orders, the system's roots for the server's HTTPS.
    pub fn new(directory: impl Into<String>, contact_email: impl Into<String>) -> Self {
        AcmeConfig {
            directory: directory.into(),
            contact_email: contact_email.into(),
            ca_root: None,
            challenge: CustomChallenge::default(),
            order_timeout_secs: DEFAULT_ORDER_TIMEOUT,
        }
    }
}

const DEFAULT_ORDER_TIMEOUT: f64 = 90.0;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CustomChallenge {
    #[default]
    Http01,
    TlsAlpn01,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where the DNS-01 responder listens (UDP and TCP); `None` disables it.
    pub listen: Option<SocketAddr>,
    /// The host name in the zone's SOA/NS records: the target of the farmer's
    /// `_acme-challenge.<domain> NS` record. Defaults to `<domain>`.
    pub ns_host: Option<String>,
}

/// DNS-01 validators ask port 53 of the addresses the farmer's NS record names.
const DEFAULT_DNS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 53);

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: Some(DEFAULT_DNS_LISTEN),
            ns_host: None,
        }
    }
}

/// When to renew and how to retry.
#[derive(Debug, Clone)]
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
    pub(crate) fn validate(&self) -> Result<(), CertError> {
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

    pub(crate) fn backoff_initial(&self) -> Duration {
        Duration::try_from_secs_f64(self.backoff_initial_secs).unwrap_or(Duration::from_secs(60))
    }

    /// At most 30 days, so arithmetic on it never overflows.
    pub(crate) fn backoff_max(&self) -> Duration {
        Duration::try_from_secs_f64(self.backoff_max_secs)
            .unwrap_or(Duration::from_secs(86400))
            .min(Duration::from_secs(30 * 86400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> CertConfig {
        let gateway = GatewayConfig::parse(Path::new("gateway.toml"), text).unwrap();
        CertConfig::try_from(&gateway).unwrap()
    }

    #[test]
    fn acme_table_reaches_the_certificate_manager() {
        let cert = parse(
            "domains = [\"gw.example.org\"]\ndata_dir = \"/var/lib/gw\"\n[tls.acme]\n\
             contact = \"mailto:ops@example.org\"\n\
             challenge = \"tls-alpn-01\"\nns_host = \"ns1.example.org\"\n\
             dns_listen = \"127.0.0.1:5353\"\norder_timeout_secs = 30\n",
        );
        assert_eq!(cert.state_dir, Path::new("/var/lib/gw/certs"));
        assert_eq!(cert.dns.ns_host.as_deref(), Some("ns1.example.org"));
        assert_eq!(cert.dns.listen, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(cert.acme.order_timeout_secs, 30.0);
        assert_eq!(cert.acme.challenge, CustomChallenge::TlsAlpn01);
        assert_eq!(cert.acme.contact_email, "ops@example.org");
        assert_eq!(cert.acme.directory, "letsencrypt");
        assert_eq!(cert.farmer_domain.as_deref(), Some("gw.example.org"));
        // Defaults: responder on :53, 90 s orders; `dns_responder = false` turns it off.
        let cert = parse("[tls.acme]\ncontact = \"mailto:ops@example.org\"\n");
        assert_eq!(cert.dns.listen, Some("0.0.0.0:53".parse().unwrap()));
        assert_eq!(cert.acme.order_timeout_secs, 90.0);
        assert_eq!(cert.acme.challenge, CustomChallenge::Http01);
        assert_eq!(cert.farmer_domain, None);
        let cert =
            parse("[tls.acme]\ncontact = \"mailto:ops@example.org\"\ndns_responder = false\n");
        assert_eq!(cert.dns.listen, None);
    }

    #[test]
    fn a_gateway_without_an_acme_table_has_no_certificate_manager() {
        let gateway = GatewayConfig::parse(Path::new("gateway.toml"), "").unwrap();
        let err = CertConfig::try_from(&gateway).unwrap_err().to_string();
        assert!(err.contains("[tls.acme]"), "{err}");
    }
}
