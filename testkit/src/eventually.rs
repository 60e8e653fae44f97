//! Waiting for a condition: poll it until it holds, within a bounded deadline, and fail with
//! a message naming what was awaited and the last state seen.
//!
//! Deadlines run on tokio's clock, so a test with paused time waits in virtual time. The
//! blocking variant is for synchronous tests (`#[test]` driving child processes).

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns true; panics after `limit` naming `what`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    eventually_ok(limit, what, || {
        let ok = cond();
        async move { if ok { Ok(()) } else { Err("not yet") } }
    })
    .await
}

/// Polls the async condition `cond` until it returns true; panics after `limit` naming `what`.
pub async fn eventually_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_ok(limit, what, || {
        let f = cond();
        async move { if f.await { Ok(()) } else { Err("not yet") } }
    })
    .await
}

/// Polls `probe` until it returns `Ok(value)` and returns the value; after `limit` panics
/// naming `what` with the last error (put the state worth seeing on failure in it).
pub async fn eventually_ok<T, E, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!(
                    "timed out after {:?} waiting for {what}; last: {last:?}",
                    started.elapsed()
                )
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// [`eventually_ok`] for synchronous code: polls `probe` on this thread.
pub fn eventually_blocking<T, E: Debug>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if started.elapsed() >= limit => {
                panic!(
                    "timed out after {:?} waiting for {what}; last: {last:?}",
                    started.elapsed()
                )
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let n = Arc::new(AtomicU32::new(0));
        let c = n.clone();
        eventually(Duration::from_secs(1), "three polls", move || {
            c.fetch_add(1, Ordering::Relaxed) >= 2
        })
        .await;
        assert_eq!(n.load(Ordering::Relaxed), 3);
        let v = eventually_ok(Duration::from_secs(1), "a value", || async {
            Ok::<_, ()>(7)
        })
        .await;
        assert_eq!(v, 7);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for the impossible; last: \"state 42\"")]
    async fn fails_with_what_and_the_last_state() {
        eventually_ok(Duration::from_millis(100), "the impossible", || async {
            Err::<(), _>("state 42")
        })
        .await;
    }

    #[test]
    #[should_panic(expected = "waiting for never")]
    fn blocking_variant_is_bounded() {
        eventually_blocking(Duration::from_millis(50), "never", || Err::<(), _>(()));
    }
}
