//! Loop detection: every request the gateway forwards carries a `Via` entry (RFC 9110
//! §7.6.3) naming this gateway by a pseudonym drawn at start; a request that arrives with it
//! has come around through a backend that leads back here, and gets 508 instead of taking
//! another slot on every lap.

use http::Version;
use http::header::{self, HeaderMap, HeaderValue};
use std::hash::{BuildHasher, Hasher};

/// This gateway's `Via` pseudonym, `meshgate-<16 hex digits>`, fresh for each process.
#[derive(Debug, Clone)]
pub(crate) struct Identity(String);

impl Identity {
    pub(crate) fn random() -> Identity {
        // The std hasher's keys are random per process: enough for a name that only has to
        // differ from other gateways' (it guards against loops, it is no secret).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        Identity(format!("meshgate-{:016x}", h.finish()))
    }

    #[cfg(test)]
    pub(crate) fn fixed(name: &str) -> Identity {
        Identity(name.to_string())
    }

    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `headers` carry a `Via` entry received by this gateway.
    pub(crate) fn looped(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|entry| entry.split_whitespace().nth(1) == Some(self.0.as_str()))
    }

    /// Appends this gateway's entry for a request received as `version` to `headers`' `Via`.
    pub(crate) fn append_via(&self, headers: &mut HeaderMap, version: Version) {
        let protocol = match version {
            Version::HTTP_2 => "2",
            Version::HTTP_10 => "1.0",
            Version::HTTP_09 => "0.9",
            _ => "1.1",
        };
        let mine = format!("{protocol} {}", self.0);
        let earlier: Vec<&str> = headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let value = if earlier.is_empty() {
            mine
        } else {
            format!("{}, {mine}", earlier.join(", "))
        };
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
