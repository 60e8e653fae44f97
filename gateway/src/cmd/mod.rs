//! One module per `meshgate` subcommand; each exposes `Args` and `run`.

pub mod demo;
pub mod gateway;
pub mod keygen;
pub mod node;
pub mod reserve;
