//! Every committed corpus file of every fuzz target, run through the target on stable: the
//! corpora (seeds, coverage finds, past crashes) are regression tests.

use std::path::Path;

#[test]
fn every_corpus_file_of_every_target_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let mut failures = Vec::new();
    for (name, target) in meshgate_fuzz_targets::TARGETS {
        let dir = root.join(name);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {name} at {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        assert!(!files.is_empty(), "empty corpus for {name}");
        for file in files {
            let data = std::fs::read(&file).expect("corpus file");
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(file.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "targets panicked on: {failures:#?}");
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let bins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../libfuzzer/fuzz_targets");
    for (name, _) in meshgate_fuzz_targets::TARGETS {
        let file = bins.join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("meshgate_fuzz_targets::{name}(")),
            "{name}"
        );
    }
}
