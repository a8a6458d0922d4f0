#!/bin/bash
# What one exclusive Acquire + Release costs inside Redis, without the
# network, the server or fred: the scripts' shared functions (grant.lua,
# shared.lua, ops.lua) run in a loop inside one EVAL on a private
# redis-server, and the wall time is divided by the number of cycles.
# Every key is granted three times (CYCLES over KEYS), so two grants in
# three find a released record, as a busy key's do.
#
# usage: documentation/tools/lua-cycle-cost.sh [REV...]
#   no REV: the working tree; REV: a git revision (the scripts' older home,
#   src/store/scripts, is found too). Each is run three times, interleaved.
# Environment: CYCLES (default 60000), KEYS (20000). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/../.."
CYCLES=${CYCLES:-60000}
KEYS=${KEYS:-20000}
work=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# The loop: the current signatures; a Lua function ignores extra arguments,
# so older revisions' acquire(…, min_replicas) and release(lock, token,
# channel) run it unchanged.
cat > "$work/loop.lua" <<'LUA'
local n = tonumber(ARGV[1]); local keys = tonumber(ARGV[2]); local base = ARGV[3]
for i = 1, n do
  local k = base .. (i % keys)
  local lock = '{' .. k .. '}:lock'
  local tok = 'tok' .. i
  acquire(lock, '{' .. k .. '}:fence', tok, '10000', 'owner', '', '', '600000', '0', '0')
  release(lock, tok, '{' .. k .. '}:released', '', false, lock .. ':gone:' .. tok)
end
return n
LUA

# prelude REV OUT: the functions every writing script starts with.
prelude() {
  local rev=$1 out=$2 dir
  if [ "$rev" = "worktree" ]; then
    cat src/store/redis/scripts/grant.lua src/store/redis/scripts/shared.lua \
      src/store/redis/scripts/ops.lua > "$out"
    return
  fi
  for dir in src/store/redis/scripts src/store/scripts; do
    if git cat-file -e "$rev:$dir/ops.lua" 2>/dev/null; then
      : > "$out"
      for f in grant shared ops; do
        git show "$rev:$dir/$f.lua" >> "$out" 2>/dev/null || true
      done
      return
    fi
  done
  echo "no scripts at $rev" >&2
  exit 1
}

revs=("$@")
[ ${#revs[@]} -eq 0 ] && revs=(worktree)
for rev in "${revs[@]}"; do
  prelude "$rev" "$work/$rev.pre"
  cat "$work/$rev.pre" "$work/loop.lua" > "$work/$rev.lua"
done

port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --busy-reply-threshold 600000 --daemonize yes --pidfile "$work/redis.pid" >/dev/null
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.05
done
for round in 1 2 3; do
  for rev in "${revs[@]}"; do
    redis-cli -p "$port" flushall >/dev/null
    t0=$(date +%s%N)
    redis-cli -p "$port" eval "$(cat "$work/$rev.lua")" 0 "$CYCLES" "$KEYS" "r$round" >/dev/null
    t1=$(date +%s%N)
    python3 -c 'import sys; print(f"{sys.argv[1]:<12} round {sys.argv[2]}: {(int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5]) / 1000:6.2f} us per Acquire + Release")' \
      "$rev" "$round" "$t0" "$t1" "$CYCLES"
  done
done
