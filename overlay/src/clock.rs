//! The protocol state machines' time: microseconds on the caller's clock.

/// Microseconds on the caller's clock (monotonic; virtual in the simulator).
pub type Micros = u64;
