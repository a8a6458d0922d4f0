#!/bin/bash
# Two server binaries under one load generator, alternated: the exclusive
# Acquire + Release cycle on the memory store and on Redis, with the CPU
# each cycle costs the server, redis-server and the load generator.
# `bench cycles --spawn` of two binaries would compare two load generators
# as well; here the same `leasehold bench cycles` (the first binary given
# as CLIENT) loads both servers, each on a fresh redis-server.
#
# usage: documentation/tools/ab-servers.sh ROUNDS CLIENT SERVER...
#   e.g. documentation/tools/ab-servers.sh 6 target/release/leasehold \
#          /tmp/leasehold-4f3d909 target/release/leasehold
# Environment: WORKERS (64), DURATION (4s), STORES ("redis memory").
# Loopback only; prints each run, then the median of each figure per store
# and server.
#
# The order of the servers turns by one each round, so with ROUNDS a
# multiple of their number each runs as often in each place: four copies
# of one binary, always in the same order, measured the last one slower
# than the first in 5 rounds of 5 (by 1.8 % in the median), which a fixed
# order would have charged to whichever server came last.
set -euo pipefail
rounds=$1 client=$2
shift 2
WORKERS=${WORKERS:-64}
DURATION=${DURATION:-4s}
out=$(mktemp)
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run STORE SERVER: one measurement, one line.
run() {
  local store=$1 server=$2 dir rport lport spid rpid
  dir=$(mktemp -d)
  rport=$(free_port)
  lport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" >/dev/null
  for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  rpid=$(cat "$dir/redis.pid")
  if [ "$store" = redis ]; then
    "$server" serve --listen "127.0.0.1:$lport" --redis-url "redis://127.0.0.1:$rport" >"$dir/server.log" 2>&1 &
  else
    "$server" serve --listen "127.0.0.1:$lport" >"$dir/server.log" 2>&1 &
  fi
  spid=$!
  for _ in $(seq 200); do grep -q SERVING "$dir/server.log" && break; sleep 0.05; done
  local s0 r0 s1 r1
  s0=$(cpu_ticks "$spid"); r0=$(cpu_ticks "$rpid")
  /usr/bin/time -f "%U %S" -o "$dir/time" "$client" bench cycles --endpoint "http://127.0.0.1:$lport" \
    --duration "$DURATION" --workers "$WORKERS" --json >"$dir/bench.json" 2>/dev/null
  s1=$(cpu_ticks "$spid"); r1=$(cpu_ticks "$rpid")
  kill "$spid"; wait "$spid" 2>/dev/null || true
  redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true
  # The next run starts once this redis-server has gone (freeing a large
  # keyspace takes a moment), not beside it.
  for _ in $(seq 100); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.05; done
  python3 - "$store" "$(basename "$server")" "$s0" "$s1" "$r0" "$r1" "$dir/bench.json" "$dir/time" <<'PY'
import json, os, sys
store, name = sys.argv[1], sys.argv[2]
s0, s1, r0, r1 = map(int, sys.argv[3:7])
row = json.load(open(sys.argv[7]))["rows"][0]
n = row["acquire"]["count"]
user, system = map(float, open(sys.argv[8]).read().split()[-2:])
tick = 1e6 / os.sysconf("SC_CLK_TCK")
server, redis, load = (s1 - s0) * tick / n, (r1 - r0) * tick / n, (user + system) * 1e6 / n
print(f"{store} {name} cycles/s={row['cycles_per_s']:.0f} server_us={server:.1f} redis_us={redis:.1f} "
      f"load_us={load:.1f} total_us={server + redis + load:.1f} acquire_p50_ms={row['acquire']['p50_ms']}")
PY
  rm -rf "$dir"
}

servers=("$@")
for round in $(seq 0 $((rounds - 1))); do
  for store in ${STORES:-redis memory}; do
    for i in $(seq 0 $((${#servers[@]} - 1))); do
      run "$store" "${servers[$(((i + round) % ${#servers[@]}))]}" | tee -a "$out"
    done
  done
done
echo "medians:"
python3 - "$out" <<'PY'
import collections, re, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    store, name, *_ = line.split()
    runs[(store, name)].append({k: float(v) for k, v in re.findall(r"(\S+)=([\d.]+)", line)})
for (store, name), rs in runs.items():
    print(store, name, " ".join(f"{k}={statistics.median(r[k] for r in rs):g}" for k in rs[0]))
PY
rm -f "$out"
