#!/usr/bin/env python3
"""Takes a Leasehold lock, keeps it alive over a KeepAlive stream while it
works, and gives it back by ending the stream.

    python3 clients/python/generate.py       # once: the stubs, from the proto
    python3 clients/python/example.py --address 127.0.0.1:50051 --key reports/nightly

It prints one line per step, for people and for tests:

    HOLDING key=reports/nightly fencing_token=1795717143474482
    WORKING step=1 fencing_token=1795717143474482
    ...
    RELEASED key=reports/nightly

SIGTERM or SIGINT stops the work early; the lock is still given back. If the
process dies outright (SIGKILL, a crash), its connection closes and the server
releases the lock all the same. Exit codes: 0 done, 3 lock busy, 4 lock lost
while working, 1 error.
"""

import argparse
import os
import signal
import socket
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from leasehold_client import LeaseholdClient  # noqa: E402


def say(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Leasehold lock example")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--key", default="reports/nightly", help="lock key")
    parser.add_argument("--ttl-ms", type=int, default=10_000, help="lock TTL; renewed every TTL/3")
    parser.add_argument("--wait-ms", type=int, default=0, help="how long to wait for a busy lock")
    parser.add_argument("--work-seconds", type=float, default=5.0, help="how long the work takes")
    parser.add_argument("--owner", default=f"{socket.gethostname()}:{os.getpid()}", help="shown by Describe")
    args = parser.parse_args()

    stop = threading.Event()
    lost = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    with LeaseholdClient(args.address) as client:
        try:
            lease = client.acquire(
                args.key,
                ttl_ms=args.ttl_ms,
                wait_ms=args.wait_ms,
                owner=args.owner,
                metadata={"client": "python-example"},
            )
        except grpc.RpcError as e:
            print(f"ERROR acquire: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
            return 1
        if lease is None:
            say(f"BUSY key={args.key}")
            return 3

        def on_lost(key: str) -> None:
            lost.set()
            stop.set()

        # Ending the stream (close) is how the lock is given back: the server
        # releases every lock attached to it, then ends the stream.
        keepalive = client.keepalive(on_lost=on_lost)
        try:
            # Returns once the server answered the attach: from here on, the
            # end of this process releases the lock.
            if not keepalive.attach(lease):
                say(f"LOST key={lease.key}")
                return 4
            say(f"HOLDING key={lease.key} fencing_token={lease.fencing_token}")
            deadline = time.monotonic() + args.work_seconds
            step = 0
            held = True
            while not stop.is_set() and time.monotonic() < deadline:
                # is_alive() turns False at the lock's own deadline, before
                # the server can give it to anyone else.
                held = keepalive.is_alive(lease.key)
                if not held:
                    break
                # The work: every write to the protected resource carries the
                # fencing token, so the resource can refuse a stale holder.
                step += 1
                say(f"WORKING step={step} fencing_token={lease.fencing_token}")
                stop.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        finally:
            ended = keepalive.close()
        if lost.is_set() or not held:
            say(f"LOST key={lease.key}")
            return 4
        if not ended:
            print("ERROR the server did not end the stream; the lock expires with its TTL", file=sys.stderr, flush=True)
            return 1
        say(f"RELEASED key={lease.key}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
