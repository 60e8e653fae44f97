//! Headless Chromium driven over the DevTools protocol (CDP) on `--remote-debugging-pipe`:
//! load a page, run script in it and read the rendered DOM, size the viewport, take a
//! screenshot. Blocking (one reader thread per browser); call it from `spawn_blocking` or a
//! multi-threaded runtime's `block_in_place`.
//!
//! The pipe rather than a debugging port: nothing listens on the network, and the browser
//! talks only to the process that started it. Messages are JSON, each ended by a NUL byte;
//! Chromium reads commands on fd 3 and writes answers and events on fd 4.

use serde_json::{Value, json};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// The browser binary: `MESHGATE_CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("MESHGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// How long one protocol command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One headless Chromium with one page attached; killed when dropped.
pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    profile: tempfile::TempDir,
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

#[allow(unsafe_code)] // FFI: pipe2 with O_CLOEXEC.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Browser {
    /// Starts Chromium headless with a fresh profile and opens a blank page.
    #[allow(unsafe_code)] // pre_exec: placing the pipe ends at fds 3 and 4 in the child.
    pub fn launch() -> io::Result<Browser> {
        let profile = tempfile::tempdir()?;
        // Commands: we write `cmd_w`, the browser reads `cmd_r` as fd 3.
        let (cmd_r, cmd_w) = pipe()?;
        // Answers: the browser writes `out_w` as fd 4, we read `out_r`.
        let (out_r, out_w) = pipe()?;
        let stderr = File::create(profile.path().join("chromium.log"))?;
        let (child_in, child_out) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut cmd = Command::new(chromium_path());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The
        // descriptors are first moved above 10 so that placing one at 3 cannot overwrite the
        // other; dup2 leaves the copies at 3 and 4 without close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", chromium_path().display())))?;
        drop((cmd_r, out_w));
        let (tx, rx) = channel();
        let reader = File::from(out_r);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            loop {
                let mut buf = Vec::new();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            to_browser: File::from(cmd_w),
            from_browser: rx,
            next_id: 0,
            session: String::new(),
            profile,
        };
        let target = b.browser_call("Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| err(format!("Target.createTarget answered {target}")))?
            .to_string();
        let attached = b.browser_call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| err(format!("Target.attachToTarget answered {attached}")))?
            .to_string();
        b.call("Page.enable", json!({}))?;
        Ok(b)
    }

    /// The last lines Chromium wrote to stderr (for failure messages).
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> io::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s.to_string());
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| err(e.to_string()))?;
        bytes.push(0);
        self.to_browser.write_all(&bytes)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                // Events (no `id`) and answers to earlier commands are not waited for.
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    if let Some(e) = v.get("error") {
                        return Err(err(format!("{method}: {e}")));
                    }
                    return Ok(v["result"].clone());
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(err(format!(
                        "{method}: no answer within {COMMAND_TIMEOUT:?}"
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(err(format!(
                        "{method}: the browser closed its pipe; its log:\n{}",
                        self.log_tail()
                    )));
                }
            }
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> io::Result<Value> {
        self.send(None, method, params)
    }

    /// A command to the page.
    pub fn call(&mut self, method: &str, params: Value) -> io::Result<Value> {
        let session = self.session.clone();
        self.send(Some(&session), method, params)
    }

    /// Loads `url` and waits until the document has loaded.
    pub fn navigate(&mut self, url: &str) -> io::Result<()> {
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            return Err(err(format!("loading {url}: {e}")));
        }
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )?;
        Ok(())
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub fn eval(&mut self, expression: &str) -> io::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(ex) = r.get("exceptionDetails") {
            return Err(err(format!("{expression}: {ex}")));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 100 ms until its value is truthy (not null, false, 0 or
    /// ""); that value, or an error naming the expression and its last value after `limit`.
    pub fn wait_for(&mut self, expression: &str, limit: Duration) -> io::Result<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expression)?;
            let truthy = match &v {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(err(format!("`{expression}` still {v} after {limit:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Emulates a screen `width` × `height` CSS pixels (`mobile`: a phone's viewport rules).
    pub fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> io::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )?;
        Ok(())
    }

    /// Saves a PNG of the whole page (beyond the viewport) to `path`.
    pub fn screenshot(&mut self, path: &Path) -> io::Result<()> {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| err("Page.captureScreenshot returned no data"))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| err(format!("screenshot: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where screenshots go: `target/` of the workspace (`CARGO_TARGET_DIR` when set).
pub fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("target")
        });
    target.join("screenshots").join(name)
}
