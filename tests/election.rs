//! The SDK's semaphores, watches and elections against a real server on
//! every store: `client.semaphore(key, n)` never gives n + 1 permits and a
//! permit comes back when its client goes; `client.watch(key)` yields the
//! state, then the grants and releases of other clients; `client.elect`
//! makes one leader at a time, and when the leader's process goes (its
//! runtime and connection torn down, no release sent) the next candidate
//! leads at once with a higher term, which `client.observe` reports.

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use leasehold::client::{Client, Error, EventKind, Leader, WatchEvent};
use tokio_stream::StreamExt;

on_every_store!(
    semaphore_never_gives_more_than_its_permits,
    watch_yields_the_state_then_other_clients_changes,
    one_leader_and_the_next_takes_over_when_the_process_goes,
);

async fn connect(endpoint: &str) -> Client {
    Client::builder()
        .endpoints(endpoint)
        .retry_for(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect")
}

/// The next item of a stream, bounded.
async fn next<S: tokio_stream::Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within 10 s"))
        .unwrap_or_else(|| panic!("the stream ended before {what}"))
}

/// Six clients take permits of a semaphore of 3, four rounds each; the
/// number believed held (counted from the grant's return to just before
/// the release) never exceeds 3. With three permits held, a fourth is
/// refused; when one holder's client goes, it is granted at once.
async fn semaphore_never_gives_more_than_its_permits(backend: Backend) {
    let server = TestServer::start(backend).await;
    let key = format!("sem/{}", rand_suffix());
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let client = connect(&server.endpoint()).await;
        let (key, inside, most) = (key.clone(), inside.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let permit = client
                    .semaphore(key.as_str(), 3)
                    .ttl(Duration::from_secs(5))
                    .wait(Duration::from_secs(30))
                    .await
                    .expect("a permit");
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(permit.release().await.expect("release"));
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the holders finished")
            .expect("holder task");
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} permits of 3 believed held at once");

    // Three held, one of them by a "process"; a fourth is refused, and
    // granted at once when that process goes.
    let mut holders = Vec::new();
    for _ in 0..3 {
        let mut h = Holder::start(server.endpoint(), key.clone(), Role::Permit(3));
        tokio::time::timeout(Duration::from_secs(10), &mut h.term)
            .await
            .expect("a permit in time")
            .expect("fencing token");
        holders.push(h);
    }
    let fourth = connect(&server.endpoint()).await;
    match fourth.semaphore(key.as_str(), 3).wait(Duration::ZERO).await {
        Err(Error::NotAcquired { .. }) => {}
        other => panic!("a fourth permit of three: {other:?}"),
    }
    let waiting = tokio::spawn({
        let key = key.clone();
        async move {
            let permit = fourth
                .semaphore(key.as_str(), 3)
                .wait(Duration::from_secs(20))
                .await;
            (Instant::now(), permit, fourth)
        }
    });
    wait_until_async("the fourth waiting", Duration::from_secs(10), || {
        let waiters = server.waiters.clone();
        async move { !waiters.is_empty() }
    })
    .await;
    let gone = Instant::now();
    holders[0].kill();
    let (granted, permit, _fourth) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter finished")
        .expect("waiter task");
    let permit = permit.expect("the freed permit");
    let took = granted - gone;
    // The stream's end, not the TTL (15 s).
    assert!(took < Duration::from_secs(3), "granted {took:?} after");
    assert!(permit.release().await.expect("release"));
}

/// A watch starts with the state (free), then shows another client's grant
/// (its owner and fencing token) and its release; a second watch of the
/// held lock starts with the holder.
async fn watch_yields_the_state_then_other_clients_changes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let key = format!("watch/{}", rand_suffix());
    let watcher = connect(&server.endpoint()).await;
    let holder = connect(&server.endpoint()).await;
    let mut events = watcher.watch(key.as_str()).await.expect("watch");
    let first: WatchEvent = next(&mut events, "the state").await.expect("state");
    assert_eq!(first.kind, EventKind::State);
    assert!(first.holders.is_empty(), "{first:?}");

    let guard = holder
        .lock(key.as_str())
        .owner("holder-1")
        .ttl(Duration::from_secs(10))
        .await
        .expect("lock");
    let acquired = next(&mut events, "ACQUIRED").await.expect("event");
    assert_eq!(acquired.kind, EventKind::Acquired, "{acquired:?}");
    assert_eq!(acquired.fencing_token, guard.fencing_token());
    let h = acquired.exclusive_holder().expect("a holder");
    assert_eq!(
        (h.owner.as_str(), h.fencing_token),
        ("holder-1", guard.fencing_token())
    );

    let mut again = watcher.watch(key.as_str()).await.expect("watch again");
    let state = next(&mut again, "the state").await.expect("state");
    assert_eq!(state.kind, EventKind::State);
    assert_eq!(
        state.exclusive_holder().map(|h| h.fencing_token),
        Some(guard.fencing_token())
    );

    let fence = guard.fencing_token();
    assert!(guard.release().await.expect("release"));
    let released = next(&mut events, "RELEASED").await.expect("event");
    assert_eq!(
        (released.kind, released.fencing_token),
        (EventKind::Released, fence)
    );
    assert!(released.holders.is_empty(), "{released:?}");
}

/// What a [`Holder`] holds.
#[derive(Clone)]
enum Role {
    /// Runs for leadership with this value (and owner).
    Candidate(&'static str),
    /// Takes one permit of a semaphore of this many.
    Permit(u32),
}

/// A lock holder in a runtime of its own, as another process would be:
/// holding once `term` (its fencing token) arrives; `kill` tears its
/// runtime and connections down without releasing, as a killed process
/// would.
struct Holder {
    term: tokio::sync::oneshot::Receiver<u64>,
    end: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Holder {
    fn start(endpoint: String, key: String, role: Role) -> Self {
        let (term_tx, term) = tokio::sync::oneshot::channel();
        let (end, end_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let client = connect(&endpoint).await;
                // Kept (never released) until the runtime is dropped.
                match role {
                    Role::Candidate(value) => {
                        let leadership = client
                            .elect(key.as_str())
                            .value(value)
                            .owner(value)
                            .ttl(Duration::from_secs(15))
                            .await
                            .expect("elected");
                        let _ = term_tx.send(leadership.term());
                        std::mem::forget(leadership);
                    }
                    Role::Permit(permits) => {
                        let permit = client
                            .semaphore(key.as_str(), permits)
                            .ttl(Duration::from_secs(15))
                            .await
                            .expect("a permit");
                        let _ = term_tx.send(permit.fencing_token());
                        std::mem::forget(permit);
                    }
                }
                tokio::task::block_in_place(|| {
                    let _ = end_rx.recv_timeout(Duration::from_secs(60));
                });
            });
            // Dropping the runtime drops the keepalive task and the
            // connection: the server sees the stream end.
            drop(rt);
        });
        Self {
            term,
            end: Some(end),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        drop(self.end.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn one_leader_and_the_next_takes_over_when_the_process_goes(backend: Backend) {
    let server = TestServer::start(backend).await;
    let key = format!("elect/{}", rand_suffix());
    let follower = connect(&server.endpoint()).await;
    let mut leaders = follower.observe(key.as_str());
    let none = next(&mut leaders, "the first leader state").await;
    assert_eq!(none.expect("observe"), None, "nobody leads yet");

    let mut one = Holder::start(server.endpoint(), key.clone(), Role::Candidate("one"));
    let term_one = tokio::time::timeout(Duration::from_secs(10), &mut one.term)
        .await
        .expect("one elected in time")
        .expect("term");
    let seen: Option<Leader> = next(&mut leaders, "leader one").await.expect("observe");
    let seen = seen.expect("a leader");
    assert_eq!(
        (seen.owner.as_str(), seen.value.as_deref(), seen.term),
        ("one", Some("one"), term_one)
    );

    // The second candidate waits while the first leads.
    let mut two = Holder::start(server.endpoint(), key.clone(), Role::Candidate("two"));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut two.term)
            .await
            .is_err(),
        "two leaders at once"
    );
    let killed = Instant::now();
    one.kill();
    let term_two = tokio::time::timeout(Duration::from_secs(10), &mut two.term)
        .await
        .expect("two elected in time")
        .expect("term");
    let took = killed.elapsed();
    assert!(term_two > term_one, "term {term_two} after {term_one}");
    // The TTL is 15 s: the stream's end, not the TTL, made way.
    assert!(took < Duration::from_secs(3), "failover took {took:?}");

    // The follower sees each leader: perhaps "nobody" in between, then two.
    let mut next_leader = next(&mut leaders, "the next leader")
        .await
        .expect("observe");
    if next_leader.is_none() {
        next_leader = next(&mut leaders, "leader two").await.expect("observe");
    }
    let next_leader = next_leader.expect("a leader");
    assert_eq!(
        (next_leader.value.as_deref(), next_leader.term),
        (Some("two"), term_two)
    );

    // Resigning makes way at once too: a third candidate leads.
    two.kill();
    let third = connect(&server.endpoint()).await;
    let leadership = tokio::time::timeout(
        Duration::from_secs(10),
        third.elect(key.as_str()).value("three").into_future(),
    )
    .await
    .expect("three elected in time")
    .expect("elected");
    assert!(leadership.term() > term_two);
    assert_eq!(leadership.value(), Some("three"));
    assert!(!leadership.is_lost());
    let term_three = leadership.term();
    assert!(leadership.resign().await.expect("resign"));
    let mut seen_three = false;
    for _ in 0..4 {
        match next(&mut leaders, "leader three, then nobody")
            .await
            .expect("observe")
        {
            Some(l) if l.term == term_three => seen_three = true,
            Some(l) => panic!("an unexpected leader {l:?}"),
            None if seen_three => return,
            None => {}
        }
    }
    panic!("leader three and its resignation were not observed");
}

/// Two servers on one Redis: a follower observing through the first (its
/// endpoints: the first, then the second) and a raw watch on the first.
/// When the first shuts down, the raw watch ends with an error (the caller
/// watches again), while `observe` watches again through the second by
/// itself and reports the next leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_watches_again_when_its_server_goes() {
    let mut first = TestServer::start(Backend::Redis).await;
    let second = TestServer::start_on(
        Backend::Redis,
        first.redis_url.clone(),
        first.prefix.clone(),
        test_config(),
    )
    .await;
    let key = format!("elect/{}", rand_suffix());
    let follower = Client::builder()
        .endpoints([first.endpoint(), second.endpoint()])
        .retry_for(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    let mut raw = follower.watch(key.as_str()).await.expect("watch");
    assert_eq!(
        next(&mut raw, "the state").await.expect("state").kind,
        EventKind::State
    );
    let mut leaders = follower.observe(key.as_str());
    assert_eq!(next(&mut leaders, "nobody").await.expect("observe"), None);

    let one = connect(&second.endpoint()).await;
    let leadership = one.elect(key.as_str()).value("one").await.expect("elected");
    let seen = next(&mut leaders, "leader one").await.expect("observe");
    assert_eq!(seen.map(|l| l.term), Some(leadership.term()));

    first.stop().await;
    let mut ended_with_error = false;
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_secs(10), raw.next())
            .await
            .expect("the raw watch ended in time")
        {
            Some(Ok(_)) => continue,
            Some(Err(_)) => ended_with_error = true,
            None => break,
        }
    }
    assert!(ended_with_error, "the raw watch ends with an error");

    let term_one = leadership.term();
    assert!(leadership.resign().await.expect("resign"));
    let two = connect(&second.endpoint()).await;
    let leadership = two.elect(key.as_str()).value("two").await.expect("elected");
    let mut heard = Vec::new();
    for _ in 0..4 {
        let leader = next(&mut leaders, "leader two").await.expect("observe");
        heard.push(leader.clone());
        if leader.is_some_and(|l| l.term == leadership.term()) {
            assert!(leadership.term() > term_one);
            return;
        }
    }
    panic!("observe never saw leader two after its server went: {heard:?}");
}
