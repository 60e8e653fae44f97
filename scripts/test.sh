#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian packages and cargo-deb) when
# missing, checks formatting and clippy (warnings are errors), runs every workspace test, then
# checks the systemd units and the Debian package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets "$@"
# systemd-analyze verify on the units, then the .deb built from the binary the tests used
# and its contents inspected.
NO_BUILD=1 bash scripts/check-packaging.sh
