//! What the client-belief tests share (issue 22): a rival that waits for
//! the lock and records when it is granted, and the delay/freeze proxy.

#![allow(dead_code)]

#[path = "../faults/proxy.rs"]
pub mod proxy;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leasehold::client::Client;
use tokio::task::JoinHandle;

use crate::common::TestServer;

pub async fn connect(endpoint: String) -> Client {
    Client::builder()
        .endpoints(endpoint)
        .retry_for(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect")
}

/// Waits (forever, bounded by the caller) for `key` over a direct
/// connection; returns when its Acquire reply came, on both clocks.
pub async fn rival(endpoint: String, key: &str) -> JoinHandle<(Instant, SystemTime)> {
    let client = connect(endpoint).await;
    let key = key.to_string();
    tokio::spawn(async move {
        let lease = client
            .lock(key)
            .ttl(Duration::from_secs(30))
            .lease()
            .await
            .expect("the rival is granted");
        assert!(lease.fencing_token > 0);
        (Instant::now(), SystemTime::now())
    })
}

/// Waits until `n` Acquires wait on the server (a real signal, polled).
pub async fn waiting(server: &TestServer, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while server.waiters.len() < n {
        assert!(Instant::now() < end, "{n} waiters never showed up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The gap from `a` to `b` in ms, negative if `b` is earlier.
pub fn gap(a: Instant, b: Instant) -> f64 {
    if b >= a { ms(b - a) } else { -ms(a - b) }
}

/// Nanoseconds since the epoch (for comparing with what child processes
/// stamp with the wall clock).
pub fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos()
}
