#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/libfuzzer/) for SECONDS each (default 60), one after
# another, on the nightly toolchain with libFuzzer. New coverage lands in fuzz/corpus/<target>/,
# crashes in fuzz/libfuzzer/artifacts/<target>/ (copy a fixed crash into the corpus: it becomes
# a regression test). Stable CI needs none of this: `cargo test -p meshgate-fuzz-targets`
# replays the committed corpora.
#
#   scripts/fuzz.sh [SECONDS]             every target
#   TARGETS="control routed" scripts/fuzz.sh 300
#
# Built without a sanitizer (the workspace denies unsafe code) but with debug assertions, so
# integer overflow panics as it does in tests. After a long run, keep the corpora small:
#   cargo +nightly fuzz cmin --fuzz-dir fuzz/libfuzzer -s none --debug-assertions <target> \
#       fuzz/corpus/<target>
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
flags=(--fuzz-dir fuzz/libfuzzer -s none --debug-assertions)
targets="${TARGETS:-$(cargo +nightly fuzz list --fuzz-dir fuzz/libfuzzer)}"
cargo +nightly fuzz build "${flags[@]}"
status=0
for t in $targets; do
    echo "== $t: ${seconds}s"
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
    cargo +nightly fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${dict[@]}" || status=1
done
exit "$status"
