//! meshgate configuration: the types of `gateway.toml` and `node.toml`, their TOML parsing
//! and validation, routes and pools, the one validated [`host::HostName`], and the private
//! file writer for secrets the configuration names. No runtime, store or DNS code: those
//! live in the crates that use this one.

pub mod file;
pub mod fleet;
pub mod gateway;
pub mod host;
pub mod log;
pub mod nat64;
pub mod node;
pub mod overlay_limits;
pub mod pool;
pub mod private_file;
pub mod route;
pub mod upstream;
