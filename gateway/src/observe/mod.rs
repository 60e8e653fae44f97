//! What the gateway tells its operator about traffic: Prometheus metrics, and the one
//! logging-and-metrics phase that closes every proxied request and passthrough stream.

pub(crate) mod collector;
pub(crate) mod history;
pub(crate) mod log;
pub(crate) mod metrics;
