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

    /// A semantic error about `field`, positioned on the line where `field`'s key appears
    /// (dotted paths like `routes.3.backends` point at the table and key when found).
    pub fn at_field(
        path: impl Into<PathBuf>,
        text: &str,
        field: &str,
        message: impl fmt::Display,
    ) -> Self {
        let path = path.into();
        let key = field.rsplit('.').next().unwrap_or(field);
        let (line, column) =
            locate_key(text, key).map_or((None, None), |(l, c)| (Some(l), Some(c)));
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

/// First line where `key` is assigned (`key =` at the start of a line, ignoring indentation).
fn locate_key(text: &str, key: &str) -> Option<(usize, usize)> {
    text.lines().enumerate().find_map(|(i, l)| {
        let trimmed = l.trim_start();
        let rest = trimmed.strip_prefix(key)?;
        rest.trim_start()
            .starts_with('=')
            .then(|| (i + 1, l.len() - trimmed.len() + 1))
    })
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
