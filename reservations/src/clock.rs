//! The wall clock reservations are stamped with (unix seconds and milliseconds). The state
//! machine in the `lifecycle` module never reads it; its callers pass the time in.

/// Current time in unix seconds.
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Current time in unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
