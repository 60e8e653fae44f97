//! `meshgate fleet`: the fleet as etcd holds it (`status`), a standalone gateway's state
//! copied into it (`import`), and a new fleet key (`keygen`).

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meshgate::app::fleet::{etcd_options, health_json};
use meshgate_certs::CertStore;
use meshgate_config::gateway::GatewayConfig;
use meshgate_fleet::acme::{AccountImport, import_certificates};
use meshgate_fleet::{Etcd, FleetKey, FleetKeys, members};
use meshgate_reservations::store::etcd::import::{import_standalone, verify_state};
use meshgate_reservations::store::redb::RedbStore;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Members (addresses, versions, last applied revision), lock holders and the store's
    /// health, read from etcd with the gateway's `[fleet]` settings.
    Status {
        /// The gateway configuration file (its `[fleet]` table).
        #[arg(long, short, default_value = "gateway.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a standalone gateway's reservations, deployer tokens, challenge key, certificates
    /// and ACME account into the fleet (keys sealed). Idempotent: a record already in etcd is
    /// never overwritten.
    Import {
        /// The gateway configuration file (its `[fleet]` table and, by default, its
        /// `data_dir` and first domain).
        #[arg(long, short, default_value = "gateway.toml")]
        config: PathBuf,
        /// The standalone gateway's data directory (default: the config's `data_dir`).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Create a fleet key file (0600, 64 hex characters); copy it to every gateway.
    Keygen {
        /// The key file to create (never replaced).
        file: PathBuf,
    },
}

fn fleet_config(path: &Path) -> Result<(GatewayConfig, meshgate_config::fleet::Fleet)> {
    let config = GatewayConfig::load(path)?;
    let Some(fleet) = config.fleet.clone() else {
        bail!("{}: no [fleet] table", path.display());
    };
    Ok((config, fleet))
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        FleetCommand::Status { config, json } => status(config, json).await,
        FleetCommand::Import { config, from } => import(config, from).await,
        FleetCommand::Keygen { file } => {
            let key = FleetKey::generate();
            meshgate_config::private_file::write_private_file(
                &file,
                key.to_file_text().as_bytes(),
                meshgate_config::private_file::Placement::New,
            )
            .with_context(|| format!("cannot create {}", file.display()))?;
            println!("created {} (fleet key id {})", file.display(), key.id_hex());
            Ok(())
        }
    }
}

async fn status(config: PathBuf, as_json: bool) -> Result<()> {
    let (_, f) = fleet_config(&config)?;
    let keys = FleetKeys::new(&f.name)?;
    let etcd = Etcd::new(etcd_options(&f)?)?;
    let revision = etcd.revision(keys.root()).await;
    let health = etcd.health().borrow().clone();
    let mut members = members::list(&etcd, &keys).await.unwrap_or_default();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    // Lock holders: every key under the ACME lock prefix, with its value (who holds it).
    let locks_prefix = format!("{}locks/", keys.acme());
    let locks: Vec<(String, String)> = match etcd.list_prefix(&locks_prefix).await {
        Ok((kvs, _)) => kvs
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                let name = k.strip_prefix(&locks_prefix).unwrap_or(&k).to_string();
                (name, String::from_utf8_lossy(kv.value()).into_owned())
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    if as_json {
        let doc = serde_json::json!({
            "name": f.name,
            "store": health_json(&health),
            "revision": revision.as_ref().ok(),
            "members": members,
            "locks": locks.iter().map(|(n, h)| serde_json::json!({"name": n, "holder": h})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("fleet {} ({})", f.name, keys.root());
        match (&revision, &health) {
            (Ok(rev), _) => println!("store    available, revision {rev}"),
            (Err(e), _) => println!("store    UNAVAILABLE: {e}"),
        }
        println!("members  {}", members.len());
        for m in &members {
            let addrs: Vec<String> = m.advertise.iter().map(|a| a.to_string()).collect();
            println!(
                "  {:<40} version {:<8} applied {:<8} advertise {}",
                m.id,
                m.version,
                m.applied_revision,
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                }
            );
        }
        println!("locks    {}", locks.len());
        for (name, holder) in &locks {
            println!("  {name:<40} held by {holder}");
        }
    }
    if revision.is_err() {
        bail!("etcd is unavailable");
    }
    Ok(())
}

async fn import(config: PathBuf, from: Option<PathBuf>) -> Result<()> {
    let (gw, f) = fleet_config(&config)?;
    let Some(domain) = gw.domains.first() else {
        bail!(
            "{}: no domains, so no reservations to import",
            config.display()
        );
    };
    let dir = from.unwrap_or_else(|| gw.data_dir.clone());
    let db = dir.join("reservations.redb");
    if !db.exists() {
        bail!("{}: no standalone store here", db.display());
    }
    let keys = FleetKeys::new(&f.name)?;
    let fleet_key = FleetKey::load(&f.key_file)?;
    let etcd = Etcd::new(etcd_options(&f)?)?;
    let source = RedbStore::open(&dir, domain.as_str())
        .with_context(|| format!("standalone store in {}", dir.display()))?;
    let report = import_standalone(
        &source,
        &dir.join("challenge.key"),
        &etcd,
        &keys,
        &fleet_key,
    )
    .await?;
    let total = verify_state(&etcd, &keys).await?;
    println!(
        "reservations: {} copied, {} already in etcd (kept); tokens: {} copied, {} kept; {} reservations in the fleet",
        report.reservations_copied,
        report.reservations_kept,
        report.tokens_copied,
        report.tokens_kept,
        total
    );
    match (report.challenge_key_copied, report.challenge_key_same) {
        (true, _) => println!("challenge key: copied (sealed)"),
        (false, true) => println!("challenge key: already in etcd, the same"),
        (false, false) => println!(
            "challenge key: etcd holds another one (kept); custom domains proven with this gateway's TXT values must be proven again"
        ),
    }
    import_certs(&dir.join("certs"), &etcd, &keys, &fleet_key).await
}

/// Copies the standalone certificates and ACME account in `certs_dir` (if it exists) and
/// prints what was copied and what was skipped.
async fn import_certs(
    certs_dir: &Path,
    etcd: &Etcd,
    keys: &FleetKeys,
    fleet_key: &FleetKey,
) -> Result<()> {
    if !certs_dir.is_dir() {
        println!(
            "certificates: none ({} does not exist)",
            certs_dir.display()
        );
        return Ok(());
    }
    let source = CertStore::open(certs_dir)
        .with_context(|| format!("standalone certificates in {}", certs_dir.display()))?;
    let report = import_certificates(&source, etcd, keys, fleet_key).await?;
    let names = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" ({})", v.join(", "))
        }
    };
    println!(
        "certificates: {} copied (sealed){}, {} already in etcd (kept){}",
        report.copied.len(),
        names(&report.copied),
        report.kept.len(),
        names(&report.kept)
    );
    for (what, why) in &report.unreadable {
        println!("skipped (unreadable): {what}: {why}");
    }
    println!(
        "ACME account: {}",
        match report.account {
            AccountImport::Absent => "none in the standalone store",
            AccountImport::Copied => "copied (sealed)",
            AccountImport::Kept => "already in etcd (kept)",
        }
    );
    Ok(())
}
