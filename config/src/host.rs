//! Host names: [`HostName`], the one validated form of a DNS host name, and [`HostPattern`],
//! a route's host (a name, or `*.` and a name). Every place that parses a host uses them:
//! route hosts, `domains` and `admin.tls.names` in `gateway.toml`, reservation names and
//! custom domains, certificate names, and the `Host` a request is proxied with.
//!
//! The rule:
//! - ASCII only. An internationalised name is written as punycode A-labels (`xn--…`); a name
//!   given in Unicode is refused with its punycode form as a hint.
//! - Any case on input, stored lowercase; one trailing dot (the DNS root) is dropped.
//! - At most 253 chars; dot-separated labels of 1–63 chars of `a-z`, `0-9` and `-`, none
//!   starting or ending with `-` (RFC 1035 §2.3.4, RFC 1123 §2.1).
//! - No `_`. Host names are letters, digits and hyphens (RFC 952/1123); `_` marks service
//!   labels (`_acme-challenge`, `_dmarc`), which are not hosts, and public CAs must not issue
//!   certificates for names containing it (CA/Browser Forum Baseline Requirements, since
//!   2019), so a host with `_` could never be served over TLS. (Before this type, route hosts
//!   and certificate names allowed `_` while reservations refused it.)
//! - `--` in positions 3–4 only in a valid A-label (`xn--` that decodes), as RFC 5891 §4.2.3.1
//!   reserves such labels and CAs refuse the others.
//!
//! Not checked here, because they are policies of particular uses: the number of labels,
//! all-digit top-level labels and IP-literal look-alikes (reservations refuse them; a route
//! may be named `10.0.0.1`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest DNS label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest host name in text form without the trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_NAME_LEN: usize = 253;

/// Why a text is not a [`HostName`]. The messages complete a sentence that starts with the
/// field name (`domain: contains an empty label`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNameError {
    Empty,
    /// Not ASCII; `punycode` is the A-label form when the text is a valid Unicode name.
    NotAscii {
        punycode: Option<String>,
    },
    TooLong {
        len: usize,
    },
    EmptyLabel,
    LabelTooLong {
        label: String,
    },
    BadChar {
        label: String,
        found: char,
    },
    EdgeHyphen {
        label: String,
    },
    ReservedHyphens {
        label: String,
    },
}

impl fmt::Display for HostNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostNameError::Empty => f.write_str("must not be empty"),
            HostNameError::NotAscii { punycode } => {
                f.write_str("internationalised names must be given in punycode form")?;
                match punycode {
                    Some(ascii) => write!(f, " (`{ascii}`)"),
                    None => Ok(()),
                }
            }
            HostNameError::TooLong { len } => {
                write!(f, "is {len} chars; a host name has at most {MAX_NAME_LEN}")
            }
            HostNameError::EmptyLabel => f.write_str("contains an empty label"),
            HostNameError::LabelTooLong { label } => write!(
                f,
                "label `{label}` is {} chars; a DNS label has at most {MAX_LABEL_LEN}",
                label.len()
            ),
            HostNameError::BadChar { label, found } => write!(
                f,
                "label `{label}` contains `{found}`; only a-z, 0-9 and `-` are allowed"
            ),
            HostNameError::EdgeHyphen { label } => {
                write!(f, "label `{label}` must not start or end with `-`")
            }
            HostNameError::ReservedHyphens { label } => write!(
                f,
                "label `{label}` has `--` in positions 3-4, reserved for valid punycode (`xn--`) labels"
            ),
        }
    }
}

impl std::error::Error for HostNameError {}

/// A valid host name (see the module comment for the rule): lowercase ASCII, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    /// Validates `text` (any case, optional trailing dot) and returns it in canonical form.
    pub fn parse(text: &str) -> Result<HostName, HostNameError> {
        if text.is_empty() {
            return Err(HostNameError::Empty);
        }
        if !text.is_ascii() {
            return Err(HostNameError::NotAscii {
                punycode: idna::domain_to_ascii_strict(text).ok(),
            });
        }
        let lower = text.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.len() > MAX_NAME_LEN {
            return Err(HostNameError::TooLong { len: name.len() });
        }
        name.split('.').try_for_each(check_label)?;
        Ok(HostName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The labels, leftmost first.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

/// One label of a name already lowercased.
fn check_label(label: &str) -> Result<(), HostNameError> {
    let owned = || label.to_string();
    if label.is_empty() {
        return Err(HostNameError::EmptyLabel);
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(HostNameError::LabelTooLong { label: owned() });
    }
    if let Some(found) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(HostNameError::BadChar {
            label: owned(),
            found,
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(HostNameError::EdgeHyphen { label: owned() });
    }
    if label.get(2..4) == Some("--") {
        let valid_a_label = label.starts_with("xn--")
            && idna::domain_to_ascii_strict(label).is_ok_and(|ascii| ascii == label);
        if !valid_a_label {
            return Err(HostNameError::ReservedHyphens { label: owned() });
        }
    }
    Ok(())
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for HostName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostName {
    type Err = HostNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostName::parse(s)
    }
}

impl TryFrom<String> for HostName {
    type Error = HostNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostName::parse(&s)
    }
}

impl From<HostName> for String {
    fn from(h: HostName) -> String {
        h.0
    }
}

impl PartialEq<str> for HostName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for HostName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A route's host: an exact [`HostName`], or `*.parent` matching every name exactly one
/// label below `parent` (not `parent` itself, not two labels below). Kept as its text so
/// the hot path reads it without formatting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern(String);

impl HostPattern {
    /// Validates `text`: a host name, or `*.` followed by one (any case, optional trailing
    /// dot), and returns it in canonical form.
    pub fn parse(text: &str) -> Result<HostPattern, HostNameError> {
        Ok(match text.strip_prefix("*.") {
            Some(parent) => HostPattern(format!("*.{}", HostName::parse(parent)?)),
            None => HostPattern::from(HostName::parse(text)?),
        })
    }

    /// The text: the name, or `*.parent`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `parent` of a `*.parent` pattern; `None` for an exact name.
    pub fn wildcard_parent(&self) -> Option<&str> {
        self.0.strip_prefix("*.")
    }

    /// Whether `host` (a canonical name, as [`HostName::as_str`] gives) is matched.
    pub fn matches(&self, host: &str) -> bool {
        match self.wildcard_parent() {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == parent),
            None => self.0 == host,
        }
    }
}

impl From<HostName> for HostPattern {
    fn from(name: HostName) -> Self {
        HostPattern(name.0)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for HostPattern {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostPattern {
    type Err = HostNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

impl TryFrom<String> for HostPattern {
    type Error = HostNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostPattern::parse(&s)
    }
}

impl From<HostPattern> for String {
    fn from(h: HostPattern) -> String {
        h.0
    }
}

impl PartialEq<str> for HostPattern {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for HostPattern {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        HostName::parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .into_string()
    }

    fn err(text: &str) -> HostNameError {
        HostName::parse(text).expect_err(text)
    }

    #[test]
    fn hosts_in_use_are_accepted() {
        for h in [
            "gw.example.org",
            "app.gw.example.org",
            "db-admin.example.com",
            "a.example",
            "localhost",
            "a",
            "10.0.0.1",
            "xn--bcher-kva.example",
            "h2c.test",
            "alice-1.farm.example",
        ] {
            assert_eq!(ok(h), h);
        }
        assert!(ok(&"a".repeat(63)).len() == 63);
        let longest = vec!["a".repeat(63); 4].join(".");
        assert_eq!(longest.len(), 255);
        assert_eq!(ok(&longest[..253]), &longest[..253]);
    }

    #[test]
    fn case_and_the_root_dot_are_normalised() {
        assert_eq!(ok("Shop.Example.COM."), "shop.example.com");
        assert_eq!(ok("XN--BCHER-KVA.example"), "xn--bcher-kva.example");
        assert_eq!(err("a.example.."), HostNameError::EmptyLabel);
        assert_eq!(err("."), HostNameError::EmptyLabel);
    }

    #[test]
    fn underscore_is_refused_everywhere_in_a_name() {
        for h in [
            "a_b.example",
            "_x.example.com",
            "x.example_",
            "_acme-challenge",
        ] {
            assert!(
                matches!(err(h), HostNameError::BadChar { found: '_', .. }),
                "{h}"
            );
        }
        assert!(err("a_b").to_string().contains("`_`"));
    }

    #[test]
    fn hostile_input_is_refused() {
        assert_eq!(err(""), HostNameError::Empty);
        assert_eq!(err("a..b"), HostNameError::EmptyLabel);
        assert_eq!(err(".a"), HostNameError::EmptyLabel);
        assert_eq!(
            err(&format!("{}.com", "a".repeat(64))),
            HostNameError::LabelTooLong {
                label: "a".repeat(64)
            }
        );
        let too_long = vec!["a".repeat(60); 5].join(".");
        assert_eq!(err(&too_long), HostNameError::TooLong { len: 304 });
        assert!(err(&too_long).to_string().contains("at most 253"));
        assert_eq!(
            err(&"a.".repeat(10_000)),
            HostNameError::TooLong { len: 19_999 }
        );
        for bad in [
            "a b.example",
            "a\";for=\"1.example.org",
            "user@a.example",
            "a.example:443",
            "[::1]",
            "*.example.org",
            "a/b",
            "a\0b",
            "a\r\nb",
        ] {
            assert!(matches!(err(bad), HostNameError::BadChar { .. }), "{bad:?}");
        }
        assert_eq!(
            err("-a.example"),
            HostNameError::EdgeHyphen { label: "-a".into() }
        );
        assert!(matches!(
            err("a-.example"),
            HostNameError::EdgeHyphen { .. }
        ));
        assert!(matches!(
            err("ab--cd"),
            HostNameError::ReservedHyphens { .. }
        ));
        assert!(matches!(err("xn--zz-"), HostNameError::EdgeHyphen { .. }));
        assert!(matches!(
            err("xn--xx.example"),
            HostNameError::ReservedHyphens { .. }
        ));
    }

    #[test]
    fn unicode_is_refused_with_its_punycode() {
        let e = err("bücher.example");
        assert_eq!(
            e,
            HostNameError::NotAscii {
                punycode: Some("xn--bcher-kva.example".into())
            }
        );
        assert!(e.to_string().contains("`xn--bcher-kva.example`"), "{e}");
        // Look-alikes and invisible characters are not ASCII either.
        assert!(matches!(err("раураl.com"), HostNameError::NotAscii { .. }));
        assert!(matches!(
            err("a\u{200b}.example"),
            HostNameError::NotAscii { .. }
        ));
        assert!(matches!(
            err("ｅxample.com"),
            HostNameError::NotAscii { .. }
        ));
    }

    #[test]
    fn patterns_are_names_or_one_label_wildcards() {
        let p = HostPattern::parse("*.Pass.Example.org.").unwrap();
        assert_eq!(p.as_str(), "*.pass.example.org");
        assert_eq!(p.wildcard_parent(), Some("pass.example.org"));
        assert!(p.matches("a.pass.example.org"));
        assert!(!p.matches("pass.example.org"));
        assert!(!p.matches("a.b.pass.example.org"));
        let exact = HostPattern::parse("app.example.org").unwrap();
        assert_eq!(exact.wildcard_parent(), None);
        assert!(exact.matches("app.example.org"));
        assert!(!exact.matches("x.app.example.org"));
        for bad in [
            "*",
            "*.",
            "a.*.example",
            "**.example",
            "*example.org",
            "*._x.org",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_is_the_plain_string_and_validates() {
        let p: HostPattern = serde_json::from_str("\"*.example.org\"").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"*.example.org\"");
        assert!(serde_json::from_str::<HostName>("\"a_b.example\"").is_err());
        let h: HostName = serde_json::from_str("\"A.example\"").unwrap();
        assert_eq!(h, "a.example");
    }
}
