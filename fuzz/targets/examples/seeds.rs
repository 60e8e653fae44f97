//! Writes the generated seeds into `fuzz/corpus/<target>/seed-<name>`:
//! `cargo run -p meshgate-fuzz-targets --example seeds`.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (target, name, bytes) in meshgate_fuzz_targets::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
    }
}
