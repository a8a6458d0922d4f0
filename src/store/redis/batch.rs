//! Batching on one Redis node (single node or Sentinel's primary).
//!
//! Why: each script call has a cost around Redis's own work — fred's
//! routing and encoding, one `writev` (fred flushes after every `EVALSHA`),
//! the reader's wake-up, Redis's read and write. Operations that queue
//! behind each other here are sent together as one `batch.lua` call, which
//! runs each with the same function as its own script (`ops.lua`) and
//! answers each separately. At most [`MAX_IN_FLIGHT`] batches (or single
//! calls), and no more than the pool has connections, are on the wire at
//! once; while they are, new operations gather into the next batch. With a
//! slot free and nothing queued, an operation goes out at once, alone, with
//! its own script ([`Batcher::idle`]): batching adds no wait and no work to
//! a server that is not busy.
//!
//! Measured (documentation/benchmarks.md#batching): with 30 000 renewals a
//! second, a third less server CPU and the renewal p99 from 22 to 8 ms; no
//! change this machine can resolve under Acquire/Release cycles.
//!
//! Not used on a Redis Cluster, where one script may only touch one slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::call::{LATE_REPLY_LIMIT, evalsha, routed};
use super::errors::{map_error, op_result};
use super::route::Route;
use crate::lock::LockError;
use crate::task::{self, TaskGuard};

/// Called with the reply of an Acquire whose caller stopped waiting for it
/// (`None`: the call failed, the outcome is unknown), to release a grant
/// that nobody will ever use.
pub(super) type Undo = Box<dyn FnOnce(Option<Value>) + Send>;

/// One of the operations `batch.lua` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Acquire,
    Release,
    Renew,
}

impl Op {
    fn letter(self) -> &'static str {
        match self {
            Op::Acquire => "A",
            Op::Release => "R",
            Op::Renew => "N",
        }
    }
}

struct Queued {
    op: Op,
    keys: Vec<String>,
    args: Vec<String>,
    reply: oneshot::Sender<Result<Value, LockError>>,
    undo: Option<Undo>,
}

/// Most batches on the wire at once, whatever the pool size. Two keep Redis
/// busy: it runs one while the other's reply travels back and the next
/// gathers. More only cut the same queue into smaller batches, and each
/// script call costs Redis about 5 µs around the operations it runs (read,
/// parse, script set-up, reply, write). Measured under `bench cycles`
/// (64 workers) with a pool of 4 (documentation/benchmarks.md, "Two
/// batches in flight"): 0.33 → 0.18 `EVALSHA` per cycle, redis-server CPU
/// per cycle 24.3 → 22.6 µs over 8 alternated runs. A Redis further away
/// (a round trip near a batch's own run time, about 1 ms at 64 operations)
/// would want more. The limit is on batches, not connections: every call,
/// batched or not, still takes the pool's connections in turn.
const MAX_IN_FLIGHT: usize = 2;

/// How many batches may be on the wire with a pool of `pool_size`
/// connections: one per connection, at most [`MAX_IN_FLIGHT`], at least one.
fn in_flight(pool_size: usize) -> usize {
    pool_size.clamp(1, MAX_IN_FLIGHT)
}

/// The queue operations wait in, and the task that sends them.
pub(super) struct Batcher {
    tx: mpsc::UnboundedSender<Queued>,
    /// One permit per batch allowed on the wire: a batch, or a call sent
    /// alone, holds one while it is on the wire.
    slots: Arc<Semaphore>,
    /// Operations in the queue, not yet taken into a batch.
    queued: Arc<AtomicUsize>,
    _task: TaskGuard,
}

impl Batcher {
    /// Starts the sending task. `pool_size` is the pool's connections: at
    /// most one batch per connection, and [`MAX_IN_FLIGHT`] in all, at a
    /// time. `max` bounds a batch: it runs for about 15 µs per operation
    /// inside Redis, which serves no one else meanwhile.
    pub(super) fn start(
        route: Arc<Route>,
        script: Script,
        timeout: Duration,
        pool_size: usize,
        max: usize,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(in_flight(pool_size)));
        let queued = Arc::new(AtomicUsize::new(0));
        let task = task::spawn(
            "redis-batcher",
            gather(
                rx,
                route,
                script,
                timeout,
                slots.clone(),
                queued.clone(),
                max.max(1),
            ),
        );
        Self {
            tx,
            slots,
            queued,
            _task: task,
        }
    }

    /// A free connection slot when nothing is queued: the caller then sends
    /// its operation alone, with its own script, from its own task (the
    /// usual case on a server that is not busy, where a trip through the
    /// batching task would only add two task hops). Held until the call
    /// ends, so calls that come meanwhile queue up for a batch.
    pub(super) fn idle(&self) -> Option<OwnedSemaphorePermit> {
        if self.queued.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Runs `op` (its keys and arguments as its own script takes them, less
    /// any trailing `min_replicas`) in the next batch, and waits at most
    /// `timeout` for its reply. An Acquire passes `undo`, run if its reply
    /// comes too late for this caller.
    pub(super) async fn call(
        &self,
        op: Op,
        keys: Vec<String>,
        args: Vec<String>,
        undo: Option<Undo>,
        timeout: Duration,
    ) -> Result<Value, LockError> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.send(Queued {
            op,
            keys,
            args,
            reply,
            undo,
        });
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(LockError::Unavailable(
                "the Redis store is shutting down".into(),
            ));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LockError::Unavailable(
                "the Redis store is shutting down".into(),
            )),
            Err(_) => Err(LockError::Unavailable(format!(
                "no reply from Redis within {timeout:?}"
            ))),
        }
    }
}

/// Takes what is queued, up to `max`, each time a connection is free for
/// it.
async fn gather(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    route: Arc<Route>,
    script: Script,
    timeout: Duration,
    slots: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    max: usize,
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max);
        let mut next = Some(first);
        while let Some(op) = next {
            queued.fetch_sub(1, Ordering::AcqRel);
            // An Acquire whose caller already gave up is not sent at all.
            if !(op.op == Op::Acquire && op.reply.is_closed()) {
                batch.push(op);
            }
            next = if batch.len() < max {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if batch.is_empty() {
            continue;
        }
        let (route, script) = (route.clone(), script.clone());
        tokio::spawn(async move {
            send(&route, &script, batch, timeout, permit).await;
        });
    }
}

/// Sends one batch and hands each operation its reply. The connection slot
/// is given back after `timeout` even if Redis has not answered; the reply
/// is still awaited (within [`LATE_REPLY_LIMIT`]) so that late grants are
/// undone.
async fn send(
    route: &Route,
    script: &Script,
    mut batch: Vec<Queued>,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) {
    let (client, left) = match routed(route, 0, timeout).await {
        Ok(found) => found,
        Err(e) => {
            // Nothing was sent: nothing to undo.
            for queued in batch {
                let _ = queued.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let keys: usize = batch.iter().map(|q| q.keys.len()).sum();
    let args: usize = batch.iter().map(|q| 1 + q.args.len()).sum();
    let mut argv = Vec::with_capacity(2 + keys + args);
    argv.push(Value::String(script.sha1().clone()));
    argv.push(Value::Integer(keys as i64));
    for queued in &mut batch {
        argv.extend(queued.keys.drain(..).map(Value::from));
    }
    for queued in &mut batch {
        argv.push(Value::from_static_str(queued.op.letter()));
        argv.extend(queued.args.drain(..).map(Value::from));
    }
    let mut call = Box::pin(evalsha(&client, script, argv));
    let result = match tokio::time::timeout(left, &mut call).await {
        Ok(result) => result,
        Err(_) => {
            drop(permit);
            match tokio::time::timeout(LATE_REPLY_LIMIT, call).await {
                Ok(result) => result,
                Err(_) => Err(Error::new(ErrorKind::Timeout, "no reply")),
            }
        }
    };
    match result {
        Ok(Value::Array(replies)) if replies.len() == batch.len() => {
            for (queued, reply) in batch.into_iter().zip(replies) {
                if let Err(Ok(reply)) = queued.reply.send(op_result(reply)) {
                    if let Some(undo) = queued.undo {
                        undo(Some(reply));
                    }
                }
            }
        }
        Ok(_) => {
            for queued in batch {
                let _ = queued
                    .reply
                    .send(Err(LockError::Internal("malformed batch reply".into())));
            }
        }
        Err(e) => {
            // The batch may have run (a connection lost after the send):
            // each caller gets an ambiguous error, and an Acquire's caller
            // gives its token back (`LockStore::acquire`).
            let error = map_error(&e);
            for queued in batch {
                let _ = queued.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_in_flight_follow_the_pool_up_to_two() {
        let by_pool: Vec<usize> = [0, 1, 2, 3, 4, 16].into_iter().map(in_flight).collect();
        assert_eq!(by_pool, [1, 1, 2, 2, 2, 2]);
    }
}
