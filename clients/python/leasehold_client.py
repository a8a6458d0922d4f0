"""A small Python client for Leasehold, on stubs generated from the proto.

    client = LeaseholdClient("127.0.0.1:50051")
    lease = client.acquire("reports/nightly", ttl_ms=10_000, wait_ms=5_000)
    if lease is not None:
        with client.keepalive() as keepalive:   # one stream for all your locks
            keepalive.attach(lease)             # renewed every ttl/3 from now on
            do_work(fencing_token=lease.fencing_token)
        # Leaving the block ends the stream; the server has released the lock.

Ending the KeepAlive stream is how a client gives back every lock it holds: the
server releases each lock still attached to a stream when the client ends the
stream, cancels it, or its connection dies (process killed, host gone). When
the *server* ends the stream (graceful shutdown of that server) it releases
nothing, and this client re-attaches its locks on a new stream, which reaches
another server through the same address, within their TTL.

Pass `lease.fencing_token` to the resource you protect and have it reject
smaller ones (documentation/semantics.md). The lock `token` is the only proof
of ownership: this module never prints or logs it.

The stubs come from `python3 clients/python/generate.py`; they are looked for
in $LEASEHOLD_PY_STUBS, or else in clients/python/generated/.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import grpc

_STUBS = os.environ.get("LEASEHOLD_PY_STUBS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "generated"
)
if _STUBS not in sys.path:
    sys.path.insert(0, _STUBS)
try:
    from leasehold.v1 import lock_pb2, lock_pb2_grpc  # noqa: E402
except ImportError as e:  # pragma: no cover - a setup error, said plainly
    raise ImportError(
        f"Leasehold stubs not found in {_STUBS} ({e}); generate them with: "
        "python3 clients/python/generate.py"
    ) from e

__all__ = ["Lease", "LeaseholdClient", "KeepAlive", "lock_pb2"]

log = logging.getLogger("leasehold")


@dataclass(frozen=True)
class Lease:
    """A granted lock. `token` proves ownership and is kept out of repr()."""

    key: str
    token: str = field(repr=False)
    fencing_token: int
    ttl_ms: int


class LeaseholdClient:
    """Unary calls plus KeepAlive streams over one gRPC channel."""

    def __init__(self, address: str, channel: Optional[grpc.Channel] = None):
        # Reconnect quickly after a server goes away, so a KeepAlive stream
        # re-attaches its locks well within their TTL (gRPC's default first
        # reconnect backoff is 1 s, growing to 2 min).
        self.channel = channel or grpc.insecure_channel(
            address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.stub = lock_pb2_grpc.LockServiceStub(self.channel)

    def __enter__(self) -> "LeaseholdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def acquire(
        self,
        key: str,
        *,
        ttl_ms: int = 0,
        wait_ms: int = 0,
        owner: str = "",
        metadata: Optional[Dict[str, str]] = None,
        request_id: str = "",
        timeout: Optional[float] = None,
    ) -> Optional[Lease]:
        """Takes the lock, waiting up to `wait_ms` in the server; None if busy.

        `timeout` (seconds) is the gRPC deadline; by default it leaves the
        server-side wait room to finish. Contention is not an error; anything
        else (INVALID_ARGUMENT, UNAVAILABLE, ...) raises grpc.RpcError.
        """
        if timeout is None:
            timeout = wait_ms / 1000 + 10
        reply = self.stub.Acquire(
            lock_pb2.AcquireRequest(
                key=key,
                ttl_ms=ttl_ms,
                wait_ms=wait_ms,
                owner=owner,
                metadata=metadata or {},
                request_id=request_id,
            ),
            timeout=timeout,
        )
        if not reply.acquired:
            return None
        lease = reply.lease
        return Lease(lease.key, lease.token, lease.fencing_token, lease.ttl_ms)

    def release(self, lease: Lease, timeout: float = 10) -> bool:
        """Gives the lock back; False if this lease no longer held it."""
        reply = self.stub.Release(
            lock_pb2.ReleaseRequest(key=lease.key, token=lease.token), timeout=timeout
        )
        return reply.released

    def renew(self, lease: Lease, ttl_ms: int = 0, timeout: float = 10) -> bool:
        """Extends the TTL once (for code that cannot keep a stream open)."""
        reply = self.stub.Renew(
            lock_pb2.RenewRequest(key=lease.key, token=lease.token, ttl_ms=ttl_ms),
            timeout=timeout,
        )
        return reply.renewed

    def describe(self, key: str, timeout: float = 10):
        """Who holds `key` now (a DescribeResponse; never the token)."""
        return self.stub.Describe(lock_pb2.DescribeRequest(key=key), timeout=timeout)

    def keepalive(
        self, on_lost: Optional[Callable[[str], None]] = None
    ) -> "KeepAlive":
        """Opens one KeepAlive stream; attach leases to it to keep them alive."""
        return KeepAlive(self.stub, on_lost)


class KeepAlive:
    """One KeepAlive stream that renews every attached lock every TTL/3.

    `close()` (or leaving a `with` block) half-closes the stream and waits
    until the server ended it, which it does after releasing every attached
    lock. If the server ends the stream with an error (say it is shutting
    down), the locks are still held until their TTL: a new stream is opened
    and every lock re-attached. A lock the server reports lost (expired or
    taken) is detached and `on_lost(key)` is called.
    """

    _STOP = object()

    def __init__(self, stub, on_lost: Optional[Callable[[str], None]] = None):
        self._stub = stub
        self._on_lost = on_lost
        self._mutex = threading.Lock()
        self._leases: Dict[str, Lease] = {}
        self._next_renewal: Dict[str, float] = {}
        self._lost: set = set()
        self._closing = threading.Event()
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._outbox: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, name="leasehold-keepalive", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> "KeepAlive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach(self, lease: Lease) -> None:
        """Keeps `lease` alive on this stream from now on (renews it at once)."""
        with self._mutex:
            self._leases[lease.key] = lease
            self._next_renewal[lease.key] = 0.0
            self._lost.discard(lease.key)
        self._wake.set()

    def release(self, lease: Lease) -> None:
        """Releases one lock over the stream and detaches it."""
        with self._mutex:
            self._leases.pop(lease.key, None)
            self._next_renewal.pop(lease.key, None)
        self._outbox.put(
            lock_pb2.KeepAliveRequest(key=lease.key, token=lease.token, release=True)
        )

    def is_alive(self, key: str) -> bool:
        """True while `key` is attached and the server has not reported it lost."""
        with self._mutex:
            return key in self._leases and key not in self._lost

    def close(self, timeout: float = 10) -> bool:
        """Ends the stream; the server releases every lock still attached.

        Returns True once the server has ended the stream (so the releases
        are done), False if that did not happen within `timeout` seconds.
        """
        self._closing.set()
        self._outbox.put(self._STOP)
        self._wake.set()
        return self._closed.wait(timeout)

    # The stream: one thread sends requests from the outbox (via the request
    # iterator grpc consumes) and reads responses; renewals are queued by the
    # same thread between reads, on a timer.

    def _requests(self, outbox: "queue.Queue"):
        while True:
            item = outbox.get()
            if item is self._STOP:
                return  # half-close
            yield item

    def _run(self) -> None:
        backoff = 0.05
        try:
            while not self._closing.is_set():
                outbox = self._outbox
                with self._mutex:
                    for key in self._leases:
                        self._next_renewal[key] = 0.0  # re-attach on a new stream
                call = self._stub.KeepAlive(self._requests(outbox))
                renewer = threading.Thread(
                    target=self._renew_loop, args=(outbox, call), daemon=True
                )
                renewer.start()
                try:
                    for reply in call:
                        backoff = 0.05
                        self._handle(reply)
                    return  # the server ended the stream after our half-close
                except grpc.RpcError as e:
                    if self._closing.is_set():
                        return
                    # Server-side end (shutdown, store error): locks are kept
                    # until their TTL, so reconnect and re-attach them.
                    log.warning(
                        "keepalive stream ended by the server (%s); re-attaching",
                        e.code().name,
                    )
                    self._outbox = queue.Queue()
                    outbox.put(self._STOP)
                    self._wake.set()
                    renewer.join()
                    self._closing.wait(backoff)
                    backoff = min(backoff * 2, 0.5)
        finally:
            self._closed.set()
            self._wake.set()

    def _renew_loop(self, outbox: "queue.Queue", call) -> None:
        while not self._closing.is_set() and outbox is self._outbox and call.is_active():
            self._wake.clear()  # before looking, so no attach() goes unseen
            now = time.monotonic()
            due = []
            with self._mutex:
                for key, lease in self._leases.items():
                    if key not in self._lost and self._next_renewal.get(key, 0) <= now:
                        due.append(lease)
                        self._next_renewal[key] = now + max(lease.ttl_ms, 30) / 3000
                soonest = min(self._next_renewal.values(), default=now + 1)
            for lease in due:
                outbox.put(lock_pb2.KeepAliveRequest(key=lease.key, token=lease.token))
            self._wake.wait(max(0.0, min(soonest - time.monotonic(), 1.0)))

    def _handle(self, reply) -> None:
        if reply.alive:
            with self._mutex:
                lease = self._leases.get(reply.key)
                if lease is not None and reply.ttl_ms and reply.ttl_ms != lease.ttl_ms:
                    self._leases[reply.key] = Lease(
                        lease.key, lease.token, lease.fencing_token, reply.ttl_ms
                    )
            return
        with self._mutex:
            attached = reply.key in self._leases
            if attached:
                self._lost.add(reply.key)
                self._leases.pop(reply.key, None)
                self._next_renewal.pop(reply.key, None)
        if attached and self._on_lost is not None:
            self._on_lost(reply.key)
