//! meshgate configuration: the TOML files, the reservation model, validation and the stores.

pub mod file;
pub mod gateway;
pub mod node;
pub mod pool;
pub mod reservation;
pub mod route;
pub mod store;
pub mod token;
pub mod verify;
