//! Errors with enough context to act on: what failed, for which name or file, and the ACME
//! problem detail when the server sent one.

use std::path::PathBuf;

/// Why an order for a certificate failed. `message` carries the ACME problem detail
/// (type and text) when the server reported one.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct IssueError {
    pub message: String,
    /// The ACME problem type (e.g. `urn:ietf:params:acme:error:connection`), when known.
    pub problem_type: Option<String>,
}

impl IssueError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        IssueError {
            message: message.into(),
            problem_type: None,
        }
    }

    /// Wraps an instant-acme error, keeping the problem type of an ACME problem document.
    pub(crate) fn acme(context: impl std::fmt::Display, err: &instant_acme::Error) -> Self {
        let problem_type = match err {
            instant_acme::Error::Api(p) => p.r#type.clone(),
            _ => None,
        };
        IssueError {
            message: format!("{context}: {err}"),
            problem_type,
        }
    }

    /// An error from an ACME problem document reported on a challenge or order.
    pub(crate) fn problem(context: impl std::fmt::Display, p: &instant_acme::Problem) -> Self {
        IssueError {
            message: format!("{context}: {p}"),
            problem_type: p.r#type.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error("certificate: {0}")]
    Cert(String),
    /// The order lock was lost (its lease lapsed, another gateway took it): the certificate
    /// was not stored.
    #[error("order lock for {key} lost before the certificate was stored: {reason}")]
    Fenced { key: String, reason: String },
    /// The shared store (etcd) failed or is unreachable.
    #[error("certificate store: {0}")]
    Store(String),
    #[error("DNS responder on {addr}: {message}")]
    Dns { addr: String, message: String },
}

impl CertError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        CertError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
