//! The overlay node's limits against hostile peers, shared by `node.toml` (`[limits]`) and
//! the gateway's `[overlay.limits]`. Defaults match `meshgate_overlay::Limits::default()`;
//! `docs/security.md` says what happens at each limit and which counter counts it.
//!
//! ```toml
//! [limits]                          # [overlay.limits] in the gateway's config
//! link_queue_frames = 1024          # frames queued per link (control included)
//! link_queue_kib = 4096             # bytes queued per link
//! link_write_stall_ms = 5000        # close a link whose socket takes nothing this long
//! hello_timeout_ms = 10000          # close a link that has not answered a Hello by then
//! unverified_messages = 4           # control messages held before the Hello exchange
//! max_links = 256                   # inbound links in total
//! max_links_per_ip = 8              # inbound links per remote IP
//! max_routes = 16384                # prefixes in the routing table
//! max_session_peers = 16384         # peers with end-to-end session state
//! session_init_window_ms = 60000    # accepted session-init clock skew (±)
//! session_init_replay_cache = 65536 # initiators remembered inside the window
//! session_inits_per_sec = 20        # session inits per link and second
//! session_init_burst = 40           # ... token bucket size
//! ```

use serde::Deserialize;

/// Overlay limits (every key optional; see the module docs for defaults).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayLimits {
    pub link_queue_frames: u32,
    pub link_queue_kib: u32,
    pub link_write_stall_ms: u64,
    pub hello_timeout_ms: u64,
    pub unverified_messages: u32,
    pub max_links: u32,
    pub max_links_per_ip: u32,
    pub max_routes: u32,
    pub max_session_peers: u32,
    pub session_init_window_ms: u64,
    pub session_init_replay_cache: u32,
    pub session_inits_per_sec: u32,
    pub session_init_burst: u32,
}

impl Default for OverlayLimits {
    fn default() -> Self {
        OverlayLimits {
            link_queue_frames: 1024,
            link_queue_kib: 4096,
            link_write_stall_ms: 5000,
            hello_timeout_ms: 10_000,
            unverified_messages: 4,
            max_links: 256,
            max_links_per_ip: 8,
            max_routes: 16_384,
            max_session_peers: 16_384,
            session_init_window_ms: 60_000,
            session_init_replay_cache: 65_536,
            session_inits_per_sec: 20,
            session_init_burst: 40,
        }
    }
}

impl OverlayLimits {
    /// The first limit that is zero (each must be at least 1), as `(key, message)`.
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        let values: [(&'static str, u64); 13] = [
            ("link_queue_frames", self.link_queue_frames.into()),
            ("link_queue_kib", self.link_queue_kib.into()),
            ("link_write_stall_ms", self.link_write_stall_ms),
            ("hello_timeout_ms", self.hello_timeout_ms),
            ("unverified_messages", self.unverified_messages.into()),
            ("max_links", self.max_links.into()),
            ("max_links_per_ip", self.max_links_per_ip.into()),
            ("max_routes", self.max_routes.into()),
            ("max_session_peers", self.max_session_peers.into()),
            ("session_init_window_ms", self.session_init_window_ms),
            (
                "session_init_replay_cache",
                self.session_init_replay_cache.into(),
            ),
            ("session_inits_per_sec", self.session_inits_per_sec.into()),
            ("session_init_burst", self.session_init_burst.into()),
        ];
        values
            .into_iter()
            .find(|(_, v)| *v == 0)
            .map(|(k, _)| (k, "must be at least 1".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_defaults_and_zero_is_invalid() {
        let l: OverlayLimits = toml::from_str("max_links = 3\nlink_write_stall_ms = 900").unwrap();
        assert_eq!(l.max_links, 3);
        assert_eq!(l.link_write_stall_ms, 900);
        assert_eq!(l.max_routes, OverlayLimits::default().max_routes);
        assert!(l.invalid().is_none());
        let zero: OverlayLimits = toml::from_str("max_routes = 0").unwrap();
        assert_eq!(zero.invalid().map(|(k, _)| k), Some("max_routes"));
        assert!(toml::from_str::<OverlayLimits>("max_linkz = 1").is_err());
    }
}
