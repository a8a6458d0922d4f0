#!/usr/bin/env python3
"""How often this machine stops a thread that does nothing but sleep 100 µs.

A hiccup of the host (another VM, the hypervisor, a kernel thread) stalls every
process at once; on a lock's handoff chain it delays every queued waiter. This
prints each oversleep longer than a millisecond, then a summary.

usage: documentation/tools/stalls.py [SECONDS]   (default 30; run it on an idle machine)
"""
import sys
import time

duration = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
start = prev = time.monotonic()
stalls = []
while prev - start < duration:
    time.sleep(0.0001)
    now = time.monotonic()
    over = now - prev - 0.0001
    if over > 0.001:
        stalls.append((now - start, over))
        print(f"{now - start:9.4f} s: {over * 1e3:5.2f} ms")
    prev = now
longest = max((s for _, s in stalls), default=0.0)
print(
    f"{len(stalls)} stalls over 1 ms in {duration:.0f} s, "
    f"{sum(1 for _, s in stalls if s > 0.002)} over 2 ms, the longest {longest * 1e3:.2f} ms"
)
