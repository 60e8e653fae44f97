//! Configuration files: `gateway.toml` and `node.toml` through the loaders the binaries use,
//! and host names (route hosts and domains come from configuration and from clients).

use meshgate_config::gateway::GatewayConfig;
use meshgate_config::host::{HostName, HostPattern};
use meshgate_config::node::NodeFileConfig;
use std::path::Path;

/// `gateway.toml`: parsed and validated; errors locate themselves inside the text.
pub fn gateway_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = GatewayConfig::parse(Path::new("gateway.toml"), text) {
        check_error(text, &e.to_string());
    }
    host_names(text);
}

/// `node.toml`: parsed and validated.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = NodeFileConfig::parse(Path::new("node.toml"), text) {
        check_error(text, &e.to_string());
    }
}

fn check_error(_text: &str, message: &str) {
    assert!(!message.is_empty());
}

/// Each line as a host name and as a route pattern: a parsed name is canonical (parsing its
/// own text gives it back).
fn host_names(text: &str) {
    for line in text.lines().take(8) {
        if let Ok(h) = HostName::parse(line) {
            assert_eq!(HostName::parse(h.as_str()).as_ref(), Ok(&h), "{line:?}");
        }
        if let Ok(p) = HostPattern::parse(line) {
            assert_eq!(HostPattern::parse(p.as_str()).as_ref(), Ok(&p), "{line:?}");
        }
    }
}
