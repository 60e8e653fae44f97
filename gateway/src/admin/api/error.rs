//! JSON responses and the API's error shape: `{"error": {"field": "...", "reason": "..."}}`.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use meshgate_reservations::reservation::FieldError;
use meshgate_reservations::store::StoreError;

/// An API refusal: a status, the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: String,
    pub reason: String,
}

impl ApiError {
    pub fn new(status: StatusCode, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError {
            status,
            field: field.into(),
            reason: reason.into(),
        }
    }
    pub fn bad_request(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, field, reason)
    }
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authorization", reason)
    }
    pub fn forbidden(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, field, reason)
    }
    pub fn not_found(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, field, reason)
    }
    pub fn conflict(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, field, reason)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "",
            "internal error; see the gateway log",
        )
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        json_response(
            self.status,
            &serde_json::json!({"error": {"field": self.field, "reason": self.reason}}),
        )
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::bad_request(e.field, e.reason)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Unavailable { cause } = &e {
            // The fleet's shared store (etcd) is down: reads still work from the cache,
            // writes wait for it. Name the cause so the caller knows it is not their request.
            tracing::warn!("admin API: {e}");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store",
                format!(
                    "the shared reservation store (etcd) is unavailable, try again later: {cause}"
                ),
            );
        }
        tracing::error!("admin API: {e}");
        ApiError::internal()
    }
}

/// A JSON response with `status`.
pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// An empty `204 No Content`.
pub(super) fn no_content() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}
