//! meshgate configuration: the TOML files, the reservation model, validation and the stores.

pub mod file;
pub mod gateway;
pub mod route;
