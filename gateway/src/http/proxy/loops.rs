//! Loop detection: every request the gateway forwards carries a `Via` entry (RFC 9110
//! §7.6.3) naming this gateway by a pseudonym drawn at start; a request that arrives with it
//! has come around through a backend that leads back here, and gets 508 instead of taking
//! another slot on every lap.

use http::Version;
use http::header::{self, HeaderMap, HeaderValue};
use std::hash::{BuildHasher, Hasher};

/// This gateway's `Via` pseudonym, `meshgate-<16 hex digits>`, fresh for each process.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    name: String,
    /// This gateway's own `Via` entry per received version (`1.1`, `2`, `1.0`, `0.9`), made
    /// once: most requests carry no earlier `Via`, and then this is the whole header.
    entries: [HeaderValue; 4],
}

impl Identity {
    pub(crate) fn random() -> Identity {
        // The std hasher's keys are random per process: enough for a name that only has to
        // differ from other gateways' (it guards against loops, it is no secret).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        Identity::named(format!("meshgate-{:016x}", h.finish()))
    }

    fn named(name: String) -> Identity {
        let entry = |protocol: &str| {
            // The name is hex and ASCII: this never falls back.
            HeaderValue::from_str(&format!("{protocol} {name}"))
                .unwrap_or_else(|_| HeaderValue::from_static("1.1 meshgate"))
        };
        let entries = [entry("1.1"), entry("2"), entry("1.0"), entry("0.9")];
        Identity { name, entries }
    }

    #[cfg(test)]
    pub(crate) fn fixed(name: &str) -> Identity {
        Identity::named(name.to_string())
    }

    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.name
    }

    /// Whether `headers` carry a `Via` entry received by this gateway.
    pub(crate) fn looped(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|entry| entry.split_whitespace().nth(1) == Some(self.name.as_str()))
    }

    /// Appends this gateway's entry for a request received as `version` to `headers`' `Via`.
    pub(crate) fn append_via(&self, headers: &mut HeaderMap, version: Version) {
        let mine = &self.entries[match version {
            Version::HTTP_2 => 1,
            Version::HTTP_10 => 2,
            Version::HTTP_09 => 3,
            _ => 0,
        }];
        let earlier: Vec<&str> = headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if earlier.is_empty() {
            headers.insert(header::VIA, mine.clone());
            return;
        }
        let mine = mine.to_str().unwrap_or_default();
        let value = format!("{}, {mine}", earlier.join(", "));
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(header::VIA, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_via_entry_is_a_loop_others_are_not() {
        let me = Identity::random();
        assert!(me.as_str().starts_with("meshgate-") && me.as_str().len() == 25);
        assert_ne!(me.as_str(), Identity::random().as_str());
        let mut h = HeaderMap::new();
        h.insert(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 p.example (Apache)"),
        );
        assert!(!me.looped(&h));
        me.append_via(&mut h, Version::HTTP_2);
        let via = h.get(header::VIA).unwrap().to_str().unwrap().to_string();
        assert_eq!(
            via,
            format!("1.0 fred, 1.1 p.example (Apache), 2 {}", me.as_str())
        );
        assert!(me.looped(&h));
        assert!(!Identity::fixed("meshgate-other").looped(&h));
    }
}
