//! Shared helpers for the benchmarks in `bench/src/bin/`: statistics, the report file and the
//! network namespace the TUN rows run in.

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
fn report_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md")
}

/// Replaces (or appends) the section between `<!-- BEGIN name -->` and `<!-- END name -->` in
/// `docs/benchmarks.md`, so each benchmark owns its own section of the shared report.
pub fn write_section(name: &str, markdown: &str) -> std::io::Result<()> {
    let path = report_path();
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    std::fs::write(&path, replace_section(&old, name, markdown))
}

/// As [`write_section`], in another file of `docs/` (`doc`, e.g. `performance.md`).
pub fn write_doc_section(doc: &str, name: &str, markdown: &str) -> std::io::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    let old = std::fs::read_to_string(&path)?;
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

/// Set in a benchmark re-run inside the network namespace [`enter_netns`] made.
const NETNS_ENV: &str = "MESHGATE_BENCH_IN_NETNS";

/// Whether this process runs inside a namespace made by [`enter_netns`].
pub fn in_netns() -> bool {
    std::env::var_os(NETNS_ENV).is_some()
}

/// Whether TUN rows can run: root, `/dev/net/tun`, and not yet inside our namespace.
pub fn can_enter_netns() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    root && Path::new("/dev/net/tun").exists() && !in_netns()
}

/// Runs this benchmark again, with the same arguments, inside a fresh network namespace with
/// loopback up (and an address for resolvers), so TUN interfaces and their `600::/7` route
/// never touch the host; every row (references included) is then measured inside it. The
/// namespace is deleted afterwards.
pub fn enter_netns() -> anyhow::Result<()> {
    let name = format!("mgbench-{}", std::process::id());
    let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status();
    anyhow::ensure!(
        ip(&["netns", "add", &name])?.success(),
        "ip netns add failed"
    );
    let result = (|| {
        anyhow::ensure!(ip(&["-n", &name, "link", "set", "lo", "up"])?.success());
        // Resolvers asked for AI_ADDRCONFIG (h2load's) find no address for `localhost` when
        // only loopback is configured: an IPv4 address on an unattached TUN interface (no
        // process reads it, nothing is routed through it) gives them one.
        for args in [
            &["tuntap", "add", "mode", "tun", "name", "mgaddr0"][..],
            &["addr", "add", "192.0.2.1/32", "dev", "mgaddr0"],
            &["link", "set", "mgaddr0", "up"],
        ] {
            anyhow::ensure!(ip(&[&["-n", &name][..], args].concat())?.success());
        }
        let exe = std::env::current_exe()?;
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(NETNS_ENV, "1")
            .status()?;
        anyhow::ensure!(status.success(), "benchmark inside the namespace failed");
        Ok(())
    })();
    let _ = ip(&["netns", "del", &name]);
    result
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
