//! The shared test kit of the meshgate workspace (a dev-dependency only).
//!
//! - [`net`]: listeners handed over already bound, reserved ports for child processes,
//!   refusing and silent addresses;
//! - [`eventually`]: polling a condition within a bounded deadline;
//! - [`http`], [`ws`], [`tls`]: HTTP/1.1, h2c, WebSocket, TCP and TLS backends, TLS clients
//!   and a throwaway CA; [`pattern`]: payloads that reveal corruption;
//! - [`process`], [`curl`]: the `meshgate gateway` binary as a fixture and curl as a client;
//! - [`pebble`], [`dns`]: an ACME server and an authoritative DNS server on loopback;
//!   [`acme`]: the HTTP-01 and TLS-ALPN-01 responders of a gateway in the test process;
//! - [`etcd`]: a real etcd cluster of child processes whose members a test kills, pauses and
//!   restarts, and a relay that cuts one client off from it.
//!
//! Everything listens and connects on loopback only. The kit depends on no meshgate crate,
//! so every crate can use it without a dependency cycle.

pub mod acme;
pub mod browser;
pub mod curl;
pub mod dns;
pub mod etcd;
pub mod eventually;
pub mod http;
pub mod net;
pub mod pattern;
pub mod pebble;
pub mod process;
pub mod tls;
pub mod ws;

pub use eventually::{eventually, eventually_async, eventually_blocking, eventually_ok};
pub use net::{Reserved, listener, std_listener};
