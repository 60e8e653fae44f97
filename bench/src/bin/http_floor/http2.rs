//! h2 on one client connection: the h2 crate without hyper around it. Each stream is served
//! inside the connection's own task (no task per stream), over a pooled HTTP/1.1 backend
//! connection of its own.

use crate::{
    MAX_HEADERS, Named, Pool, Refusal, read_head, response_framing, upstream_head, valid_host,
};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Largest response body relayed (read whole, then sent on).
const MAX_BODY: u64 = 1 << 20;

/// Serves the connection's streams until the client closes it.
pub async fn serve(tls: TlsStream<TcpStream>, peer: &str, pool: &Pool) -> Result<(), h2::Error> {
    let mut conn = h2::server::handshake(tls).await?;
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => streams.push(stream(req, respond, peer, pool)),
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
        }
    }
}

/// One stream: the backend's response, or the proxy's own refusal.
async fn stream(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: &str,
    pool: &Pool,
) {
    let (parts, body) = req.into_parts();
    let (status, headers, body) = answer(exchange(&parts, body.is_end_stream(), peer, pool).await);
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    let end = body.is_empty();
    if let Ok(mut send) = respond.send_response(response, end)
        && !end
    {
        let _ = send.send_data(body, true);
    }
}

/// The response to send: the backend's, or the proxy's refusal.
pub fn answer(
    exchanged: Result<(StatusCode, HeaderMap, Bytes), Refusal>,
) -> (StatusCode, HeaderMap, Bytes) {
    exchanged.unwrap_or_else(|refusal| {
        let (code, _, why) = refusal.status();
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
        (status, HeaderMap::new(), Bytes::from_static(why.as_bytes()))
    })
}

/// Sends a request without a body to the backend as HTTP/1.1 and reads its whole response.
pub async fn exchange(
    req: &Parts,
    no_request_body: bool,
    peer: &str,
    pool: &Pool,
) -> Result<(StatusCode, HeaderMap, Bytes), Refusal> {
    if !no_request_body {
        return Err(Refusal::NotImplemented("request bodies"));
    }
    let host = (req.uri.authority().map(|a| a.as_str().as_bytes()))
        .or_else(|| req.headers.get(http::header::HOST).map(|v| v.as_bytes()))
        .filter(|h| valid_host(h))
        .ok_or(Refusal::BadRequest(
            "no :authority or Host, or not a host name",
        ))?;
    // hyper's HTTP/1.1 server leaves `Connection` and the fields it names in place.
    let mut named = Named::default();
    for value in req.headers.get_all(http::header::CONNECTION) {
        if named.add(value.as_bytes()).is_err() {
            return Err(Refusal::BadRequest("too many Connection options"));
        }
    }
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(512);
    upstream_head(
        &mut out,
        (req.method.as_str().as_bytes(), path.as_bytes(), host),
        (req.headers.iter()).map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        &named,
        peer.as_bytes(),
    );
    let mut from_backend = Vec::with_capacity(1024);
    let mut conn = pool.take().await?;
    // A pooled connection the backend closed meanwhile fails at once: one new one is tried.
    let mut fresh = false;
    let head_len = loop {
        let head = match conn.write_all(&out).await {
            Ok(()) => read_head(&mut conn, &mut from_backend).await,
            Err(e) => Err(e),
        };
        match head {
            Ok(Some(n)) => break n,
            _ if !fresh => {
                conn = pool.dial().await?;
                from_backend.clear();
                fresh = true;
            }
            _ => return Err(Refusal::BadGateway("backend failed or closed")),
        }
    };
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    if !matches!(
        res.parse(&from_backend[..head_len]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(Refusal::BadGateway("malformed response head"));
    }
    let status = (StatusCode::from_u16(res.code.unwrap_or(0)).ok())
        .filter(|s| !s.is_informational())
        .ok_or(Refusal::BadGateway("interim or invalid status"))?;
    let mut named = Named::default();
    let length = response_framing(res.headers, &mut named)?
        .ok_or(Refusal::BadGateway("responses without a length"))?;
    let no_body = req.method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = if no_body { 0 } else { length };
    if length > MAX_BODY {
        return Err(Refusal::BadGateway("response body over 1 MiB"));
    }
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    for h in res
        .headers
        .iter()
        .filter(|h| !named.drops(h.name.as_bytes()))
    {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Err(Refusal::BadGateway("invalid response field"));
        };
        headers.append(name, value);
    }
    let backend_close = named.close;
    let mut body = from_backend.split_off(head_len);
    // Bytes after the body put the connection out of step: it is not reused.
    let reuse = !backend_close && body.len() as u64 <= length;
    body.truncate(length as usize);
    let missing = length - body.len() as u64;
    if missing > 0 {
        let read = (&mut conn).take(missing).read_to_end(&mut body).await;
        if read.ok() != Some(missing as usize) {
            return Err(Refusal::BadGateway("backend closed within the body"));
        }
    }
    if reuse {
        pool.give(conn);
    }
    Ok((status, headers, Bytes::from(body)))
}
