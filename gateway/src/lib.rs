//! The gateway library: public ingress into overlay workloads. It owns the request path, by
//! layer (each layer only calls the ones below it):
//!
//! | layer | module | owns |
//! |---|---|---|
//! | listen | [`listen`] | binding, accepting, connection limits, dispatch by listener kind |
//! | classify | [`classify`] | reading the ClientHello and the pure decision it leads to |
//! | passthrough | [`passthrough`] | splicing TLS streams by SNI (PROXY v2 header) |
//! | http | [`http`] | the HTTP server on a client connection, HTTP-01, the proxy's phases |
//! | upstream | [`upstream`] | backend pools, health, dialers (the seam to the overlay), clients |
//! | admin | [`admin`] | the operator listener: `/status`, `/metrics`, `/reload`, the reservations API |
//!
//! [`Gateway`] is assembled once, from [`GatewayParts`], with every dependency given up front;
//! the state shared by the layers ([`state`]) changes afterwards only where it is meant to
//! (route table, certificates, the configuration on reload), each swapped whole.

#![warn(unreachable_pub)]

pub mod admin;
mod classify;
#[doc(hidden)]
pub mod fuzzing;
mod gateway;
mod http;
mod io;
pub mod listen;
mod observe;
mod passthrough;
pub mod routes;
mod state;
pub mod tls;
pub mod upstream;

pub use gateway::{Gateway, GatewayParts, OverlayParts, ReservationParts};
