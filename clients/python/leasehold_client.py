"""A small Python client for Leasehold, on stubs generated from the proto.

    client = LeaseholdClient("127.0.0.1:50051")
    lease = client.acquire("reports/nightly", ttl_ms=10_000, wait_ms=5_000)
    if lease is not None:
        with client.keepalive() as keepalive:   # one stream for all your locks
            if keepalive.attach(lease):         # answered: renewed every ttl/3
                do_work(fencing_token=lease.fencing_token)
        # Leaving the block ends the stream; the server has released the lock.

Ending the KeepAlive stream is how a client gives back every lock it holds: the
server releases each lock still attached to a stream when the client ends the
stream, cancels it, or its connection dies (process killed, host gone). When
the *server* ends the stream (graceful shutdown of that server) it releases
nothing, and this client re-attaches its locks on a new stream, which reaches
another server through the same address, within their TTL.

What this client believes is never more than the server does: a lock counts
as held until (send time of the last renewal answered alive) + TTL, or, for
a fresh grant, (send time of the Acquire) + `valid_for_ms` — on the boot
clock, which counts a host suspend — and `is_alive()` turns False, and
`on_lost` is called, at that instant unless a renewal came back first.

Pass `lease.fencing_token` to the resource you protect and have it reject
smaller ones (documentation/semantics.md). The lock `token` is the only proof
of ownership: this module never prints or logs it.

The stubs come from `python3 clients/python/generate.py`; they are looked for
in $LEASEHOLD_PY_STUBS, or else in clients/python/generated/.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Optional, Tuple

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

__all__ = ["Lease", "LeaseholdClient", "KeepAlive", "Watch", "lock_pb2"]

log = logging.getLogger("leasehold")


def _now() -> float:
    """Seconds on the boot clock: unlike time.monotonic() it goes on counting
    while the host is suspended, as the server's TTL does."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


# How long a blocked wait sleeps before looking at the boot clock again.
_RECHECK = 0.25
# How long before a lease's deadline belief ends (at most a tenth of the
# TTL): room for a late timer or a busy process.
_LOST_MARGIN = 0.05


@dataclass(frozen=True)
class Lease:
    """A granted lock. `token` proves ownership and is kept out of repr().

    `valid_until` (boot clock, seconds) is when the lease is sure to be
    valid until unless renewed, when known: the Acquire's send time plus the
    server's `valid_for_ms`, or plus `ttl_ms` for an Acquire that did not
    wait (from a server that does not send `valid_for_ms`). None: not known
    (a waiting Acquire answered by such a server); the lease is trusted only
    once its attach to a KeepAlive stream is answered. `gone_by`: when it
    is surely gone unless renewed (the reply's arrival plus the TTL).
    `shared`: one of the holders of a SHARED lock (a semaphore permit or a
    read lock), which other leases of the same key may hold beside it.
    """

    key: str
    token: str = field(repr=False)
    fencing_token: int
    ttl_ms: int
    valid_until: Optional[float] = field(default=None, repr=False, compare=False)
    gone_by: Optional[float] = field(default=None, repr=False, compare=False)
    shared: bool = field(default=False, compare=False)


class LeaseholdClient:
    """Unary calls plus KeepAlive streams over one gRPC channel."""

    def __init__(self, address: str, channel: Optional[grpc.Channel] = None):
        # Reconnect quickly after a server goes away, so a KeepAlive stream
        # re-attaches its locks well within their TTL (gRPC's default first
        # reconnect backoff is 1 s, growing to 2 min); HTTP/2 pings notice a
        # dead connection even while nothing is sent.
        self.channel = channel or grpc.insecure_channel(
            address,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
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
        shared: bool = False,
        shared_limit: int = 0,
    ) -> Optional[Lease]:
        """Takes the lock, waiting up to `wait_ms` in the server; None if busy.

        `shared=True` takes it SHARED: a read lock beside other readers, or,
        with `shared_limit` N > 0, one of at most N permits (a semaphore; see
        `semaphore()`). The first holder sets the mode and the limit; asking
        with another limit raises FAILED_PRECONDITION naming both.

        `timeout` (seconds) is the gRPC deadline; by default it leaves the
        server-side wait room to finish. Contention is not an error; anything
        else (INVALID_ARGUMENT, UNAVAILABLE, ...) raises grpc.RpcError.
        """
        if shared_limit and not shared:
            raise ValueError("shared_limit needs shared=True (a limit on an exclusive lock means nothing)")
        if timeout is None:
            timeout = wait_ms / 1000 + 10
        sent = _now()
        reply = self.stub.Acquire(
            lock_pb2.AcquireRequest(
                key=key,
                ttl_ms=ttl_ms,
                wait_ms=wait_ms,
                owner=owner,
                metadata=metadata or {},
                request_id=request_id,
                mode=lock_pb2.LOCK_MODE_SHARED if shared else lock_pb2.LOCK_MODE_UNSPECIFIED,
                shared_limit=shared_limit,
            ),
            timeout=timeout,
        )
        replied = _now()
        if not reply.acquired:
            return None
        lease = reply.lease
        if lease.valid_for_ms > 0:
            valid_until: Optional[float] = sent + lease.valid_for_ms / 1000
        elif wait_ms == 0 and not request_id:
            valid_until = sent + lease.ttl_ms / 1000
        else:
            valid_until = None  # granted at an unknown point of the wait, or a replay
        return Lease(
            key,
            lease.token,
            lease.fencing_token,
            lease.ttl_ms,
            valid_until=valid_until,
            gone_by=replied + lease.ttl_ms / 1000,
            shared=shared,
        )

    def semaphore(self, key: str, permits: int, **kwargs) -> Optional[Lease]:
        """Takes one of `permits` permits of `key` (a SHARED lock limited to
        `permits` holders); None if all are taken. Keyword arguments are
        those of `acquire()` (ttl_ms, wait_ms, owner, ...). Keep the permit
        alive on a KeepAlive stream like any lease: when this process dies,
        its stream ends and the permit is back at once, not after its TTL."""
        if permits < 1:
            raise ValueError(f"a semaphore needs at least one permit, not {permits}")
        return self.acquire(key, shared=True, shared_limit=permits, **kwargs)

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

    def watch(self, key: str, timeout: Optional[float] = None) -> "Watch":
        """Watches `key`: iterate over the returned `Watch` for WatchEvent
        messages, the lock as it is now (KIND_STATE) first, then one event
        per grant, release, expiry or forced release, from any server.
        `timeout` (seconds) ends the watch with DEADLINE_EXCEEDED."""
        return Watch(self.stub.Watch(lock_pb2.WatchRequest(key=key), timeout=timeout))


class Watch:
    """The events of one watched lock (`LeaseholdClient.watch()`).

    Iterating yields `lock_pb2.WatchEvent`s: `kind` (KIND_STATE first, then
    KIND_ACQUIRED, KIND_RELEASED, KIND_EXPIRED, KIND_FORCE_RELEASED),
    `fencing_token` of the grant it is about, and `state`, the lock after it
    (a DescribeResponse, never a token). A watcher that reads too slowly
    gets a fresh KIND_STATE in place of what it missed. Iteration ends
    after `cancel()` (or leaving a `with` block); an error from the server
    (shutdown, DEADLINE_EXCEEDED) raises grpc.RpcError: watch again.
    """

    def __init__(self, call):
        self._call = call

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def __iter__(self):
        try:
            for event in self._call:
                yield event
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED or not self._call.cancelled():
                raise

    def cancel(self) -> None:
        """Ends the watch; iteration stops."""
        self._call.cancel()


def _stall_after(ttl_ms: int) -> float:
    """How long a renewal may go unanswered before its stream is replaced."""
    return min(max(ttl_ms / 3000, 0.5), 5.0)


class _Stream:
    """One KeepAlive call: its outbox, and what was sent on it, per key."""

    _STOP = object()

    def __init__(self, stub, ident: int):
        self.id = ident
        self.opened = _now()
        self.outbox: "queue.Queue" = queue.Queue()
        # key -> [(kind, token, send time, clean)] in order: the server
        # answers the requests of one key in order.
        self.sent: Dict[str, Deque[Tuple[str, str, float, bool]]] = {}
        # The server's leasehold-silence-release-ms (seconds), once its
        # headers arrive: how long the connection may stay silent before
        # the server may end this stream and release its locks.
        self.silence: Optional[float] = None
        self.call = stub.KeepAlive(self._requests())

    def _requests(self):
        while True:
            item = self.outbox.get()
            if item is self._STOP:
                return  # half-close
            yield item

    def send(self, key: str, token: str, kind: str, at: float, clean: bool) -> None:
        self.outbox.put(
            lock_pb2.KeepAliveRequest(key=key, token=token, release=(kind == "release"))
        )
        self.sent.setdefault(key, collections.deque()).append((kind, token, at, clean))

    def half_close(self) -> None:
        self.outbox.put(self._STOP)


class _Lock:
    """One attached lease and what this client may believe of it."""

    def __init__(self, lease: Lease, now: float):
        self.lease = lease
        self.known = lease.valid_until is not None
        gone_by = lease.gone_by if lease.gone_by is not None else now + lease.ttl_ms / 1000
        self.deadline = lease.valid_until if self.known else gone_by
        self.attached = False
        self.answered = threading.Event()
        self.next_renewal = now
        self.in_flight: Optional[float] = None
        self.old_pending = False
        self.moved = True
        # Belief also ends before the server of its latest stream may
        # release it for a silent connection (see _Stream.silence).
        self.silence_bound: Optional[float] = None

    @property
    def ttl(self) -> float:
        return self.lease.ttl_ms / 1000

    @property
    def until(self) -> float:
        """When this client stops believing it holds the lock."""
        lease = self.deadline - min(_LOST_MARGIN, self.ttl / 10)
        if self.silence_bound is None:
            return lease
        return min(lease, self.silence_bound)


class KeepAlive:
    """One KeepAlive stream that renews every attached lock every TTL/3.

    `attach(lease)` returns once the server has answered the lock's first
    renewal on the stream, so from then on the end of this process releases
    it. A lock counts as held until (send time of the last renewal answered
    alive) + TTL; when that passes, or the server answers that the lease no
    longer holds the lock, it is detached, `is_alive()` turns False and
    `on_lost(key)` is called — on a thread of its own, so it may call
    `close()`, and an exception it raises is logged and does not stop later
    reports.

    `close()` (or leaving a `with` block) half-closes the stream and waits
    until the server ended it, which it does after releasing every attached
    lock. If the server ends the stream with an error (say it is shutting
    down), the locks are still held until their TTL: a new stream is opened
    and every lock re-attached. If a renewal goes unanswered for TTL/3
    (0.5 s to 5 s), the stream is presumed stalled: every lock is re-attached
    through a new stream first, and the stalled one is cancelled only when
    no lock depends on it any more (a lock still on it is lost then).
    """

    def __init__(self, stub, on_lost: Optional[Callable[[str], None]] = None):
        self._stub = stub
        self._on_lost = on_lost
        self._mutex = threading.Lock()
        self._locks: Dict[str, _Lock] = {}
        # (key, token) -> [until, id of the stream it was sent on, or None]
        self._releasing: Dict[Tuple[str, str], list] = {}
        self._active: Optional[_Stream] = None
        self._draining: Optional[_Stream] = None
        self._next_id = 0
        self._retry_at = 0.0
        self._backoff = 0.05
        self._closing = False
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._callbacks: "queue.Queue" = queue.Queue()
        threading.Thread(
            target=self._report, name="leasehold-on-lost", daemon=True
        ).start()
        with self._mutex:
            self._open()
        self._ticker = threading.Thread(
            target=self._tick_loop, name="leasehold-keepalive", daemon=True
        )
        self._ticker.start()

    def __enter__(self) -> "KeepAlive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach(self, lease: Lease, timeout: Optional[float] = None) -> bool:
        """Keeps `lease` alive on this stream; returns once the server has
        answered its first renewal: True if it holds the lock, False if the
        lease is gone (or no answer came before its deadline, or `timeout`)."""
        now = _now()
        with self._mutex:
            if self._closing:
                raise RuntimeError("this KeepAlive is closed")
            pending = self._releasing.get((lease.key, lease.token))
            if pending is not None and pending[1] is None:
                # A release of this very lease not sent yet would undo it.
                del self._releasing[(lease.key, lease.token)]
            lock = self._locks.get(lease.key)
            if lock is None or lock.lease.token != lease.token:
                if lock is not None and lock.lease.shared and lease.shared:
                    # Both may be held (two permits): replacing would
                    # forget a live one. Replies carry only the key.
                    raise ValueError(
                        f"{lease.key} already has a lease on this stream; "
                        "keep a second permit of one key on a second keepalive()"
                    )
                if lock is not None:
                    self._lose(lease.key, "replaced by a new lease")
                lock = _Lock(lease, now)
                self._locks[lease.key] = lock
            limit = max(0.0, lock.until - now)
        self._wake.set()
        if timeout is not None:
            limit = min(limit, timeout)
        lock.answered.wait(limit)
        with self._mutex:
            return self._locks.get(lease.key) is lock and lock.attached and _now() < lock.until

    def release(self, lease: Lease) -> None:
        """Releases one lock over the stream and detaches it."""
        now = _now()
        with self._mutex:
            lock = self._locks.get(lease.key)
            if lock is not None and lock.lease.token == lease.token:
                del self._locks[lease.key]
                lock.answered.set()
            self._releasing[(lease.key, lease.token)] = [now + lease.ttl_ms / 1000, None]
        self._wake.set()

    def is_alive(self, key: str) -> bool:
        """True while `key` is attached, its deadline has not passed and the
        server has not reported it lost; False once close() was called."""
        with self._mutex:
            lock = self._locks.get(key)
            return (
                not self._closing
                and lock is not None
                and lock.attached
                and _now() < lock.until
            )

    def close(self, timeout: float = 10) -> bool:
        """Ends the stream; the server releases every lock still attached.

        Returns True once the server has ended the stream (so the releases
        are done), False if that did not happen within `timeout` seconds.
        """
        with self._mutex:
            self._closing = True
            if self._draining is not None:
                self._draining.call.cancel()
                self._draining = None
            active = self._active
            leftover = [] if active is not None else [l.lease for l in self._locks.values()]
            self._locks.clear()
        self._wake.set()
        if active is not None:
            active.half_close()
        else:
            # No stream up (reconnecting): give the locks back one by one.
            for lease in leftover:
                try:
                    self._stub.Release(
                        lock_pb2.ReleaseRequest(key=lease.key, token=lease.token),
                        timeout=min(timeout, 2),
                    )
                except grpc.RpcError:
                    pass  # it expires with its TTL
            self._closed.set()
        return self._closed.wait(timeout)

    # Threads: one ticker sends due renewals and releases, expires locks on
    # the boot clock and replaces stalled streams; one reader per stream;
    # one thread calls on_lost. All state is under _mutex.

    def _report(self) -> None:
        while True:
            key = self._callbacks.get()
            try:
                if self._on_lost is not None:
                    self._on_lost(key)
            except Exception:  # noqa: BLE001 - a user callback must not stop reporting
                log.exception("on_lost(%r) raised", key)

    def _open(self) -> None:
        stream = _Stream(self._stub, self._next_id)
        self._next_id += 1
        self._active = stream
        now = _now()
        for lock in self._locks.values():
            lock.next_renewal = now
            lock.in_flight = None
        threading.Thread(
            target=self._read, args=(stream,), name="leasehold-keepalive-reader", daemon=True
        ).start()

    def _read(self, stream: _Stream) -> None:
        error = None
        try:
            for k, v in stream.call.initial_metadata() or ():
                if k == "leasehold-silence-release-ms":
                    try:
                        stream.silence = int(v) / 1000
                    except ValueError:
                        pass
            for reply in stream.call:
                with self._mutex:
                    self._on_reply(stream, reply)
        except grpc.RpcError as e:
            error = e
        with self._mutex:
            self._on_end(stream, error)
        self._wake.set()

    def _lose(self, key: str, why: str) -> None:
        lock = self._locks.pop(key, None)
        if lock is None:
            return
        lock.answered.set()
        if lock.attached:
            log.warning("lock lost: key=%s fencing_token=%s: %s", key, lock.lease.fencing_token, why)
            self._callbacks.put(key)

    def _on_reply(self, stream: _Stream, reply) -> None:
        now = _now()
        queue_ = stream.sent.get(reply.key)
        if not queue_:
            return
        kind, token, at, clean = queue_.popleft()
        if not queue_:
            del stream.sent[reply.key]
        if kind == "release":
            self._releasing.pop((reply.key, token), None)
            return
        lock = self._locks.get(reply.key)
        if lock is None or lock.lease.token != token:
            return  # an answer about an older lease of the same key
        active = stream is self._active
        if active:
            lock.in_flight = None
        else:
            lock.old_pending = False
        if now >= lock.until:
            return  # too late: already lost on the clock
        log.debug("answer stream=%s alive=%s active=%s clean=%s", stream.id, reply.alive, active, clean)
        if not reply.alive:
            self._lose(reply.key, "the server says this lease no longer holds it")
            return
        if reply.ttl_ms:
            lock.lease = dataclasses.replace(
                lock.lease, ttl_ms=reply.ttl_ms, valid_until=None, gone_by=None
            )
        until = at + lock.ttl
        lock.deadline = max(lock.deadline, until) if lock.known else until
        lock.known = True
        lock.attached = True
        if active:
            lock.next_renewal = lock.deadline - lock.ttl * 2 / 3
            lock.moved = lock.moved or clean
            if stream.silence is not None:
                lock.silence_bound = at + stream.silence - min(_LOST_MARGIN, stream.silence / 10)
                lock.next_renewal = min(lock.next_renewal, at + stream.silence * 2 / 3)
        lock.answered.set()

    def _on_end(self, stream: _Stream, error) -> None:
        now = _now()
        if stream is self._draining:
            self._abandon_draining("it ended")
            return
        if stream is not self._active:
            return
        self._active = None
        for lock in self._locks.values():
            lock.in_flight = None
        for entry in self._releasing.values():
            if entry[1] == stream.id:
                entry[1] = None
        if self._closing:
            self._closed.set()
            return
        # Server-side end (shutdown, store error): locks are kept until
        # their TTL, so reconnect and re-attach them.
        log.warning(
            "keepalive stream ended by the server (%s); re-attaching",
            error.code().name if error is not None else "OK",
        )
        if now - stream.opened < 1.0:
            self._backoff = min(self._backoff * 2, 0.5)
        else:
            self._backoff = 0.05
        self._retry_at = now + self._backoff

    def _abandon_draining(self, why: str) -> None:
        old = self._draining
        if old is None:
            return
        self._draining = None
        for key in [k for k, l in self._locks.items() if not l.moved]:
            self._lose(key, f"left a stalled KeepAlive stream ({why}) before it moved")
        for entry in self._releasing.values():
            if entry[1] == old.id:
                entry[1] = None
        old.call.cancel()

    def _tick_loop(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()
            with self._mutex:
                now = _now()
                wake = self._tick(now)
            self._wake.wait(max(0.0, min(wake - now, _RECHECK)))

    def _tick(self, now: float) -> float:
        """One turn of the ticker; returns when it must look again."""
        for key in [k for k, l in self._locks.items() if now >= l.until]:
            lock = self._locks[key]
            self._releasing[(key, lock.lease.token)] = [now + lock.ttl, None]
            self._lose(key, "no renewal succeeded before its deadline")
        for k in [k for k, r in self._releasing.items() if r[0] <= now]:
            del self._releasing[k]
        active = self._active
        if active is not None and not self._closing:
            stalled = any(
                l.in_flight is not None and now - l.in_flight >= _stall_after(l.lease.ttl_ms)
                for l in self._locks.values()
            )
            if stalled:
                self._abandon_draining("another stream stalled")
                log.warning("keepalive stream stalled; moving its locks to a new stream")
                for lock in self._locks.values():
                    lock.old_pending = lock.in_flight is not None
                    lock.in_flight = None
                    lock.moved = False
                self._draining = active
                self._active = None
                self._retry_at = now
        if self._draining is not None and all(l.moved for l in self._locks.values()):
            old = self._draining
            self._draining = None
            for entry in self._releasing.values():
                if entry[1] == old.id:
                    entry[1] = None  # sent again on the active stream
            old.call.cancel()
        if self._closing:
            return now + 1
        if self._active is None:
            if now >= self._retry_at:
                self._open()
            else:
                return self._retry_at
        stream = self._active
        draining = self._draining is not None
        wake = now + 1
        for key, lock in self._locks.items():
            move_now = draining and not lock.moved and not lock.old_pending
            if lock.in_flight is None and (lock.next_renewal <= now or move_now):
                stream.send(key, lock.lease.token, "renew", now, not lock.old_pending)
                log.debug("renewal sent stream=%s clean=%s", stream.id, not lock.old_pending)
                lock.in_flight = now
            if lock.in_flight is not None:
                wake = min(wake, lock.in_flight + _stall_after(lock.lease.ttl_ms))
            else:
                wake = min(wake, lock.next_renewal)
            wake = min(wake, lock.until)
        for (key, token), entry in self._releasing.items():
            if entry[1] is None:
                stream.send(key, token, "release", now, False)
                entry[1] = stream.id
        return wake
