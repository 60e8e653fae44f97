//! `[log]`: how the gateway writes its access log (one record per proxied request and per
//! passthrough stream). Diagnostics always go to stderr, filtered by `RUST_LOG`.

use serde::Deserialize;

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// `text` (default): access records are `access` lines among the diagnostics on stderr;
    /// `json`: one JSON object per line on stdout (fields in `docs/operations.md`); `off`:
    /// none (metrics still count every request).
    #[serde(default)]
    pub access: AccessFormat,
}

/// The access log's format (`[log] access`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Text,
    Json,
    Off,
}
