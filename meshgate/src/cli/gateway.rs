//! `meshgate gateway --config gateway.toml` (`--check`: validate it and exit).

use anyhow::Result;
use meshgate::app::{self, GatewaySetup, process};
use meshgate_config::gateway::GatewayConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The gateway configuration file.
    #[arg(long, short, default_value = "gateway.toml", value_name = "FILE")]
    pub config: PathBuf,
    /// Validate the configuration and the files it names (certificates, keys, the overlay
    /// key, the admin token), print every problem located (file:line:column: key: what),
    /// and exit: 0 when valid, 1 otherwise. Starts nothing.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: Args) -> Result<()> {
    if args.check {
        return match super::check::check(&args.config) {
            super::check::Checked::Valid(summary) => {
                println!("{summary}");
                Ok(())
            }
            super::check::Checked::Invalid(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                anyhow::bail!(
                    "{}: {} problem{} found",
                    args.config.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                )
            }
        };
    }
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
