//! meshgate reservations: deployers' names under the farmer's domain and their own custom
//! domains. The model and its validation ([`reservation`]), the custom-domain lifecycle
//! ([`lifecycle`], sans-IO), the store behind a backend-neutral trait ([`store`]), admin and
//! deployer tokens ([`token`]), the DNS verifier that proves domains ([`verify`]) and the
//! backend-consent checker ([`consent`]).
//!
//! Dependencies point one way: `verify` and `consent` → `store` → `lifecycle` →
//! `reservation`; `token`, `counters` and `clock` are leaves.

pub mod clock;
pub mod consent;
pub mod counters;
pub mod lifecycle;
pub mod reservation;
pub mod store;
pub mod token;
pub mod verify;
