#!/usr/bin/env bash
# Runs Leasehold's whole test suite: format and lint checks, unit tests, and
# integration tests against real redis-server processes (a single node and
# a 3-master/3-replica Redis Cluster) that the tests start on free loopback
# ports. Installs what the tests need when it is missing and we are root.
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

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
say "cargo test"
cargo test --all-targets --quiet
say "cargo test --doc"
cargo test --doc --quiet
say "all tests passed"
