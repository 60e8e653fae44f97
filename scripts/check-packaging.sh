#!/usr/bin/env bash
# Packaging checks: `systemd-analyze verify` on the units in packaging/systemd (offline, in a
# throwaway root, so it works without systemd as PID 1), and, when cargo-deb is installed,
# builds the .deb (dev profile by default: reuses the test build; PROFILE=release for a real
# one) and inspects its metadata and contents.
#   scripts/check-packaging.sh            # units, then the .deb if cargo-deb is there
#   scripts/check-packaging.sh --units    # units only
set -euo pipefail
cd "$(dirname "$0")/.."

units_only=false
[ "${1:-}" = "--units" ] && units_only=true

fail() { echo "check-packaging: $*" >&2; exit 1; }

# --- systemd units -----------------------------------------------------------------------
command -v systemd-analyze >/dev/null || fail "systemd-analyze not found (apt-get install systemd)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# verify resolves dependencies (sysinit.target, ...) and ExecStart= binaries inside --root:
# give it the host's unit tree, /bin/kill and a stand-in for /usr/bin/meshgate.
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
ln -s usr/lib "$root/lib"
ln -s usr/bin "$root/bin"
cp /bin/kill "$root/usr/bin/kill"
printf '#!/bin/sh\nexit 0\n' > "$root/usr/bin/meshgate"
chmod 755 "$root/usr/bin/meshgate"
cp packaging/systemd/*.service "$root/etc/systemd/system/"
units=("$root"/etc/systemd/system/meshgate*.service)
[ "${#units[@]}" -ge 3 ] || fail "expected the gateway, node and node-tun units"
out=$(systemd-analyze verify --man=no --root="$root" "${units[@]}" 2>&1) \
    || fail "systemd-analyze verify failed:"$'\n'"$out"
# Unknown keys and the like are only warnings (exit 0): any word about our units fails.
if grep -q meshgate <<<"$out"; then
    fail "systemd-analyze verify warned:"$'\n'"$out"
fi
echo "check-packaging: systemd-analyze verify: ${#units[@]} units OK"
$units_only && exit 0

# --- Debian package ----------------------------------------------------------------------
if ! cargo deb --version >/dev/null 2>&1; then
    echo "check-packaging: cargo-deb not installed (cargo install cargo-deb --locked); .deb not built"
    exit 0
fi
profile=${PROFILE:-dev}
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# The test command has just built the binary with the workspace's features (NO_BUILD=1): a
# build of the package alone would resolve features differently and rebuild half the tree.
[ "${NO_BUILD:-0}" = 1 ] || cargo build -p meshgate --bin meshgate --profile "$profile"
bin="$target_dir/$dir/meshgate"
gen="$target_dir/$dir/packaging"
rm -rf "$gen" && mkdir -p "$gen/completions" "$gen/man"
"$bin" completions bash > "$gen/completions/meshgate.bash"
"$bin" completions zsh > "$gen/completions/_meshgate"
"$bin" completions fish > "$gen/completions/meshgate.fish"
"$bin" man --out-dir "$gen/man"
deb=$(cargo deb -p meshgate --no-build --profile "$profile" --output "$target_dir/debian/" 2>&1 | tail -n 1)
[ -f "$deb" ] || fail "cargo deb produced no package: $deb"
info=$(dpkg-deb -I "$deb")
contents=$(dpkg-deb -c "$deb")
echo "$info"
echo "$contents"
for field in "Package: meshgate" "Depends:.*adduser" "Section: net"; do
    grep -q "$field" <<<"$info" || fail "control lacks '$field'"
done
for script in postinst prerm postrm; do
    grep -qE "[0-9]+ lines +\*? +$script +#!/bin/sh" <<<"$info" || fail "no executable $script maintainer script"
done
for path in ./usr/bin/meshgate \
    ./usr/lib/systemd/system/meshgate-gateway.service \
    ./usr/lib/systemd/system/meshgate-node.service \
    ./usr/lib/systemd/system/meshgate-node-tun.service \
    ./usr/lib/sysusers.d/meshgate.conf \
    ./etc/meshgate/gateway.toml ./etc/meshgate/node.toml \
    ./usr/share/bash-completion/completions/meshgate \
    ./usr/share/zsh/vendor-completions/_meshgate \
    ./usr/share/fish/vendor_completions.d/meshgate.fish \
    ./usr/share/man/man1/meshgate.1 \
    ./usr/share/man/man1/meshgate-gateway.1 \
    ./usr/share/doc/meshgate/operations.md; do
    grep -q " $path\$" <<<"$contents" || fail "package lacks $path"
done
grep -qE "^-rwxr-xr-x (root/root|0/0) .* ./usr/bin/meshgate$" <<<"$contents" || fail "/usr/bin/meshgate is not 0755 root"
grep -qE "^-rw-r----- (root/root|0/0) .* ./etc/meshgate/gateway.toml$" <<<"$contents" || fail "gateway.toml is not 0640"
# The shipped binary answers and the shipped example config passes its own check.
x=$(mktemp -d)
dpkg-deb -x "$deb" "$x"
"$x/usr/bin/meshgate" --version
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -q /etc/meshgate/gateway.toml \
    || fail "/etc/meshgate/gateway.toml is not a conffile"
rm -rf "$x"
echo "check-packaging: $deb OK"
