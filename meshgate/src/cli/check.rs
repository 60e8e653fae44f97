//! `meshgate gateway --check`: validates a gateway configuration without starting anything,
//! the files it names included: certificate chains and their keys, the listeners' TLS files,
//! the overlay key, the admin token, the ACME directory's CA file. Every problem is reported
//! located (file, line, key path, what is wrong), not just the first of the files.

use meshgate_config::file::ConfigError;
use meshgate_config::gateway::{GatewayConfig, ListenerTls};
use std::path::Path;

/// What `--check` found: the configuration's summary, or every located problem.
pub(crate) enum Checked {
    Valid(String),
    Invalid(Vec<ConfigError>),
}

/// Parses and validates `path`, then checks each file it names. Parsing stops at the first
/// error (the rest of the file cannot be trusted); the file checks all run.
pub(crate) fn check(path: &Path) -> Checked {
    let config = match GatewayConfig::load(path) {
        Ok(c) => c,
        Err(e) => return Checked::Invalid(vec![e]),
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let at = |field: &str, message: String| ConfigError::at_field(path, &text, field, message);
    let mut errors = Vec::new();
    for (i, files) in config.tls.certificates.iter().enumerate() {
        let field = format!("tls.certificates.{i}");
        check_pem_pair(&files.cert, &files.key, &field, &at, &mut errors);
    }
    for (table, tls) in [("admin", &config.admin.tls), ("api", &config.api.tls)] {
        if let Some(ListenerTls {
            cert: Some(cert),
            key: Some(key),
            ..
        }) = tls
        {
            check_pem_pair(cert, key, &format!("{table}.tls"), &at, &mut errors);
        }
    }
    if let Some(overlay) = &config.overlay {
        let key = &overlay.key_file;
        if key.exists() {
            if let Err(e) = meshgate_overlay::Identity::load(key) {
                errors.push(at("overlay.key_file", format!("{e}")));
            }
        } else if !parent_exists(key) {
            errors.push(at(
                "overlay.key_file",
                format!(
                    "{} does not exist and neither does its directory (the gateway creates the key, not the directory)",
                    key.display()
                ),
            ));
        }
        for (i, peer) in overlay.peers.iter().enumerate() {
            if !peer
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
            {
                errors.push(at(
                    &format!("overlay.peers.{i}"),
                    format!("`{peer}` is not `host:port`"),
                ));
            }
        }
    }
    let token = config
        .admin
        .token_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("admin.token"));
    // Absent, it is created on start; present, it must be a private, valid token.
    if token.exists()
        && let Err(e) = meshgate_reservations::token::AdminToken::load_or_create(&token)
    {
        // The default file lives in `data_dir`: point there when no `token_file` is written.
        let field = match config.admin.token_file {
            Some(_) => "admin.token_file",
            None => "data_dir",
        };
        errors.push(at(field, format!("admin token: {e}")));
    }
    if let Some(ca) = config
        .tls
        .acme
        .as_ref()
        .and_then(|a| a.directory_ca.as_ref())
        && let Err(e) = std::fs::read(ca)
    {
        errors.push(at(
            "tls.acme.directory_ca",
            format!("cannot read {}: {e}", ca.display()),
        ));
    }
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        errors.push(at(
            "data_dir",
            format!(
                "{} exists but is not a directory",
                config.data_dir.display()
            ),
        ));
    }
    if !errors.is_empty() {
        return Checked::Invalid(errors);
    }
    Checked::Valid(format!(
        "{}: OK ({} routes, {} certificate files, overlay {})",
        path.display(),
        config.routes.len(),
        config.tls.certificates.len(),
        if config.overlay.is_some() {
            "on"
        } else {
            "off"
        },
    ))
}

fn parent_exists(file: &Path) -> bool {
    file.parent()
        .is_none_or(|d| d.as_os_str().is_empty() || d.is_dir())
}

/// A certificate chain and its key: both readable, the chain parses, the key parses and is
/// usable for signing, and the key belongs to the chain's leaf.
fn check_pem_pair(
    cert: &Path,
    key: &Path,
    field: &str,
    at: &impl Fn(&str, String) -> ConfigError,
    errors: &mut Vec<ConfigError>,
) {
    let mut readable = true;
    for (name, file) in [("cert", cert), ("key", key)] {
        if let Err(e) = std::fs::read(file) {
            errors.push(at(
                &format!("{field}.{name}"),
                format!("cannot read {}: {e}", file.display()),
            ));
            readable = false;
        }
    }
    if !readable {
        return;
    }
    match meshgate_certs::load_pem_files(cert, key) {
        Err(meshgate_certs::CertError::File { path, message }) => {
            let name = if path == key { "key" } else { "cert" };
            errors.push(at(
                &format!("{field}.{name}"),
                format!("{}: {message}", path.display()),
            ));
        }
        Err(e) => errors.push(at(field, format!("{e}"))),
        Ok((_, certified)) => {
            if let Err(e) = certified.keys_match() {
                errors.push(at(
                    &format!("{field}.key"),
                    format!(
                        "{} is not the private key of {}'s certificate ({e})",
                        key.display(),
                        cert.display()
                    ),
                ));
            }
        }
    }
}
