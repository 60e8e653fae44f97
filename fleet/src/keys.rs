//! The fleet's key layout in etcd: everything lives under `/meshgate/<name>/` (see
//! `docs/fleet.md` for what each key holds).

/// Why a fleet name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fleet name {name:?}: {reason}")]
pub struct BadFleetName {
    pub name: String,
    pub reason: &'static str,
}

/// The etcd keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetKeys {
    root: String,
}

impl FleetKeys {
    /// Keys under `/meshgate/<name>/`; `name` is 1-63 of `a-z 0-9 - _ .`.
    pub fn new(name: &str) -> Result<FleetKeys, BadFleetName> {
        let bad = |reason| BadFleetName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.len() > 63 {
            return Err(bad("must be 1 to 63 characters"));
        }
        let ok = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !ok {
            return Err(bad("may hold only a-z, 0-9, '-', '_' and '.'"));
        }
        Ok(FleetKeys {
            root: format!("/meshgate/{name}/"),
        })
    }

    /// `/meshgate/<name>/`: every key of the fleet starts with it.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Prefix of the state every gateway caches (reservations and tokens): one watch, one
    /// revision.
    pub fn state(&self) -> String {
        format!("{}state/", self.root)
    }

    /// Prefix of the reservations (`…/state/reservations/name/<label>`,
    /// `…/state/reservations/domain/<fqdn>/<owner>`), JSON records.
    pub fn reservations(&self) -> String {
        format!("{}reservations/", self.state())
    }

    /// Prefix of the deployer tokens (`…/state/tokens/<id>`), JSON with the token's hash only.
    pub fn tokens(&self) -> String {
        format!("{}tokens/", self.state())
    }

    /// The custom-domain challenge key, sealed under the fleet key.
    pub fn challenge_key(&self) -> String {
        format!("{}secrets/challenge-key", self.root)
    }

    /// A value sealed under the fleet key that every gateway opens at start: a gateway with
    /// another key refuses to run instead of writing secrets nobody else can read.
    pub fn key_check(&self) -> String {
        format!("{}secrets/key-check", self.root)
    }

    /// Prefix of the live members (`…/members/<gateway id>`), each bound to its lease.
    pub fn members(&self) -> String {
        format!("{}members/", self.root)
    }

    pub fn member(&self, id: &str) -> String {
        format!("{}{id}", self.members())
    }

    /// Prefix of ACME state (account, certificates, orders, locks, challenges): the layout
    /// below it belongs to the fleet's ACME coordination.
    pub fn acme(&self) -> String {
        format!("{}acme/", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_and_keys_nest_under_the_root() {
        let k = FleetKeys::new("farm-1").unwrap();
        assert_eq!(k.root(), "/meshgate/farm-1/");
        assert_eq!(k.member("gw-a"), "/meshgate/farm-1/members/gw-a");
        assert!(k.reservations().starts_with(k.root()));
        assert!(FleetKeys::new("a/b").is_err());
        assert!(FleetKeys::new("").is_err());
        assert!(FleetKeys::new("Farm").is_err());
    }
}
