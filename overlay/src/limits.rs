//! Limits on what hostile peers can make a node hold or do: link queues, unverified links,
//! link counts, routing table, session table and session-init rate. Every limit has a
//! default here, a config key (`meshgate_config::overlay_limits::OverlayLimits`) and a counter in
//! the core's `Counters`; `docs/security.md` lists them.

use crate::clock::Micros;

/// All overlay limits. Defaults suit a node with a few hundred peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Frames queued on one link at most, control frames included (`link_queue_drops`,
    /// `link_control_drops`).
    pub link_queue_frames: usize,
    /// Bytes queued on one link at most (same counters).
    pub link_queue_bytes: usize,
    /// A link whose socket takes no byte for this long while frames wait is closed
    /// (`link_write_stalls`).
    pub write_stall_timeout: Micros,
    /// A link that has not completed its Hello exchange (no RTT sample) this long after it
    /// came up is closed (`hello_timeouts`).
    pub hello_timeout: Micros,
    /// Control messages held from a link before its Hello exchange completes; more are
    /// dropped (`unverified_dropped`).
    pub unverified_messages: usize,
    /// Inbound links at most (outbound links to configured peers are always admitted)
    /// (`links_refused`).
    pub max_links: usize,
    /// Inbound links from one remote IP address at most (`links_refused_per_ip`).
    pub max_links_per_ip: usize,
    /// Prefixes in the routing table at most; updates for new prefixes beyond it are refused
    /// (`routing.routes_refused`); known prefixes are never evicted to make room.
    pub max_routes: usize,
    /// Peers with end-to-end session state at most; beyond it the least recently used peer
    /// entry is evicted (`e2e_peers_evicted`).
    pub max_session_peers: usize,
    /// Session inits whose timestamp is further than this from the node's clock are refused
    /// (`e2e_init_outside_window`).
    pub session_init_window: Micros,
    /// Initiators remembered inside the window for replay protection; when full, new inits
    /// are refused until entries age out (`e2e_replay_cache_full`).
    pub session_init_replay_cache: usize,
    /// Session inits addressed to this node accepted per link and second (token bucket rate)
    /// (`session_inits_rate_limited`).
    pub session_inits_per_sec: u32,
    /// Token bucket size for session inits per link.
    pub session_init_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            link_queue_frames: 1024,
            link_queue_bytes: 4 << 20,
            write_stall_timeout: 5_000_000,
            hello_timeout: 10_000_000,
            unverified_messages: 4,
            max_links: 256,
            max_links_per_ip: 8,
            max_routes: 16_384,
            max_session_peers: 16_384,
            session_init_window: 60_000_000,
            session_init_replay_cache: 65_536,
            session_inits_per_sec: 20,
            session_init_burst: 40,
        }
    }
}
