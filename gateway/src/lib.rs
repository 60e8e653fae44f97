//! The gateway: listeners, SNI/Host classification, TLS, HTTP proxying, splicing, backend
//! pools, admin API, and the `meshgate` subcommands.
//!
//! Path of a connection: accept ([`server`]) → classify by ClientHello ([`hello`]) → route
//! ([`routes`]) → dial ([`backend`], [`dial`]) → splice (passthrough) or proxy HTTP ([`proxy`]).

pub mod admin;
pub mod api;
pub mod backend;
mod clients;
pub mod cmd;
pub mod dial;
pub mod hello;
pub mod io;
pub mod metrics;
pub mod overlay;
pub mod overlay_metrics;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod routes;
pub mod server;
pub mod ssrf;
pub mod tls;
