#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian's pebble, curl, openssl, h2load,
# iproute2) when missing, checks formatting and clippy (warnings are errors), then runs every
# workspace test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets "$@"
