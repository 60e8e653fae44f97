//! The backend side: pools per route (selection, health, retries, limits), the dialers that
//! turn a backend address into a byte stream (overlay node or kernel, behind the SSRF guard),
//! and the HTTP clients that keep connections to backends alive.

pub(crate) mod clients;
pub(crate) mod connector;
pub mod dial;
pub mod overlay;
pub mod pool;
pub(crate) mod ssrf;
