//! Process-wide plumbing shared by the roles: logging to stderr, the stop signals, and
//! SIGHUP-triggered reloads.

use anyhow::{Context, Result};
use meshgate_gateway::Gateway;

/// Logs to stderr (colours only on a terminal, so log files stay plain); `RUST_LOG` overrides
/// the default `info`.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Reloads `gateway`'s configuration file on every SIGHUP.
pub fn spawn_sighup_reload(gateway: Gateway) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let g = gateway.clone();
            match tokio::task::spawn_blocking(move || g.reload()).await {
                Ok(Ok(n)) => tracing::info!(routes = n, "reloaded on SIGHUP"),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "reload refused; previous configuration kept")
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}
