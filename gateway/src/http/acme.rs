//! ACME HTTP-01 on plain HTTP: `/.well-known/acme-challenge/<token>` is answered from the
//! certificate manager's pending challenges, whatever the host.

use super::body::{Body, full};
use crate::state::Shared;
use bytes::Bytes;
use http::{Request, Response, StatusCode};

/// The answer to an HTTP-01 validation request, or `None` for any other request.
pub(crate) fn http01<B>(shared: &Shared, req: &Request<B>) -> Option<Response<Body>> {
    let token = req
        .uri()
        .path()
        .strip_prefix("/.well-known/acme-challenge/")?;
    let answer = shared.certs.as_ref().and_then(|c| c.http01_response(token));
    Some(match answer {
        Some(a) => {
            let mut r = Response::new(super::body::from_bytes(Bytes::from(a)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        None => full(StatusCode::NOT_FOUND, "No such challenge."),
    })
}
