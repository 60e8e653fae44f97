//! The client's request body, lent to one backend attempt at a time, so that a request whose
//! body no backend has read yet can be retried on another backend.

use crate::http::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The client's request body, lent to one backend attempt at a time. It stays in the shared
/// slot until hyper first polls it, so after a failed connect (nothing polled) the next
/// backend gets it whole; once polled it counts as started and is never offered again.
/// A request without a body (most) lends an empty body: no slot, no lock, no allocation.
pub(crate) struct LentBody {
    shared: Option<Lent>,
}

#[derive(Clone)]
struct Lent {
    slot: Arc<std::sync::Mutex<Option<Body>>>,
    started: Arc<AtomicBool>,
}

impl LentBody {
    pub(crate) fn new(body: Body) -> Self {
        LentBody {
            shared: Some(Lent {
                slot: Arc::new(std::sync::Mutex::new(Some(body))),
                started: Arc::default(),
            }),
        }
    }

    /// The body of a request that has none.
    pub(crate) fn empty() -> Self {
        LentBody { shared: None }
    }

    /// A request body reading from the shared slot.
    pub(crate) fn lend(&self) -> Body {
        match &self.shared {
            Some(lent) => lent.clone().boxed(),
            None => crate::http::body::empty(),
        }
    }

    /// Whether any attempt has polled the body (some of it may have been sent).
    pub(crate) fn started(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|l| l.started.load(Ordering::Acquire))
    }
}

impl Lent {
    fn with_body<T>(&self, f: impl FnOnce(Option<&mut Body>) -> T) -> T {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        f(slot.as_mut())
    }
}

impl hyper::body::Body for Lent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        self.started.store(true, Ordering::Release);
        self.with_body(|b| match b {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.with_body(|b| b.is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.with_body(|b| {
            b.map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
        })
    }
}
