//! Connection slots: each listener kind's own pool of connections, and the cap on
//! connections from one client address, so that no client — and no listener — can take the
//! slots another needs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Whom a per-client cap counts as one client: an IPv4 address (also when it arrives
/// IPv4-mapped on a dual-stack socket), or an IPv6 /64, since one subscriber usually holds a
/// whole /64 and can pick any address in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl ClientKey {
    pub(crate) fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ClientKey::V6Prefix(prefix)
                }
            },
        }
    }
}

/// Open connections per client, each at most `limit`. Entries leave the table when their
/// last connection closes, so it never holds more clients than there are open connections.
pub(crate) struct PerClient {
    limit: usize,
    open: Mutex<HashMap<ClientKey, usize>>,
}

impl PerClient {
    pub(crate) fn new(limit: usize) -> Arc<PerClient> {
        Arc::new(PerClient {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it already has `limit` open.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = ClientKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.limit {
            if *n == 0 {
                open.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s client now.
    #[cfg(test)]
    pub(crate) fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&ClientKey::of(ip)).copied().unwrap_or(0)
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn release(&self, key: ClientKey) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// One connection's place in its client's count; released on drop.
pub(crate) struct ClientSlot {
    table: Arc<PerClient>,
    key: ClientKey,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

/// A listener kind's slots: `max` connections at once, at most `per_client` of them from one
/// client. Listeners of one kind (several `listen.https` addresses) share them.
#[derive(Clone)]
pub(crate) struct Slots {
    pub(crate) total: Arc<Semaphore>,
    pub(crate) per_client: Arc<PerClient>,
}

impl Slots {
    pub(crate) fn new(max: usize, per_client: Arc<PerClient>) -> Slots {
        Slots {
            total: Arc::new(Semaphore::new(max)),
            per_client,
        }
    }
}

/// What an accepted connection holds until it closes.
pub(crate) struct Held {
    _total: OwnedSemaphorePermit,
    _client: ClientSlot,
}

impl Held {
    pub(crate) fn new(total: OwnedSemaphorePermit, client: ClientSlot) -> Held {
        Held {
            _total: total,
            _client: client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_gets_at_most_its_limit_and_others_are_unaffected() {
        let table = PerClient::new(2);
        let a1 = table.take(ip("192.0.2.1")).expect("first");
        let _a2 = table.take(ip("192.0.2.1")).expect("second");
        assert!(
            table.take(ip("192.0.2.1")).is_none(),
            "third is over the cap"
        );
        assert!(table.take(ip("192.0.2.2")).is_some(), "another client");
        drop(a1);
        assert!(
            table.take(ip("192.0.2.1")).is_some(),
            "a closed one frees a place"
        );
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let table = PerClient::new(1);
        let _a = table.take(ip("2001:db8:1:2::1")).unwrap();
        assert!(table.take(ip("2001:db8:1:2:ffff::9")).is_none(), "same /64");
        assert!(table.take(ip("2001:db8:1:3::1")).is_some(), "another /64");
        let _v4 = table.take(ip("198.51.100.4")).unwrap();
        assert!(
            table.take(ip("::ffff:198.51.100.4")).is_none(),
            "mapped = same"
        );
    }

    #[test]
    fn table_forgets_clients_without_connections() {
        let table = PerClient::new(3);
        let slots: Vec<_> = (1..=50u8)
            .map(|i| table.take(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(table.clients(), 50);
        drop(slots);
        assert_eq!(table.clients(), 0);
        assert_eq!(table.open(ip("10.0.0.1")), 0);
    }
}
