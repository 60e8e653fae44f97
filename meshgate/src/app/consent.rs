//! Backend consent over the overlay, both ends: a node answers `GET /v1/consent` on its
//! overlay address, port [`CONSENT_PORT`], with its `[consent] allow` list; a gateway asks
//! through its overlay dialer ([`OverlayConsentSource`]). The overlay's end-to-end session is
//! what makes the answer authentic: only the holder of the address's key can answer from it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshgate_gateway::upstream::dial::Dialer;
use meshgate_reservations::consent::{
    Answer, CONSENT_PATH, CONSENT_PORT, ConsentDoc, ConsentGrant, ConsentSource, MAX_CONSENT_BYTES,
};
use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};

/// Longest a consent connection may last on the node (headers, answer and all): a peer that
/// dribbles its request gives its slot back after this.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);
/// Time a consent client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway side: asks a node over the overlay, bounded by `timeout` (connect, request and
/// answer) and [`MAX_CONSENT_BYTES`].
pub struct OverlayConsentSource {
    pub dialer: Arc<dyn Dialer>,
    pub timeout: Duration,
}

impl ConsentSource for OverlayConsentSource {
    fn fetch(&self, node: Ipv6Addr) -> Pin<Box<dyn Future<Output = Answer> + Send + '_>> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.ask(node)).await {
                Ok(Ok(doc)) => Answer::Listed(doc),
                Ok(Err(e)) => Answer::Unanswered(e),
                Err(_) => {
                    Answer::Unanswered(format!("no answer within {} ms", self.timeout.as_millis()))
                }
            }
        })
    }
}

impl OverlayConsentSource {
    async fn ask(&self, node: Ipv6Addr) -> Result<ConsentDoc, String> {
        let addr = SocketAddr::from((node, CONSENT_PORT));
        let stream = self
            .dialer
            .dial(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(CONSENT_PATH)
            .header(http::header::HOST, format!("[{node}]:{CONSENT_PORT}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_CONSENT_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer (at most {MAX_CONSENT_BYTES} bytes): {e}"))?
            .to_bytes();
        conn.abort();
        if !status.is_success() {
            return Err(format!("the node answered {status}"));
        }
        let doc: ConsentDoc =
            serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}"))?;
        if doc.version != 1 {
            return Err(format!("unknown consent version {}", doc.version));
        }
        if doc.address != node {
            return Err(format!("the answer names {} instead", doc.address));
        }
        Ok(doc)
    }
}

/// What a node's consent endpoint counts (shown in the node's status).
#[derive(Debug, Default)]
pub struct ConsentStats {
    /// Consent answers sent.
    pub answered: AtomicU64,
    /// Connections closed at [`CONNECTION_LIMIT`] or for a bad request.
    pub cut: AtomicU64,
}

/// A running consent endpoint; stops when dropped.
pub struct ConsentServer {
    task: tokio::task::JoinHandle<()>,
    pub stats: Arc<ConsentStats>,
}

impl Drop for ConsentServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers consent queries on `stack`'s [`CONSENT_PORT`] with the current `allow` list, at
/// most `max_connections` at a time (further ones wait in the stack's listen backlog).
pub fn serve_on_stack(
    stack: &meshgate_sockets::Stack,
    allow: watch::Receiver<Arc<Vec<ConsentGrant>>>,
    max_connections: usize,
) -> std::io::Result<ConsentServer> {
    let listener = Arc::new(stack.listen(CONSENT_PORT)?);
    // The stack's listener fails only when the stack is gone: stop then.
    let accept = move || {
        let listener = listener.clone();
        async move { listener.accept().await.ok().map(|(stream, _)| stream) }
    };
    Ok(serve(accept, stack.address(), allow, max_connections))
}

/// Answers consent queries on a kernel listener bound to the node's overlay address (TUN
/// mode), like [`serve_on_stack`].
pub fn serve_on_listener(
    listener: tokio::net::TcpListener,
    address: Ipv6Addr,
    allow: watch::Receiver<Arc<Vec<ConsentGrant>>>,
    max_connections: usize,
) -> ConsentServer {
    let listener = Arc::new(listener);
    // A kernel accept error (a connection reset before it was taken, no file descriptors
    // left) concerns one connection: keep accepting.
    let accept = move || {
        let listener = listener.clone();
        async move {
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    return Some(stream);
                }
            }
        }
    };
    serve(accept, address, allow, max_connections)
}

/// The accept loop both listeners share: at most `max_connections` answered at a time;
/// `accept` giving `None` ends it.
fn serve<S, F, A>(
    mut accept: F,
    address: Ipv6Addr,
    allow: watch::Receiver<Arc<Vec<ConsentGrant>>>,
    max_connections: usize,
) -> ConsentServer
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> A + Send + 'static,
    A: Future<Output = Option<S>> + Send,
{
    let stats = Arc::new(ConsentStats::default());
    let slots = Arc::new(Semaphore::new(max_connections));
    let s = stats.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(stream) = accept().await else {
                return;
            };
            let (allow, stats) = (allow.clone(), s.clone());
            tokio::spawn(async move {
                answer(stream, address, allow, &stats).await;
                drop(permit);
            });
        }
    });
    ConsentServer { task, stats }
}

/// One consent connection: `GET /v1/consent` gets the list; anything else 404.
async fn answer<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    address: Ipv6Addr,
    allow: watch::Receiver<Arc<Vec<ConsentGrant>>>,
    stats: &ConsentStats,
) {
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let doc = ConsentDoc {
            version: 1,
            address,
            allow: allow.borrow().as_ref().clone(),
        };
        let found = req.method() == http::Method::GET && req.uri().path() == CONSENT_PATH;
        async move {
            let (code, body) = if found {
                (200, serde_json::to_vec(&doc).unwrap_or_default())
            } else {
                (404, format!("try GET {CONSENT_PATH}\n").into_bytes())
            };
            hyper::Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
        Ok(Ok(())) => {
            stats.answered.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            stats.cut.fetch_add(1, Ordering::Relaxed);
        }
    }
}
