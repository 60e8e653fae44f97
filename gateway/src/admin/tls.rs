//! TLS for the operator's and the deployers' listeners (`[admin] tls`, `[api] tls`): a
//! certificate from files or issued by the dev CA, HTTP/1.1 only.

use crate::tls::Always;
use anyhow::{Context, Result};
use meshgate_certs::DevCa;
use meshgate_certs::load_pem_files;
use meshgate_config::gateway::ListenerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// The TLS acceptor of the listener on `listen` from its `tls` table (`table` names it in
/// errors: `admin` or `api`), or `None` for plain HTTP.
pub(crate) fn acceptor(
    table: &str,
    tls: Option<&ListenerTls>,
    listen: SocketAddr,
    dev_ca: Option<&DevCa>,
) -> Result<Option<TlsAcceptor>> {
    let Some(t) = tls else {
        return Ok(None);
    };
    let cert = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            warn_if_readable_by_others(key);
            load_pem_files(cert, key)
                .with_context(|| format!("{table}.tls: cannot load the certificate"))?
                .1
        }
        _ => {
            let ca =
                dev_ca.with_context(|| format!("{table}.tls.dev_ca needs a [tls.dev_ca] table"))?;
            ca.certified_key(&dev_ca_names(t, listen))
                .with_context(|| {
                    format!("{table}.tls: cannot issue the certificate from the dev CA")
                })?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(cert)));
    // These listeners speak HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Private keys are secrets (mode 0600); say so when the file is open to group or others.
fn warn_if_readable_by_others(key: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(key)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %key.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "TLS key is readable by group or others; chmod 600 it"
        );
    }
}

/// Names on a dev-CA certificate: the configured ones, else the listen address (both
/// loopbacks when it is a wildcard) and `localhost`.
fn dev_ca_names(tls: &ListenerTls, listen: SocketAddr) -> Vec<String> {
    if !tls.names.is_empty() {
        return tls.names.clone();
    }
    let ip = listen.ip();
    let mut names = if ip.is_unspecified() {
        vec!["127.0.0.1".to_string(), "::1".to_string()]
    } else {
        vec![ip.to_string()]
    };
    names.push("localhost".into());
    names
}
