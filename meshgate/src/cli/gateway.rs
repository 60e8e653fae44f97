//! `meshgate gateway --config gateway.toml`.

use anyhow::Result;
use meshgate::app::{self, GatewaySetup, process};
use meshgate_config::gateway::GatewayConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway configuration file.
    #[arg(long, short, default_value = "gateway.toml")]
    pub config: PathBuf,
}

pub async fn run(args: Args) -> Result<()> {
    process::init_logging();
    let config = GatewayConfig::load(&args.config)?;
    let app = app::gateway(GatewaySetup {
        config_path: Some(args.config.clone()),
        ..GatewaySetup::new(config)
    })
    .await?;
    let bound = app.gateway.bind()?;
    for l in bound.https.iter() {
        tracing::info!(addr = %l.local_addr()?, "https listener");
    }
    for l in bound.http.iter() {
        tracing::info!(addr = %l.local_addr()?, "http listener");
    }
    tracing::info!(addr = %bound.admin.local_addr()?, "operator listener (/status, /metrics, /reload)");
    if let Some(api) = &bound.api {
        tracing::info!(addr = %api.local_addr()?, "deployers' API listener (/v1/…)");
    }
    process::spawn_sighup_reload(app.gateway.clone())?;
    app.gateway.serve(bound, process::shutdown_signal()).await?;
    tracing::info!("shutting down");
    app.shutdown().await;
    Ok(())
}
