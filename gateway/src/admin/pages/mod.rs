//! The status pages, each one self-contained HTML document (inline CSS and script, SVG charts
//! drawn by the script, no external assets): the operator's at `/` on the operator's listener
//! (reads `/status`), the deployers' at `/` on the deployers' listener (reads `/v1/…` with the
//! token the deployer types in; the token stays in the page's session storage and travels
//! only in the `Authorization` header).

use crate::http::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;

const OPERATOR: &str = include_str!("operator.html");
const DEPLOYER: &str = include_str!("deployer.html");

/// Scripts and styles only from the page itself, requests only to its own listener, no
/// framing, no referrer.
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                      img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                      frame-ancestors 'none'";

/// The operator's status page.
pub(crate) fn operator() -> Response<Body> {
    page(OPERATOR)
}

/// The deployers' page.
pub(crate) fn deployer() -> Response<Body> {
    page(DEPLOYER)
}

fn page(html: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(html.as_bytes()))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No page loads anything from elsewhere.
    #[test]
    fn pages_reference_no_external_assets() {
        for html in [OPERATOR, DEPLOYER] {
            for needle in ["src=", "href=\"http", "@import", "url(", "//cdn", "<link"] {
                assert!(!html.contains(needle), "page contains {needle}");
            }
        }
    }
}
