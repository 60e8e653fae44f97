//! TLS session resumption on :443, checked with `openssl s_client` against the real binary:
//! the ticket handed out is stateless (it carries the encrypted session, not a cache key), a
//! returning client resumes with it (TLS 1.3 PSK) and still gets its answer, and a ticket
//! offered under another server name is not resumed.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// Runs one `GET /echo` with `openssl s_client` for `host`, saving the session to `out` and
/// offering `offer` if given. Returns s_client's whole output.
fn s_client(port: u16, host: &str, ca: &std::path::Path, out: &str, offer: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", host, "-tls1_3", "-ign_eof", "-CAfile"])
        .arg(ca)
        .args(["-sess_out", out]);
    if let Some(sess) = offer {
        cmd.args(["-sess_in", sess]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        write!(
            stdin,
            "GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes of the first session ticket s_client printed (the hex dump under "TLS session
/// ticket:"), 0 if none.
fn ticket_len(out: &str) -> usize {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.trim().starts_with("TLS session ticket:"));
    lines.next();
    lines
        .map(str::trim)
        .take_while(|l| {
            l.len() > 7 && l.as_bytes()[4] == b' ' && l[..4].chars().all(|c| c.is_ascii_hexdigit())
        })
        // "0000 - 1a 2b 3c ...-... 7f   ascii": the hex bytes sit between "- " and the ASCII column.
        .map(|l| {
            l[7..]
                .split("   ")
                .next()
                .unwrap_or("")
                .split([' ', '-'])
                .filter(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_their_session() {
    let dir = tempfile::tempdir().unwrap();
    let backend = start_http_backend().await;
    let gw = GatewayProcess::start(
        dir.path(),
        &format!(
            "[security]\nallow_private_backends = true\n\
             [[route]]\nhost = \"a.test\"\nbackends = [{{ addr = \"{backend}\" }}]\n\
             [[route]]\nhost = \"b.test\"\nbackends = [{{ addr = \"{backend}\" }}]\n"
        ),
    );
    let sess = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let ca = gw.ca();

    let first = s_client(gw.https, "a.test", &ca, &sess("a1"), None);
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(first.contains("Verify return code: 0 (ok)"), "{first}");
    assert!(first.contains("HTTP/1.1 200"), "{first}");
    // A stateless ticket carries the encrypted session state; a server-side session cache
    // would hand out only a 32-byte lookup key (rustls's stateful tickets).
    let ticket = ticket_len(&first);
    assert!(
        ticket > 64,
        "ticket of {ticket} bytes is not a stateless ticket:\n{first}"
    );

    let again = s_client(gw.https, "a.test", &ca, &sess("a2"), Some(&sess("a1")));
    assert!(again.contains("Reused, TLSv1.3"), "{again}");
    assert!(again.contains("HTTP/1.1 200"), "{again}");
    assert!(again.contains("\"x-forwarded-host\":\"a.test\""), "{again}");

    // A ticket for a.test offered under b.test: a full handshake with b.test's certificate.
    let other = s_client(gw.https, "b.test", &ca, &sess("b1"), Some(&sess("a2")));
    assert!(other.contains("New, TLSv1.3"), "{other}");
    assert!(other.contains("HTTP/1.1 200"), "{other}");
}
