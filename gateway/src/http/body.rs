//! Response bodies the gateway writes itself: the boxed body type every response carries, and
//! the small HTML pages for errors and redirects.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use std::convert::Infallible;

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A whole body from bytes.
pub(crate) fn from_bytes(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|n: Infallible| match n {}).boxed()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

/// A short HTML page for `status` saying `text`.
pub(crate) fn full(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = format!(
        "<!doctype html><title>{0} {1}</title><h1>{0} {1}</h1><p>{2}</p>\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text
    );
    let mut resp = Response::new(from_bytes(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}
