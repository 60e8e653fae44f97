//! HTTP/1.1 on one client connection: heads parsed in place and rewritten, the backend
//! connection driven by this connection's task.

use crate::{
    MAX_HEADERS, Named, Pool, Refusal, add_length, copy_exact, read_head, response_framing,
    upstream_head, valid_host,
};
use meshgate_gateway::upstream::dial::BoxStream;
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// How a response's body ends.
#[derive(Clone, Copy)]
enum Body {
    Length(u64),
    /// No length: until the backend closes.
    UntilClose,
}

/// What the proxy keeps of a request once its upstream head is written.
struct Request {
    length: u64,
    close: bool,
    head_only: bool,
}

/// One client connection, its buffers, and the backend connection it holds while it lives.
pub struct Connection<'p> {
    client: TlsStream<TcpStream>,
    /// `for` of the forwarding headers.
    peer: String,
    pool: &'p Pool,
    upstream: Option<BoxStream>,
    /// Bytes read from the client (heads and bodies), from the backend, and a head being
    /// written.
    from_client: Vec<u8>,
    from_backend: Vec<u8>,
    out: Vec<u8>,
}

impl<'p> Connection<'p> {
    pub fn new(client: TlsStream<TcpStream>, peer: String, pool: &'p Pool) -> Self {
        Connection {
            client,
            peer,
            pool,
            upstream: None,
            from_client: Vec::with_capacity(4096),
            from_backend: Vec::with_capacity(4096),
            out: Vec::with_capacity(4096),
        }
    }

    pub async fn serve(mut self) -> io::Result<()> {
        loop {
            let Some(head_len) = read_head(&mut self.client, &mut self.from_client).await? else {
                break; // the client closed between requests
            };
            let request = match self.request_head(head_len) {
                Ok(r) => r,
                Err(refusal) => return self.refuse(refusal).await,
            };
            match self.exchange(head_len, request).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(refusal) => return self.refuse(refusal).await,
            }
        }
        if let Some(u) = self.upstream.take() {
            self.pool.give(u);
        }
        Ok(())
    }

    /// Checks the request head in `from_client[..head_len]` and writes the upstream head into
    /// `out`.
    fn request_head(&mut self, head_len: usize) -> Result<Request, Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        match req.parse(&self.from_client[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(Refusal::BadRequest("malformed request head")),
        }
        if req.version != Some(1) {
            return Err(Refusal::NotImplemented("only HTTP/1.1"));
        }
        let (method, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
        let mut host: Option<&[u8]> = None;
        let mut length: Option<u64> = None;
        let mut named = Named::default();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("host") {
                if host.replace(h.value).is_some() {
                    return Err(Refusal::BadRequest("Host repeated"));
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                add_length(&mut length, h.value).map_err(Refusal::BadRequest)?;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Refusal::NotImplemented("chunked request bodies"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                return Err(Refusal::NotImplemented("upgrades"));
            } else if h.name.eq_ignore_ascii_case("connection") && named.add(h.value).is_err() {
                return Err(Refusal::BadRequest("too many Connection options"));
            }
        }
        let host = host
            .filter(|h| valid_host(h))
            .ok_or(Refusal::BadRequest("Host missing or not a host name"))?;
        upstream_head(
            &mut self.out,
            (method.as_bytes(), path.as_bytes(), host),
            req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
            &named,
            self.peer.as_bytes(),
        );
        Ok(Request {
            length: length.unwrap_or(0),
            close: named.close,
            head_only: method.eq_ignore_ascii_case("HEAD"),
        })
    }

    /// Sends the request (head in `out`, body from the client) upstream and relays the
    /// response; returns whether the client connection stays open.
    async fn exchange(&mut self, head_len: usize, request: Request) -> Result<bool, Refusal> {
        let length = request.length;
        let in_buffer = (self.from_client.len() - head_len).min(length as usize);
        self.out
            .extend_from_slice(&self.from_client[head_len..head_len + in_buffer]);
        self.from_client.drain(..head_len + in_buffer);
        let rest = length - in_buffer as u64;
        // A pooled connection the backend closed meanwhile fails at once; if none of the
        // request's body was taken from the client yet, one fresh connection is tried.
        let mut fresh = self.upstream.is_none();
        loop {
            let upstream = match self.upstream.as_mut() {
                Some(u) => u,
                None => self.upstream.insert(self.pool.take().await?),
            };
            let mut answered = upstream.write_all(&self.out).await;
            if answered.is_ok() && rest > 0 {
                answered = copy_exact(&mut self.client, upstream, rest).await;
            }
            let head = match answered {
                Ok(()) => read_head(upstream, &mut self.from_backend).await,
                Err(e) => Err(e),
            };
            match head {
                Ok(Some(n)) => return self.response(n, &request).await,
                _ if !fresh && rest == 0 => {
                    self.upstream = Some(self.pool.dial().await?);
                    self.from_backend.clear();
                    fresh = true;
                }
                _ => return Err(Refusal::BadGateway("backend failed or closed")),
            }
        }
    }

    /// Relays the response whose head is `from_backend[..head_len]`.
    async fn response(&mut self, head_len: usize, request: &Request) -> Result<bool, Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut fields);
        match res.parse(&self.from_backend[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(Refusal::BadGateway("malformed response head")),
        }
        let code = res.code.unwrap_or(0);
        if !(200..=999).contains(&code) {
            return Err(Refusal::BadGateway("interim responses"));
        }
        let mut named = Named::default();
        let length = response_framing(res.headers, &mut named)?;
        let backend_close = named.close;
        let body = if request.head_only || code == 204 || code == 304 {
            Body::Length(0)
        } else {
            length.map_or(Body::UntilClose, Body::Length)
        };
        let keep = !request.close && matches!(body, Body::Length(_));
        let out = &mut self.out;
        out.clear();
        let code_text = [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        let reason = res.reason.unwrap_or("").as_bytes();
        for part in [&b"HTTP/1.1 "[..], &code_text, b" ", reason, b"\r\n"] {
            out.extend_from_slice(part);
        }
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            if !named.drops(name) {
                for part in [name, b": ", h.value, b"\r\n"] {
                    out.extend_from_slice(part);
                }
            }
        }
        out.extend_from_slice(if keep {
            b"\r\n"
        } else {
            b"connection: close\r\n\r\n"
        });
        let Some(upstream) = self.upstream.as_mut() else {
            return Err(Refusal::BadGateway("no backend connection"));
        };
        let after_head = self.from_backend.len() - head_len;
        let result = match body {
            Body::Length(n) => {
                let in_buffer = after_head.min(n as usize);
                out.extend_from_slice(&self.from_backend[head_len..head_len + in_buffer]);
                self.from_backend.drain(..head_len + in_buffer);
                match self.client.write_all(out).await {
                    Ok(()) if n > in_buffer as u64 => {
                        copy_exact(upstream, &mut self.client, n - in_buffer as u64).await
                    }
                    other => other,
                }
            }
            Body::UntilClose => {
                out.extend_from_slice(&self.from_backend[head_len..]);
                self.from_backend.clear();
                match self.client.write_all(out).await {
                    Ok(()) => tokio::io::copy(upstream, &mut self.client).await.map(drop),
                    Err(e) => Err(e),
                }
            }
        };
        // The backend's connection is reused only after a whole, length-delimited response
        // with nothing after it.
        if backend_close
            || !matches!(body, Body::Length(_))
            || !self.from_backend.is_empty()
            || result.is_err()
        {
            self.upstream = None;
            self.from_backend.clear();
        }
        if result.is_err() {
            return Ok(false);
        }
        let _ = self.client.flush().await;
        Ok(keep)
    }

    /// Answers the client itself and closes.
    async fn refuse(mut self, refusal: Refusal) -> io::Result<()> {
        let (code, reason, why) = refusal.status();
        let text = format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{why}\n",
            why.len() + 1
        );
        self.client.write_all(text.as_bytes()).await?;
        self.client.shutdown().await
    }
}
