//! Shared helpers for the benchmarks in `bench/src/bin/`: statistics and the report file.

use std::path::{Path, PathBuf};

/// Median of a set of samples (the machine is shared and noisy: we quote medians).
pub fn median(samples: &mut [f64]) -> f64 {
    assert!(!samples.is_empty(), "median of no samples");
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    }
}

/// `docs/benchmarks.md` at the workspace root.
pub fn report_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md")
}

/// Replaces (or appends) the section between `<!-- BEGIN name -->` and `<!-- END name -->` in
/// `docs/benchmarks.md`, so each benchmark owns its own section of the shared report.
pub fn write_section(name: &str, markdown: &str) -> std::io::Result<()> {
    let path = report_path();
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    std::fs::write(&path, replace_section(&old, name, markdown))
}

fn replace_section(doc: &str, name: &str, markdown: &str) -> String {
    let begin = format!("<!-- BEGIN {name} -->");
    let end = format!("<!-- END {name} -->");
    let block = format!("{begin}\n{}\n{end}", markdown.trim_end());
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &doc[..b], block, &doc[e + end.len()..]),
        _ => format!("{}\n{}\n", doc.trim_end(), block),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn section_replaced_in_place_and_others_kept() {
        let doc = replace_section("# B\n", "a", "one");
        let doc = replace_section(&doc, "b", "two");
        let doc = replace_section(&doc, "a", "uno");
        assert!(doc.contains("<!-- BEGIN a -->\nuno\n<!-- END a -->"));
        assert!(doc.contains("two"));
        assert!(!doc.contains("one"));
        assert!(doc.find("uno").unwrap() < doc.find("two").unwrap());
    }
}
