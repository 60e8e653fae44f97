//! The last phase of every proxied request and passthrough stream: count it in the metrics and
//! write its access record in the `[log] access` format. `text` records are tracing events
//! (target `access`) whose client, route and backend come from the enclosing spans; `json`
//! records are one self-contained JSON object per line on stdout. Neither ever carries a
//! header value, a query string or a body: tokens, `Authorization` and cookies stay out.

use super::metrics::{Metrics, RouteMetrics};
use http::{Method, StatusCode};
use meshgate_config::log::AccessFormat;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// How an exchange ended.
pub(crate) enum Outcome<'a> {
    /// An HTTP response (the proxy's or the backend's) was sent.
    Response {
        status: StatusCode,
        host: &'a str,
        method: &'a Method,
        /// The path only: a query string may carry secrets.
        path: &'a str,
        /// `https` or `http`.
        proto: &'static str,
        /// `HTTP/1.1`, `HTTP/2`.
        version: http::Version,
    },
    /// A passthrough stream closed after moving these bytes.
    Stream { up: u64, down: u64 },
}

/// Who took part in an exchange, for the JSON records (text records take these from spans).
pub(crate) struct Parties {
    pub client: SocketAddr,
    /// The backend that answered, when one did.
    pub backend: Option<SocketAddr>,
}

/// Counts a finished exchange on `route` and writes its access record; `elapsed` is the time
/// to the response head, or the stream's life.
pub(crate) fn finished(
    metrics: &Metrics,
    format: AccessFormat,
    route: &str,
    parties: &Parties,
    elapsed: Duration,
    outcome: Outcome<'_>,
) {
    let series = metrics.route(route);
    finished_on(metrics, &series, format, route, parties, elapsed, outcome);
}

/// [`finished`] with the route's series already at hand.
pub(crate) fn finished_on(
    metrics: &Metrics,
    series: &RouteMetrics,
    format: AccessFormat,
    route: &str,
    parties: &Parties,
    elapsed: Duration,
    outcome: Outcome<'_>,
) {
    let server_error =
        matches!(&outcome, Outcome::Response { status, .. } if status.is_server_error());
    metrics
        .history
        .request(route, server_error, std::time::Instant::now());
    let status = match &outcome {
        Outcome::Response { status, .. } => Some(status.as_u16()),
        Outcome::Stream { up, down } => {
            series.bytes_in().inc_by(*up);
            series.bytes_out().inc_by(*down);
            None
        }
    };
    series.requests(status).inc();
    series.latency().observe(elapsed.as_secs_f64());
    match format {
        AccessFormat::Off => {}
        AccessFormat::Text => text(elapsed, &outcome),
        AccessFormat::Json => json(route, parties, elapsed, &outcome),
    }
}

fn text(elapsed: Duration, outcome: &Outcome<'_>) {
    let ms = elapsed.as_millis() as u64;
    match outcome {
        Outcome::Response {
            status,
            host,
            method,
            path,
            ..
        } => tracing::info!(
            target: "access",
            host = %host,
            method = %method,
            path = %path,
            status = status.as_u16(),
            ms,
            "request"
        ),
        Outcome::Stream { up, down } => {
            tracing::info!(target: "access", up, down, ms, "stream")
        }
    }
}

/// Writes one JSON access record to stdout (one line; a failed write is dropped, never fatal).
fn json(route: &str, parties: &Parties, elapsed: Duration, outcome: &Outcome<'_>) {
    let line = json_record(SystemTime::now(), route, parties, elapsed, outcome);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// The JSON record of an exchange, newline included. Fields: `ts_ms` (Unix time in
/// milliseconds), `kind` (`request` or `stream`), `client`, `route`, `backend` (or null),
/// `ms`; requests add `proto`, `version`, `method`, `host`, `path`, `status`; streams add
/// `up` and `down` (bytes).
fn json_record(
    now: SystemTime,
    route: &str,
    parties: &Parties,
    elapsed: Duration,
    outcome: &Outcome<'_>,
) -> String {
    let ts_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut record = serde_json::json!({
        "ts_ms": ts_ms,
        "client": parties.client.to_string(),
        "route": route,
        "backend": parties.backend.map(|b| b.to_string()),
        "ms": elapsed.as_millis() as u64,
    });
    let extra = match outcome {
        Outcome::Response {
            status,
            host,
            method,
            path,
            proto,
            version,
        } => serde_json::json!({
            "kind": "request",
            "proto": proto,
            "version": format!("{version:?}"),
            "method": method.as_str(),
            "host": host,
            "path": path,
            "status": status.as_u16(),
        }),
        Outcome::Stream { up, down } => serde_json::json!({
            "kind": "stream",
            "up": up,
            "down": down,
        }),
    };
    if let (Some(r), serde_json::Value::Object(e)) = (record.as_object_mut(), extra) {
        r.extend(e);
    }
    let mut line = record.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_are_one_line_objects_with_the_documented_fields() {
        let parties = Parties {
            client: "192.0.2.7:5000".parse().unwrap(),
            backend: Some("[fd00::1]:8080".parse().unwrap()),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let line = json_record(
            at,
            "app.example.org",
            &parties,
            Duration::from_millis(12),
            &Outcome::Response {
                status: StatusCode::OK,
                host: "app.example.org",
                method: &Method::GET,
                path: "/a\"b\n",
                proto: "https",
                version: http::Version::HTTP_2,
            },
        );
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ts_ms"], 1_700_000_000_123u64);
        assert_eq!(v["kind"], "request");
        assert_eq!(v["client"], "192.0.2.7:5000");
        assert_eq!(v["backend"], "[fd00::1]:8080");
        assert_eq!(v["version"], "HTTP/2.0");
        assert_eq!(v["path"], "/a\"b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["ms"], 12);
        let stream = json_record(
            at,
            "tls.example.org",
            &Parties {
                client: parties.client,
                backend: None,
            },
            Duration::from_secs(2),
            &Outcome::Stream { up: 5, down: 7 },
        );
        let v: serde_json::Value = serde_json::from_str(&stream).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["up"].as_u64(), v["down"].as_u64()),
            (Some("stream"), Some(5), Some(7))
        );
        assert!(v["backend"].is_null());
    }
}
