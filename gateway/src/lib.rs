//! The gateway: listeners, SNI/Host classification, TLS, HTTP proxying, splicing, backend
//! pools, admin API, and the `meshgate` subcommands.

pub mod cmd;
pub mod dial;
pub mod pool;
