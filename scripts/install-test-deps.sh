#!/usr/bin/env bash
# Installs the Debian packages the test suite needs, only when missing (idempotent, quiet).
#   pebble          real ACME server for certs tests
#   curl, openssl   real clients in end-to-end tests
#   nghttp2-client  h2load, HTTP/2 client checks
#   iproute2        network namespaces for TUN tests and LAN discovery
#   etcd-server, etcd-client  a real 3-member etcd cluster for the gateway fleet
#   protobuf-compiler, libprotobuf-dev  protoc and its well-known types, which etcd-client's build needs
#   chromium        headless browser for the status and deployer pages
#   valgrind        callgrind instruction counts (bench)
#   systemd, procps systemd-analyze verify on the units, /bin/kill for ExecReload
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have pebble || [ -x /usr/bin/pebble ] || need+=(pebble)
have curl || need+=(curl)
have make || need+=(make)  # tikv-jemalloc-sys builds jemalloc with make
have openssl || need+=(openssl)
have h2load || need+=(nghttp2-client)
have ip || need+=(iproute2)
have etcd || [ -x /usr/bin/etcd ] || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
have protoc || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
have chromium || [ -x /usr/bin/chromium ] || need+=(chromium)
have valgrind || need+=(valgrind)
have systemd-analyze || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# cargo-deb builds the Debian package the packaging check inspects.
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet
