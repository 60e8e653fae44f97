//! `meshgate gateway --config gateway.toml`.

use crate::overlay::EmbeddedNode;
use crate::server::Gateway;
use anyhow::{Context, Result};
use meshgate_config::gateway::GatewayConfig;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway configuration file.
    #[arg(long, short, default_value = "gateway.toml")]
    pub config: PathBuf,
}

/// Logs to stderr; `RUST_LOG` overrides the default `info`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(args: Args) -> Result<()> {
    init_logging();
    let config = GatewayConfig::load(&args.config)?;
    let node = match &config.overlay {
        Some(o) => Some(EmbeddedNode::start(o).await?),
        None => None,
    };
    if let Some(n) = &node {
        tracing::info!(address = %n.node.address(), "overlay node started");
    }
    let overlay = node
        .as_ref()
        .map(|n| Arc::new(n.dialer()) as Arc<dyn crate::dial::Dialer>);
    let gateway = Gateway::new(
        config,
        Some(args.config.clone()),
        overlay,
        meshgate_overlay::is_overlay_address,
    )?;
    let bound = gateway.bind()?;
    for l in bound.https.iter() {
        tracing::info!(addr = %l.local_addr()?, "https listener");
    }
    for l in bound.http.iter() {
        tracing::info!(addr = %l.local_addr()?, "http listener");
    }
    tracing::info!(addr = %bound.admin.local_addr()?, "admin listener");
    spawn_sighup_reload(gateway.clone())?;
    gateway.serve(bound, shutdown_signal()).await?;
    tracing::info!("shutting down");
    if let Some(n) = node {
        n.shutdown().await;
    }
    Ok(())
}

fn spawn_sighup_reload(gateway: Gateway) -> Result<()> {
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
