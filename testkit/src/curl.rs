//! The real `curl` as a client: what end-to-end tests run against the gateway binary.

use std::process::Command;

/// What one curl run gave.
#[derive(Debug, Clone)]
pub struct Curl {
    /// curl exited successfully.
    pub success: bool,
    /// HTTP status (0: no HTTP response).
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

/// Runs `curl -sS -m 20 -w '\n%{http_code}' <args>`.
pub fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "-m", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Curl {
        success: out.status.success(),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Runs curl with `args`; (HTTP status, body), status 0 when there was no HTTP response.
pub fn run_curl(args: &[&str]) -> (u16, String) {
    let c = curl(args);
    (c.status, c.body)
}
