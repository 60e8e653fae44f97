//! Fuzz target bodies: one `fn(&[u8])` per parser of untrusted input, which must never panic
//! on any input. The cargo-fuzz crate (`fuzz/`, nightly, libFuzzer) calls them; on stable, the
//! `corpora` test runs every committed corpus file of every target through them, so the
//! corpora are regression tests in `cargo test --workspace`. Besides "no panic", each target
//! asserts what a correct parser guarantees (round trips, agreement with another parser, bounds).

mod config;
mod gateway;
mod overlay;
mod sockets;

pub use config::{gateway_config, node_config};
pub use gateway::{client_hello, client_hello_reader, proxy_v2};
pub use overlay::{control, link_frames, overlay_node, routed};
pub use sockets::demux;

/// Seed inputs made by the real encoders (rustls, the overlay's nodes), for `examples/seeds`.
pub mod seeds;

/// A target body: any bytes, never a panic.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_hello", client_hello),
    ("client_hello_reader", client_hello_reader),
    ("link_frames", link_frames),
    ("control", control),
    ("routed", routed),
    ("overlay_node", overlay_node),
    ("demux", demux),
    ("proxy_v2", proxy_v2),
    ("gateway_config", gateway_config),
    ("node_config", node_config),
];

/// A small deterministic generator for choices derived from fuzz input (chunk sizes).
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One current-thread runtime per thread, reused across inputs.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
    }
    RT.with(|rt| rt.block_on(f))
}
