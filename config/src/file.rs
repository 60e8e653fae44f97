//! Loading TOML files with errors that name the file, line, column and field.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration error located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column, when the error has a position.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about the whole file or a semantic check, with no position.
    pub fn new(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    /// A semantic error about `field`, positioned on `field`'s key in `text`. Dotted paths
    /// with indices (`route.2.pool.connect_timeout_ms`) are followed through the parsed
    /// document, so they point into the third `[[route]]`; a key left to its default points
    /// at the nearest enclosing table or key that is written.
    pub fn at_field(
        path: impl Into<PathBuf>,
        text: &str,
        field: &str,
        message: impl fmt::Display,
    ) -> Self {
        let path = path.into();
        let (line, column) = locate_field(text, field)
            .map(|offset| line_col(text, offset))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        ConfigError {
            path,
            line,
            column,
            message: format!("{field}: {message}"),
        }
    }
}

/// Reads and parses a TOML file into `T`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read file: {e}")))?;
    parse(path, &text)
}

/// Parses TOML text (named `path` in errors) into `T`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// Byte offset of the deepest part of dotted `field` (keys and array indices) written in
/// `text`: the key itself when present, else the closest enclosing key or array element.
fn locate_field(text: &str, field: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut array: Option<&[toml::Spanned<DeValue<'_>>]> = None;
    let mut found = None;
    for segment in field.split('.') {
        let value = match (table, array) {
            (Some(t), _) => match t.iter().find(|(k, _)| k.get_ref().as_ref() == segment) {
                Some((key, value)) => {
                    found = Some(key.span().start);
                    value
                }
                None => break,
            },
            (None, Some(items)) => match segment.parse::<usize>().ok().and_then(|i| items.get(i)) {
                Some(value) => {
                    found = Some(element_start(value));
                    value
                }
                None => break,
            },
            (None, None) => break,
        };
        (table, array) = match value.get_ref() {
            DeValue::Table(t) => (Some(t), None),
            DeValue::Array(a) => (None, Some(&a[..])),
            _ => (None, None),
        };
    }
    found
}

/// Where an array element is written: a `[[table]]` element's span does not always start at
/// its header, so its first key stands in for it.
fn element_start(value: &toml::Spanned<toml::de::DeValue<'_>>) -> usize {
    match value.get_ref() {
        toml::de::DeValue::Table(t) => t
            .iter()
            .map(|(k, _)| k.span().start)
            .min()
            .unwrap_or(value.span().start),
        _ => value.span().start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        listen: String,
        port: u16,
    }

    #[test]
    fn type_error_names_line_and_field() {
        let text = "listen = \"a\"\nport = \"eighty\"\n";
        let err = parse::<Demo>(Path::new("g.toml"), text).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.to_string().starts_with("g.toml:2:"), "{err}");
        assert!(err.message.contains("invalid type"), "{err}");
    }

    #[test]
    fn unknown_field_is_reported() {
        let text = "listen = \"a\"\nport = 1\nprot = 2\n";
        let err = parse::<Demo>(Path::new("g.toml"), text).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("prot"), "{err}");
    }

    #[test]
    fn route_field_error_points_into_that_route() {
        let text = "[[route]]\nhost = \"a.example\"\nbackends = []\n\
                    [[route]]\nhost = \"b.example\"\nbackends = []\n\
                    [[route]]\nhost = \"c.example\"\n  backends = []\n\
                    [route.pool]\nconnect_timeout_ms = 0\n";
        let err = ConfigError::at_field("g.toml", text, "route.2.backends", "x");
        assert_eq!((err.line, err.column), (Some(9), Some(3)), "{err}");
        let err = ConfigError::at_field("g.toml", text, "route.1.host", "x");
        assert_eq!(err.line, Some(5), "{err}");
        let err = ConfigError::at_field("g.toml", text, "route.2.pool.connect_timeout_ms", "x");
        assert_eq!(err.line, Some(11), "{err}");
        // Not written (a default): the route's first key.
        let err = ConfigError::at_field("g.toml", text, "route.1.options.allow_plain_http", "x");
        assert_eq!(err.line, Some(5), "{err}");
        let err = ConfigError::at_field("g.toml", text, "nowhere.at_all", "x");
        assert_eq!(err.line, None, "{err}");
    }

    #[test]
    fn semantic_error_located_by_field() {
        let text = "[gateway]\n  listen = \"x\"\n";
        let err = ConfigError::at_field("g.toml", text, "gateway.listen", "expected host:port");
        assert_eq!((err.line, err.column), (Some(2), Some(3)));
        assert_eq!(
            err.to_string(),
            "g.toml:2:3: gateway.listen: expected host:port"
        );
    }
}
