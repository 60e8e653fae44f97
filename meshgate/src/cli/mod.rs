//! One module per `meshgate` subcommand; each exposes `Args` and `run`.

pub(crate) mod check;
pub(crate) mod demo;
pub(crate) mod docs;
pub(crate) mod fleet;
pub(crate) mod gateway;
pub(crate) mod keygen;
pub(crate) mod node;
pub(crate) mod reserve;
