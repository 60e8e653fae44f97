//! The fleet in a gateway process, from `[fleet]`: the etcd handle (endpoints, TLS client
//! certificate, user and password), the fleet key, this gateway's id, its member record kept
//! under a lease, the member list it follows, and the fleet section of `/status`.

use anyhow::{Context, Result, bail};
use meshgate_config::gateway::GatewayConfig;
use meshgate_fleet::etcd::{EtcdOptions, EtcdTls, StoreHealth};
use meshgate_fleet::members::{self, MemberRecord, MemberSet, Registration};
use meshgate_fleet::{Etcd, FleetKey, FleetKeys};
use meshgate_gateway::admin::section::StatusSection;
use meshgate_reservations::store::etcd::{EtcdStore, EtcdStoreConfig};
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the store's health is checked while nothing else calls etcd.
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A gateway's membership in its fleet.
pub struct Fleet {
    pub etcd: Etcd,
    pub keys: FleetKeys,
    pub fleet_key: FleetKey,
    /// This gateway's id (`[fleet] id`, else the overlay address, else the host name).
    pub id: String,
    pub advertise: Vec<IpAddr>,
    pub config: meshgate_config::fleet::Fleet,
    probe: tokio::task::JoinHandle<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// Reads a secret file that must not be readable by others.
fn read_private(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{what} {}: mode {:03o} lets others read it; chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    std::fs::read(path).with_context(|| format!("{what} {}", path.display()))
}

/// The etcd options `[fleet]` describes (files read now, so a bad path fails at start).
pub fn etcd_options(f: &meshgate_config::fleet::Fleet) -> Result<EtcdOptions> {
    let mut o = EtcdOptions::new(f.etcd.clone());
    o.call_budget = f.call_budget();
    if let Some(tls) = &f.tls {
        let ca_pem = std::fs::read(&tls.ca_file)
            .with_context(|| format!("fleet.tls.ca_file {}", tls.ca_file.display()))?;
        let client = match (&tls.cert_file, &tls.key_file) {
            (Some(c), Some(k)) => Some((
                std::fs::read(c).with_context(|| format!("fleet.tls.cert_file {}", c.display()))?,
                read_private(k, "fleet.tls.key_file")?,
            )),
            _ => None,
        };
        o.tls = Some(EtcdTls { ca_pem, client });
    }
    if let (Some(user), Some(pw)) = (&f.user, &f.password_file) {
        let password = read_private(pw, "fleet.password_file")?;
        let password = String::from_utf8(password)
            .with_context(|| format!("fleet.password_file {}: not UTF-8", pw.display()))?;
        o.user = Some((
            user.clone(),
            password.trim_end_matches(['\n', '\r']).to_string(),
        ));
    }
    Ok(o)
}

/// The host name, for a gateway id when there is no overlay node.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

impl Fleet {
    /// The fleet from `[fleet]` (None without it). Reads the fleet key and the etcd
    /// credentials; connects nothing yet.
    pub fn from_config(
        config: &GatewayConfig,
        overlay_address: Option<Ipv6Addr>,
    ) -> Result<Option<Fleet>> {
        let Some(f) = &config.fleet else {
            return Ok(None);
        };
        let keys = FleetKeys::new(&f.name)?;
        let fleet_key = FleetKey::load(&f.key_file)?;
        let etcd = Etcd::new(etcd_options(f)?)?;
        let id =
            f.id.clone()
                .or_else(|| overlay_address.map(|a| a.to_string()))
                .unwrap_or_else(host_name);
        let probe = etcd.spawn_health_probe(keys.root(), HEALTH_PROBE_INTERVAL);
        tracing::info!(fleet = %f.name, %id, etcd = %etcd.endpoints(), key = %fleet_key.id_hex(), "fleet member");
        Ok(Some(Fleet {
            etcd,
            keys,
            fleet_key,
            id,
            advertise: f.advertise.clone(),
            config: f.clone(),
            probe,
        }))
    }

    /// The fleet's reservation store for the farmer's `domain` (cache in `data_dir`).
    pub fn open_store(&self, config: &GatewayConfig, domain: &str) -> Result<EtcdStore> {
        Ok(EtcdStore::open(EtcdStoreConfig {
            etcd: self.etcd.clone(),
            keys: self.keys.clone(),
            fleet_key: self.fleet_key.clone(),
            farmer_domain: domain.to_string(),
            data_dir: config.data_dir.clone(),
            start_wait: self.config.start_wait(),
        })?)
    }

    /// Registers this gateway (record under a lease, refreshed as `applied` moves) and
    /// follows the member list.
    pub fn join(&self, applied: watch::Receiver<i64>) -> Membership {
        let now = members::now_unix_ms();
        let me = MemberRecord {
            id: self.id.clone(),
            advertise: self.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision: *applied.borrow(),
            started_unix_ms: now,
            updated_unix_ms: now,
        };
        let registration = members::register(
            &self.etcd,
            &self.keys,
            me,
            applied.clone(),
            self.config.member_ttl(),
        );
        let members = members::follow(&self.etcd, &self.keys);
        Membership {
            registration,
            members,
            applied,
        }
    }
}

/// This gateway's registration and the fleet's member list.
pub struct Membership {
    pub registration: Registration,
    pub members: watch::Receiver<MemberSet>,
    pub applied: watch::Receiver<i64>,
}

/// The fleet section of `/status`.
pub struct FleetStatus {
    pub name: String,
    pub id: String,
    pub health: watch::Receiver<StoreHealth>,
    pub applied: watch::Receiver<i64>,
    pub members: watch::Receiver<MemberSet>,
    pub lease: watch::Receiver<Option<i64>>,
    pub cached: Option<Arc<EtcdStore>>,
}

/// The store's health as JSON: `{"state": "available"|"unavailable"|"connecting", ...}`.
pub fn health_json(h: &StoreHealth) -> serde_json::Value {
    match h {
        StoreHealth::Connecting => serde_json::json!({"state": "connecting"}),
        StoreHealth::Available { endpoint } => {
            serde_json::json!({"state": "available", "endpoint": endpoint})
        }
        StoreHealth::Unavailable {
            cause,
            since_unix_ms,
        } => serde_json::json!({
            "state": "unavailable", "cause": cause, "since_unix_ms": since_unix_ms,
        }),
    }
}

impl StatusSection for FleetStatus {
    fn json(&self) -> serde_json::Value {
        let members: Vec<serde_json::Value> = self
            .members
            .borrow()
            .values()
            .map(|m| serde_json::to_value(m).unwrap_or_default())
            .collect();
        let cached = self.cached.as_ref().map(|s| {
            let (reservations, tokens) = s.cached_counts();
            serde_json::json!({"reservations": reservations, "tokens": tokens})
        });
        serde_json::json!({
            "name": self.name,
            "id": self.id,
            "store": health_json(&self.health.borrow()),
            "applied_revision": *self.applied.borrow(),
            "registered": self.lease.borrow().is_some(),
            "members": members,
            "cached": cached,
        })
    }
}
