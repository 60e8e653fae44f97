//! `meshgate gateway --check --config FILE` on good and bad configurations: exit 0 with a
//! summary, or 1 with every problem located (file:line:column: key path: what is wrong),
//! certificate and key files and the overlay key included. The packaged example passes.

use meshgate_testkit::tls::TestCa;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// Runs `meshgate gateway --check --config FILE`: (exit code, stdout, stderr).
fn check(config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["gateway", "--check", "--config"])
        .arg(config)
        .output()
        .expect("meshgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keygen(path: &Path) {
    let ok = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["keygen", "--key"])
        .arg(path)
        .output()
        .expect("keygen runs")
        .status
        .success();
    assert!(ok, "keygen {}", path.display());
}

#[test]
fn a_valid_configuration_and_its_files_pass() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("check CA");
    ca.issue(&["site.example.org"])
        .write_pem(&d.join("site.pem"), &d.join("site.key"));
    keygen(&d.join("node.key"));
    let config = d.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{d}\"\n\
             [[tls.certificates]]\ncert = \"{d}/site.pem\"\nkey = \"{d}/site.key\"\n\
             [overlay]\nkey_file = \"{d}/node.key\"\npeers = [\"peer.example.org:9651\"]\n\
             [log]\naccess = \"json\"\n\
             [timeouts]\ndrain_ms = 5000\n\
             [[route]]\nhost = \"site.example.org\"\nbackends = [{{ addr = \"[6a1::1]:8080\" }}]\n\
             options = {{ hsts = {{ max_age = 63072000, include_subdomains = true, preload = true }} }}\n",
            d = d.display()
        ),
    )
    .unwrap();
    let (code, out, err) = check(&config);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("OK (1 routes, 1 certificate files, overlay on)"),
        "{out}"
    );
    // Nothing was started or created: no admin token, no listener.
    assert!(!d.join("admin.token").exists());
}

#[test]
fn every_bad_file_is_reported_located() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("check CA");
    ca.issue(&["a.example.org"])
        .write_pem(&d.join("a.pem"), &d.join("a.key"));
    ca.issue(&["b.example.org"])
        .write_pem(&d.join("b.pem"), &d.join("b.key"));
    std::fs::write(d.join("garbage.pem"), "not a certificate\n").unwrap();
    keygen(&d.join("node.key"));
    std::fs::set_permissions(d.join("node.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(d.join("admin.token"), "x\n").unwrap();
    std::fs::set_permissions(
        d.join("admin.token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = d.join("gateway.toml");
    let text = format!(
        "data_dir = \"{d}\"\n\
         [[tls.certificates]]\n\
         cert = \"{d}/missing.pem\"\n\
         key = \"{d}/a.key\"\n\
         [[tls.certificates]]\n\
         cert = \"{d}/a.pem\"\n\
         key = \"{d}/b.key\"\n\
         [[tls.certificates]]\n\
         cert = \"{d}/garbage.pem\"\n\
         key = \"{d}/a.key\"\n\
         [overlay]\n\
         key_file = \"{d}/node.key\"\n\
         peers = [\"peer.example.org:9651\"]\n",
        d = d.display()
    );
    std::fs::write(&config, &text).unwrap();
    let (code, out, err) = check(&config);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let c = config.display();
    for expected in [
        format!(
            "{c}:3:1: tls.certificates.0.cert: cannot read {}/missing.pem",
            d.display()
        ),
        format!(
            "{c}:7:1: tls.certificates.1.key: {}/b.key is not the private key of {}/a.pem's certificate",
            d.display(),
            d.display()
        ),
        format!(
            "{c}:9:1: tls.certificates.2.cert: {}/garbage.pem:",
            d.display()
        ),
        format!("{c}:12:1: overlay.key_file:"),
    ] {
        assert!(err.contains(&expected), "missing `{expected}` in:\n{err}");
    }
    assert!(
        err.contains(&format!(
            "{c}:1:1: data_dir: admin token: {}/admin.token: mode 644",
            d.display()
        )),
        "{err}"
    );
    assert!(err.contains("644"), "modes are named: {err}");
    assert!(err.contains("5 problems found"), "{err}");
}

#[test]
fn syntax_and_semantic_errors_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    for (text, expected) in [
        (
            "[timeouts]\ndrain_ms = \"soon\"\n",
            ":2:12: invalid type: string \"soon\", expected u64",
        ),
        (
            "[log]\naccess = \"xml\"\n",
            ":2:10: unknown variant `xml`, expected one of `text`, `json`, `off`",
        ),
        (
            "[[route]]\nhost = \"a.example.org\"\nbackends = [{ addr = \"[6a1::1]:80\" }]\n\
             [route.options.hsts]\nmax_age = 600\npreload = true\n",
            ":6:1: route.0.options.hsts.preload: needs `include_subdomains = true`",
        ),
        (
            "[[route]]\nhost = \"a.example.org\"\nbackends = [{ addr = \"[6a1::1]:80\" }]\n\
             [route.options.hsts]\nmax_age = 600\ninclude_subdomains = true\npreload = true\n",
            ":5:1: route.0.options.hsts.max_age: 600 is too short for `preload`",
        ),
        (
            "[[route]]\nhost = \"a.example.org\"\nbackends = [{ addr = \"[6a1::1]:80\" }]\n\
             options = { hsts = { max_age = 1, subdomains = true } }\n",
            "unknown field `subdomains`",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let (code, out, err) = check(&config);
        assert_eq!(code, 1, "{text}\nstdout: {out}\nstderr: {err}");
        assert!(
            err.contains(&format!("{}", config.display())) && err.contains(expected),
            "{text}\nexpected `{expected}` in:\n{err}"
        );
    }
    let (code, _, err) = check(&dir.path().join("absent.toml"));
    assert_eq!(code, 1);
    assert!(err.contains("absent.toml: cannot read file"), "{err}");
}

/// The example the Debian package installs as /etc/meshgate/gateway.toml passes the check
/// (its state directory moved to a temporary one), and so does the node example parse.
#[test]
fn packaged_examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(root.join("packaging/gateway.toml")).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        example.replace("/var/lib/meshgate", &dir.path().display().to_string()),
    )
    .unwrap();
    let (code, out, err) = check(&config);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    meshgate_config::node::NodeFileConfig::load(&root.join("packaging/node.toml"))
        .expect("packaging/node.toml parses");
}
