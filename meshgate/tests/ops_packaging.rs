//! Packaging: the systemd units pass `systemd-analyze verify` (through
//! `scripts/check-packaging.sh --units`, the same check CI runs), keep their sandboxing, and
//! the shell completions and man pages come out of the CLI definition with every subcommand
//! and the gateway's `--check` in them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn meshgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(args)
        .output()
        .expect("meshgate runs");
    assert!(out.status.success(), "meshgate {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn units_pass_systemd_analyze_verify() {
    assert!(
        Path::new("/usr/bin/systemd-analyze").exists(),
        "systemd-analyze is missing: apt-get install systemd (scripts/install-test-deps.sh)"
    );
    let out = Command::new("bash")
        .arg(root().join("scripts/check-packaging.sh"))
        .arg("--units")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 units OK"));
}

/// The script really fails on a broken unit (so the check above can fail).
#[test]
fn a_broken_unit_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path();
    std::fs::create_dir_all(copy.join("scripts")).unwrap();
    std::fs::create_dir_all(copy.join("packaging/systemd")).unwrap();
    std::fs::copy(
        root().join("scripts/check-packaging.sh"),
        copy.join("scripts/check-packaging.sh"),
    )
    .unwrap();
    for unit in ["meshgate-gateway", "meshgate-node", "meshgate-node-tun"] {
        let from = root().join(format!("packaging/systemd/{unit}.service"));
        let mut text = std::fs::read_to_string(from).unwrap();
        if unit == "meshgate-node" {
            text = text.replace(
                "ProtectSystem=strict",
                "ProtectSystem=strict\nProtectSystm=yes",
            );
        }
        std::fs::write(copy.join(format!("packaging/systemd/{unit}.service")), text).unwrap();
    }
    let out = Command::new("bash")
        .arg(copy.join("scripts/check-packaging.sh"))
        .arg("--units")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a typo passed: {err}");
    assert!(err.contains("ProtectSystm"), "{err}");
}

#[test]
fn units_are_sandboxed_with_least_capabilities() {
    let unit = |name: &str| {
        std::fs::read_to_string(root().join(format!("packaging/systemd/{name}.service"))).unwrap()
    };
    for name in ["meshgate-gateway", "meshgate-node", "meshgate-node-tun"] {
        let text = unit(name);
        for line in [
            "User=meshgate",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(text.lines().any(|l| l == line), "{name}: no `{line}`");
        }
        assert!(text.contains("StateDirectory=meshgate"), "{name}");
        let caps: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .collect();
        let expected = if name == "meshgate-node-tun" {
            "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"
        } else {
            "CAP_NET_BIND_SERVICE"
        };
        assert_eq!(caps, vec![expected], "{name}");
    }
    // The gateway checks its configuration before starting, and stops after its drain.
    let gw = unit("meshgate-gateway");
    assert!(gw.contains(
        "ExecStartPre=/usr/bin/meshgate gateway --check --config /etc/meshgate/gateway.toml"
    ));
    assert!(gw.contains("TimeoutStopSec=45"));
}

#[test]
fn completions_and_man_pages_come_from_the_cli() {
    let bash = meshgate(&["completions", "bash"]);
    for word in [
        "gateway", "node", "keygen", "reserve", "--check", "--config",
    ] {
        assert!(bash.contains(word), "bash completions lack {word}");
    }
    assert!(meshgate(&["completions", "zsh"]).starts_with("#compdef meshgate"));
    assert!(meshgate(&["completions", "fish"]).contains("complete -c meshgate"));
    let man = meshgate(&["man"]);
    assert!(man.contains(".TH meshgate 1"), "{man}");
    assert!(man.contains("gateway"));
    let dir = tempfile::tempdir().unwrap();
    meshgate(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    let page = std::fs::read_to_string(dir.path().join("meshgate-gateway.1")).unwrap();
    assert!(page.contains("\\-\\-check"), "{page}");
    assert!(dir.path().join("meshgate.1").exists());
    assert!(dir.path().join("meshgate-node.1").exists());
}
