#!/bin/bash
# What one exclusive Acquire + Release cycle costs inside Redis, per command:
# INFO commandstats and redis-server's CPU over one `bench cycles` run
# (64 workers, 3 s) against BINARY's server on a fresh redis-server.
# Cycles are counted as HSETs (one per grant).
#
# usage: documentation/tools/redis-cmdstats.sh BINARY [SERVER ARG...]
# Environment: CLIENT, the binary whose `bench cycles` loads the server
# (default BINARY), so that several servers can share one load generator.
# Loopback only.
set -euo pipefail
bin=$1
shift
client=${CLIENT:-$bin}
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rport=$(free_port)
lport=$(free_port)
dir=$(mktemp -d)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize yes --pidfile "$dir/redis.pid" >/dev/null
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
"$bin" serve --listen "127.0.0.1:$lport" --redis-url "redis://127.0.0.1:$rport" "$@" >"$dir/server.log" 2>&1 &
spid=$!
trap 'kill $spid 2>/dev/null; redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
for _ in $(seq 200); do grep -q SERVING "$dir/server.log" && break; sleep 0.05; done
redis-cli -p "$rport" config resetstat >/dev/null
cpu0=$(redis-cli -p "$rport" info cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {print s}')
"$client" bench cycles --endpoint "http://127.0.0.1:$lport" --duration 3s --json >/dev/null 2>&1
cpu1=$(redis-cli -p "$rport" info cpu | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {print s}')
redis-cli -p "$rport" info commandstats | tr -d '\r' | python3 -c '
import re, sys
cpu = float(sys.argv[1]) - float(sys.argv[2])
rows = {}
for line in sys.stdin:
    m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line)
    if m:
        rows[m.group(1)] = (int(m.group(2)), int(m.group(3)))
n = rows.get("hset", (0, 0))[0]
if n == 0:
    sys.exit("no cycles counted")
print(f"cycles {n}: redis-server CPU {cpu * 1e6 / n:.2f} us per cycle")
for name, (calls, usec) in sorted(rows.items(), key=lambda r: -r[1][1]):
    print(f"  {name:16} {calls / n:5.2f} calls per cycle  {usec / calls:6.2f} us per call  {usec / n:6.2f} us per cycle")
' "$cpu1" "$cpu0"
