//! Graceful stop (SIGTERM): the accept loops end, so new connections are refused; every HTTP
//! connection is told to finish what it has in flight and close (hyper's graceful shutdown:
//! `Connection: close` on HTTP/1.1, GOAWAY on h2); once they are all closed, or
//! `timeouts.drain_ms` has passed, tunnels, passthrough streams and whatever connection is
//! left are closed.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The drain's signals and what it waits for; cloned into every connection.
#[derive(Clone, Default)]
pub(crate) struct Drain {
    /// Cancelled when the stop begins: connections finish in-flight requests and close.
    pub(crate) stopping: CancellationToken,
    /// Cancelled when the drain ends: tunnels, splices and connections still open close now.
    pub(crate) closing: CancellationToken,
    /// HTTP connections (terminated TLS, plain HTTP) still serving.
    pub(crate) http: TaskTracker,
    /// Every public connection (HTTP and passthrough), so the stop can wait for their last
    /// access records.
    pub(crate) public: TaskTracker,
}

/// How a drain went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// HTTP connections still open when the deadline passed (0: all finished in time).
    pub(crate) cut: usize,
    /// Passthrough streams and other public connections closed at the end.
    pub(crate) closed: usize,
}

/// After the drain ends, how long closed connections get to write their last records.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Drain {
    /// Tells every connection to finish, waits for the HTTP ones up to `deadline`, then
    /// closes everything left.
    pub(crate) async fn run(&self, deadline: Duration) -> Drained {
        self.stopping.cancel();
        self.http.close();
        self.public.close();
        let _ = tokio::time::timeout(deadline, self.http.wait()).await;
        let cut = self.http.len();
        let closed = self.public.len().saturating_sub(cut);
        self.closing.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.public.wait()).await;
        Drained { cut, closed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    // Real (short) time: the gateway's tests do not pause tokio's clock.
    #[tokio::test]
    async fn waits_for_http_connections_until_the_deadline_then_closes_the_rest() {
        let drain = Drain::default();
        // One HTTP connection finishing 50 ms after the stop, one that never would, and a
        // passthrough stream that runs until told to close.
        let finishing = (drain.http.token(), drain.public.token());
        let stuck = (drain.http.token(), drain.public.token());
        let splice = drain.public.token();
        let d = drain.clone();
        tokio::spawn(async move {
            d.stopping.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(finishing);
        });
        let d = drain.clone();
        tokio::spawn(async move {
            d.closing.cancelled().await;
            drop((stuck, splice));
        });
        let start = Instant::now();
        let drained = drain.run(Duration::from_millis(400)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_millis(1200), "{took:?}");
        assert_eq!((drained.cut, drained.closed), (1, 1));
        assert!(drain.public.is_empty());

        // With nothing stuck, the drain ends as soon as the last connection closes.
        let drain = Drain::default();
        let finishing = drain.http.token();
        let d = drain.clone();
        tokio::spawn(async move {
            d.stopping.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(finishing);
        });
        let start = Instant::now();
        let drained = drain.run(Duration::from_secs(30)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!((drained.cut, drained.closed), (0, 0));
    }
}
