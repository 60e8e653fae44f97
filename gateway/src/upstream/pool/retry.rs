//! When a failed request may be sent again to another backend.

/// How an attempt to a backend failed, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Connecting failed or timed out: the backend received nothing.
    ConnectFailed,
    /// The connection (often a reused keep-alive one) closed or was reset before any byte of
    /// the response head arrived.
    ClosedBeforeResponse,
    /// No response head within the response timeout; the backend may be working on it.
    ResponseTimeout,
    /// The response head had arrived (or was partly read) when the failure happened.
    FailedAfterResponse,
}

/// Retries of a request after an early failure that was not a connect failure.
pub const MAX_REQUEST_RETRIES: u32 = 1;

/// Whether a failed request may be replayed on another backend.
///
/// * `ConnectFailed`: the backend saw nothing, so any method may be retried, as long as no
///   body byte was consumed from the client (`body_started` false). `Pool::connect` retries
///   connect failures on every other backend within its budget.
/// * `ClosedBeforeResponse`: retried once (`MAX_REQUEST_RETRIES`) only for idempotent methods
///   whose request body was not started; the backend may have acted on the request.
/// * `ResponseTimeout`, `FailedAfterResponse`: never; the backend may still be working on it,
///   and replaying would double its load or its side effects.
/// * A request whose body was partly streamed is never replayed: the bytes are gone.
pub fn may_retry(method: &http::Method, body_started: bool, failure: &Failure) -> bool {
    if body_started {
        return false;
    }
    match failure {
        Failure::ConnectFailed => true,
        Failure::ClosedBeforeResponse => is_idempotent(method),
        Failure::ResponseTimeout | Failure::FailedAfterResponse => false,
    }
}

/// RFC 9110 §9.2.2 idempotent methods.
pub fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn connect_failures_retry_any_method_before_the_body() {
        assert!(may_retry(&Method::POST, false, &Failure::ConnectFailed));
        assert!(may_retry(&Method::GET, false, &Failure::ConnectFailed));
        assert!(!may_retry(&Method::POST, true, &Failure::ConnectFailed));
    }

    #[test]
    fn early_close_retries_only_idempotent_requests_without_body() {
        assert!(may_retry(
            &Method::GET,
            false,
            &Failure::ClosedBeforeResponse
        ));
        assert!(may_retry(
            &Method::PUT,
            false,
            &Failure::ClosedBeforeResponse
        ));
        assert!(!may_retry(
            &Method::POST,
            false,
            &Failure::ClosedBeforeResponse
        ));
        assert!(!may_retry(
            &Method::PATCH,
            false,
            &Failure::ClosedBeforeResponse
        ));
        assert!(!may_retry(
            &Method::PUT,
            true,
            &Failure::ClosedBeforeResponse
        ));
    }

    #[test]
    fn late_failures_are_never_replayed() {
        for m in [Method::GET, Method::POST] {
            assert!(!may_retry(&m, false, &Failure::ResponseTimeout));
            assert!(!may_retry(&m, false, &Failure::FailedAfterResponse));
        }
    }
}
