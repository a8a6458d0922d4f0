//! Prometheus metrics (`--metrics-listen`, `/metrics`).
//!
//! Names and labels are fixed and few: no lock key, owner or token ever
//! becomes a label, so cardinality stays constant whatever clients send.
//! Without `--metrics-listen` no recorder is installed and every call here
//! is a no-op. documentation/metrics.md lists every series.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::LocalKey;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Whether the exporter is installed. Without it every per-call function
/// here returns at once: the `metrics` macros build a key (label vector
/// and all) even for the no-op recorder, which came to about 3 700
/// instructions of an Acquire + Release cycle (callgrind, memory store).
static ON: AtomicBool = AtomicBool::new(false);

fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Two `&'static str` labels, told apart by address: every caller passes
/// literals, so a cache keyed on them stays as small as the set of
/// literals, and two copies of one literal just share a series.
type Labels = (&'static str, &'static str);

/// Per worker thread, the handles of one labelled family already resolved.
type Handles<T> = RefCell<Vec<(Labels, T)>>;

thread_local! {
    static RPC: Handles<(Counter, Histogram)> = const { RefCell::new(Vec::new()) };
    static STORE_CALL: Handles<Histogram> = const { RefCell::new(Vec::new()) };
    static ACQUIRE_OUTCOME: Handles<Counter> = const { RefCell::new(Vec::new()) };
}

/// Runs `use_it` on the handles for `labels`, resolving them with `make`
/// the first time this thread sees those labels. The exporter's own lookup
/// (build the key, hash it, read its map) costs several times the atomic
/// add it leads to, on every call of the hottest series.
fn with_handles<T>(
    cache: &'static LocalKey<Handles<T>>,
    labels: Labels,
    make: impl Fn() -> T,
    use_it: impl Fn(&T),
) {
    let same = |(a, b): &Labels| std::ptr::eq(*a, labels.0) && std::ptr::eq(*b, labels.1);
    let cached = cache.try_with(|handles| {
        let mut handles = handles.borrow_mut();
        match handles.iter().find(|(l, _)| same(l)) {
            Some((_, found)) => use_it(found),
            None => {
                let made = make();
                use_it(&made);
                handles.push((labels, made));
            }
        }
    });
    // A value recorded while this thread's locals are being torn down (a
    // guard dropped at runtime shutdown, say) goes through the registry.
    if cached.is_err() {
        use_it(&make());
    }
}

/// Latency buckets in seconds: 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Starts the Prometheus exporter on `addr` (HTTP, path `/metrics`) and
/// describes every series. Must run inside the tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("leasehold_acquire_wait_seconds".into()),
            WAIT_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("leasehold_lock_hold_seconds".into()),
            WAIT_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    ON.store(true, Ordering::Relaxed);
    describe();
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "leasehold_requests_total",
        "RPCs answered, by rpc and outcome."
    );
    describe_histogram!(
        "leasehold_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an RPC (KeepAlive: per request on the stream), by rpc."
    );
    describe_gauge!("leasehold_keepalive_streams", "Open KeepAlive streams.");
    describe_gauge!(
        "leasehold_attached_locks",
        "Locks attached to open KeepAlive streams."
    );
    describe_gauge!("leasehold_waiters", "Acquire calls waiting in this server.");
    describe_gauge!("leasehold_watch_streams", "Open Watch streams.");
    describe_counter!(
        "leasehold_acquires_total",
        "Acquire calls by outcome: immediate (the first try took the lock), after_wait, held (wait 0, lock busy), timed_out, cancelled (the client went away while waiting)."
    );
    describe_histogram!(
        "leasehold_acquire_wait_seconds",
        Unit::Seconds,
        "How long Acquire calls that asked to wait waited, by outcome (immediate, after_wait, timed_out, cancelled)."
    );
    describe_histogram!(
        "leasehold_lock_hold_seconds",
        Unit::Seconds,
        "How long a lock was held when its holder released it (from its fencing token, the grant's time in µs)."
    );
    describe_counter!(
        "leasehold_renewals_total",
        "KeepAlive renewals, by result (alive, lost)."
    );
    describe_counter!(
        "leasehold_stream_end_releases_total",
        "Locks released because their KeepAlive stream ended, by result (released, not_held, error)."
    );
    describe_counter!(
        "leasehold_expiries_total",
        "Leases seen expired: renewals that found the lock gone, and (memory store) leases swept at their TTL."
    );
    describe_counter!(
        "leasehold_force_releases_total",
        "ForceRelease calls answered, by result (released, not_held)."
    );
    describe_counter!(
        "leasehold_store_errors_total",
        "Failed store calls, by kind."
    );
    describe_histogram!(
        "leasehold_store_call_duration_seconds",
        Unit::Seconds,
        "Time of one store call (one Redis round trip), by op and store."
    );
}

/// One answered RPC.
pub fn rpc(rpc: &'static str, outcome: &'static str, latency: Duration) {
    if !on() {
        return;
    }
    with_handles(
        &RPC,
        (rpc, outcome),
        || {
            (
                counter!("leasehold_requests_total", "rpc" => rpc, "outcome" => outcome),
                histogram!("leasehold_request_duration_seconds", "rpc" => rpc),
            )
        },
        |(calls, duration)| {
            calls.increment(1);
            duration.record(latency.as_secs_f64());
        },
    );
}

/// One store call.
pub fn store_call(
    store: &'static str,
    op: &'static str,
    latency: Duration,
    error: Option<&'static str>,
) {
    if !on() {
        return;
    }
    with_handles(
        &STORE_CALL,
        (store, op),
        || histogram!("leasehold_store_call_duration_seconds", "store" => store, "op" => op),
        |duration| duration.record(latency.as_secs_f64()),
    );
    if let Some(kind) = error {
        counter!("leasehold_store_errors_total", "store" => store, "kind" => kind).increment(1);
    }
}

/// A KeepAlive stream opened (+1) or closed (-1).
pub fn streams(delta: f64) {
    gauge!("leasehold_keepalive_streams").increment(delta);
}

/// Locks attached to streams changed by `delta`.
pub fn attached(delta: f64) {
    gauge!("leasehold_attached_locks").increment(delta);
}

/// Waiters changed by `delta`.
pub fn waiters(delta: f64) {
    gauge!("leasehold_waiters").increment(delta);
}

/// One KeepAlive renewal: `alive` or `lost`.
pub fn renewal(alive: bool) {
    let result = if alive { "alive" } else { "lost" };
    counter!("leasehold_renewals_total", "result" => result).increment(1);
    if !alive {
        expiries(1);
    }
}

/// Leases seen expired.
pub fn expiries(n: u64) {
    counter!("leasehold_expiries_total").increment(n);
}

/// One release at the end of a stream: `released`, `not_held` or `error`.
pub fn stream_end_release(result: &'static str) {
    counter!("leasehold_stream_end_releases_total", "result" => result).increment(1);
}

/// One ForceRelease: whether it took a lock from a holder.
pub fn force_release(released: bool) {
    let result = if released { "released" } else { "not_held" };
    counter!("leasehold_force_releases_total", "result" => result).increment(1);
}

/// A Watch stream opened (+1) or ended (-1).
pub fn watches(delta: f64) {
    gauge!("leasehold_watch_streams").increment(delta);
}

/// Wait buckets in seconds: 1 ms to 5 min (waits are long, RPCs short).
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// How one Acquire ended; for a call that asked to wait, how long it did.
pub fn acquire_outcome(outcome: &'static str, waiting: bool, waited: Duration) {
    if !on() {
        return;
    }
    with_handles(
        &ACQUIRE_OUTCOME,
        (outcome, ""),
        || counter!("leasehold_acquires_total", "outcome" => outcome),
        |calls| calls.increment(1),
    );
    if waiting {
        histogram!("leasehold_acquire_wait_seconds", "outcome" => outcome)
            .record(waited.as_secs_f64());
    }
}

/// A holder released the grant fenced `fencing_token`. Fencing tokens are
/// the grant's clock in microseconds unless the key's counter ran ahead of
/// it (many grants in one microsecond, a clock step back): a hold that
/// comes out negative or over a day is such a case and is not recorded.
pub fn released_after(fencing_token: u64) {
    if !on() {
        return;
    }
    let now = crate::store::unix_micros();
    if let Some(held_us) = now
        .checked_sub(fencing_token)
        .filter(|us| *us < 86_400_000_000)
    {
        histogram!("leasehold_lock_hold_seconds").record(held_us as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static MADE: Handles<u32> = const { RefCell::new(Vec::new()) };
    }

    /// Each label pair gets its own handle, made once per thread and then
    /// reused; a second pair never gets the first one's.
    #[test]
    fn handles_are_made_once_per_label_pair() {
        let made = std::cell::Cell::new(0);
        let seen = RefCell::new(Vec::new());
        // Statics: one address each, as each literal call site has.
        static ACQUIRE: Labels = ("Acquire", "held");
        static RELEASE: Labels = ("Release", "held");
        for labels in [ACQUIRE, RELEASE, ACQUIRE] {
            with_handles(
                &MADE,
                labels,
                || {
                    made.set(made.get() + 1);
                    made.get()
                },
                |h| seen.borrow_mut().push(*h),
            );
        }
        assert_eq!(made.get(), 2);
        assert_eq!(seen.into_inner(), [1, 2, 1]);
    }
}
