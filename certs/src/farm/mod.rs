//! The farmer's zone answered by every gateway's DNS responder: A/AAAA for `<domain>` and
//! `*.<domain>` from the live members' advertised addresses, minus those this gateway's own
//! probes find unhealthy (all of them when none looks healthy), with SOA, NS and CAA.

mod probes;
mod zone;

pub use probes::{ProbePolicy, Probes};
pub use zone::{DEFAULT_ANSWER_TTL, FarmZone, FarmZoneConfig};

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Keeps `zone`'s addresses equal to the members in `members` whose `probe_port` accepts TCP
/// connections (per `policy`; all members when none does). Runs until `members`' sender is
/// dropped.
pub async fn follow_members(
    zone: FarmZone,
    mut members: watch::Receiver<Vec<IpAddr>>,
    probe_port: u16,
    policy: ProbePolicy,
) {
    let mut probes = Probes::new(policy);
    let (tx, mut results) = mpsc::unbounded_channel::<(SocketAddr, bool)>();
    let mut served: Option<Vec<IpAddr>> = None;
    let mut refresh = true;
    loop {
        if std::mem::take(&mut refresh) {
            let ips = members.borrow_and_update().clone();
            let targets = ips.iter().map(|ip| SocketAddr::new(*ip, probe_port));
            probes.set_targets(targets, Instant::now().into_std());
        }
        let answer: Vec<IpAddr> = probes.answer().iter().map(|a| a.ip()).collect();
        if served.as_ref() != Some(&answer) {
            tracing::info!(zone = %zone.origin(), addresses = ?answer, "farmer zone answers");
            zone.set_addresses(&answer).await;
            served = Some(answer);
        }
        for target in probes.poll(Instant::now().into_std()) {
            let tx = tx.clone();
            let timeout = policy.timeout;
            tokio::spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
                    Ok(Ok(_))
                );
                let _ = tx.send((target, ok));
            });
        }
        let sleep = probes
            .next_wakeup()
            .map(|t| Instant::from_std(t).saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            Some((target, ok)) = results.recv() => {
                if probes.probe_done(target, ok, Instant::now().into_std()) {
                    tracing::info!(%target, healthy = ok, "member health changed");
                }
            }
            changed = members.changed() => match changed {
                Ok(()) => refresh = true,
                Err(_) => return,
            },
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}
