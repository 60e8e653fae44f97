#!/bin/sh
# Property-based test of the reservations API against docs/admin-api.yaml with schemathesis
# (`pip install schemathesis`, 4.x): starts a real `meshgate gateway` on loopback with a fresh
# data directory, runs every check (`--checks all`: 5xx, schema conformance, valid data
# accepted, invalid data refused, 405 with Allow, ...) and the stateful phase that follows the
# spec's links (create, read, update, delete), once with the admin token and once with a
# deployer token. Exits non-zero on any failure. Needs no network beyond loopback.
#   scripts/schemathesis.sh [MAX_EXAMPLES]   (default 50 per operation)
set -eu
cd "$(dirname "$0")/.."
MAX="${1:-50}"
ST="${SCHEMATHESIS:-schemathesis}"
command -v "$ST" >/dev/null || { echo "schemathesis not found: pip install schemathesis" >&2; exit 2; }
cargo build -q --bin meshgate
DIR="$(mktemp -d)"
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -rf "$DIR"' EXIT INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API_PORT="$(port)"; ADMIN_PORT="$(port)"
cat > "$DIR/gateway.toml" <<TOML
domains = ["farm.example"]
data_dir = "$DIR/data"
[listen]
https = ["127.0.0.1:0"]
http = ["127.0.0.1:0"]
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token_file = "$DIR/admin.token"
[api]
listen = "127.0.0.1:$API_PORT"
[reservations]
nameservers = ["127.0.0.1:9"]
query_timeout_ms = 200
max_per_owner = 100000
[tls.dev_ca]
dir = "$DIR/ca"
TOML
RUST_LOG=warn target/debug/meshgate gateway --config "$DIR/gateway.toml" >"$DIR/gateway.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -s "$DIR/admin.token" ] && curl -s "http://127.0.0.1:$API_PORT/" >/dev/null && break; sleep 0.1; done
ADMIN="$(cat "$DIR/admin.token")"
status=0
for who in admin deployer; do
  # The deployer's token is minted after the admin's run, which may revoke tokens it lists.
  if [ "$who" = admin ]; then TOKEN="$ADMIN"; else
    TOKEN="$(curl -s -H "Authorization: Bearer $ADMIN" -d '{"owner":"alice"}' "http://127.0.0.1:$API_PORT/v1/tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
  fi
  echo "== schemathesis as $who"
  "$ST" run docs/admin-api.yaml --url "http://127.0.0.1:$API_PORT" \
    -H "Authorization: Bearer $TOKEN" --checks all --max-examples "$MAX" \
    --seed 1 --no-color || status=1
done
if grep -q "panicked" "$DIR/gateway.log"; then echo "the gateway panicked:"; grep -A5 panicked "$DIR/gateway.log"; status=1; fi
exit $status
