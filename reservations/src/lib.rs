//! meshgate reservations: deployers' names under the farmer's domain and their own custom
//! domains. The model and its validation ([`reservation`]), the custom-domain lifecycle
//! ([`lifecycle`], sans-IO), the store behind a backend-neutral trait ([`store`]), admin and
//! deployer tokens ([`token`]) and the DNS verifier that proves domains ([`verify`]).
//!
//! Dependencies point one way: `verify` → `store` → `lifecycle` → `reservation`; `token` and
//! `clock` are leaves.

pub mod clock;
pub mod lifecycle;
pub mod reservation;
pub mod store;
pub mod token;
pub mod verify;
