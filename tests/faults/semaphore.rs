//! Semaphore: a semaphore of N permits contended by SDK clients on two
//! servers over one Redis, while client *processes* holding a permit are
//! SIGKILLed. Checked: never more than N believed holders at once (belief
//! = from the grant's return to the release call or `lost()`, a killed
//! process's to its kill), fencing tokens in grant order, and each killed
//! holder's permit back (gone from Describe) within the store timeout,
//! not its 30 s TTL.

use super::*;

const PERMITS: u32 = 3;
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_permits_of_killed_clients_come_back() {
    let _serial = SERIAL.lock().await;
    let rounds = if full() { 10 } else { 2 };
    let seed = mode_seed();
    let url = cluster_url();
    let prefix = unique_prefix();
    let timeout = format!("{}s", STORE_TIMEOUT.as_secs());
    let a = serve(&url, &prefix, &["--store-timeout", &timeout]);
    let b = serve(&url, &prefix, &["--store-timeout", &timeout]);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut hub = remote::Hub::start(history.clone(), resource.clone()).await;
    let key = "sem/permits".to_string();
    let load = ModeLoad {
        key: key.clone(),
        shared: Some(PERMITS),
        ttl: Duration::from_secs(5),
        wait: Duration::from_secs(10),
        hold_ms: (20, 120),
        pause_ms: (0, 30),
    };
    // Six in-process holders, three first on each server: the semaphore
    // is always full, with waiters on both servers.
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let client = sdk(&endpoints_alternating(w, &a, &b), Duration::from_secs(10)).await;
        tasks.push(tokio::spawn(mode_worker(
            format!("worker-{w}"),
            client,
            load.clone(),
            seed.wrapping_add(w),
            history.clone(),
            stop.clone(),
        )));
    }
    let started = Instant::now();
    let mut comebacks = Vec::new();
    for round in 0..rounds {
        let server = if round % 2 == 0 { &a } else { &b };
        let spec = remote::Spec {
            name: format!("permit-holder-{round}"),
            role: "hold".into(),
            hub: hub.addr,
            endpoints: vec![server.endpoint()],
            keys: vec![key.clone()],
            ttl: Duration::from_secs(30),
            shared: Some(PERMITS),
        };
        let (mut child, output) = spec.spawn();
        let mut holder = hub.next(Duration::from_secs(30)).await;
        holder.expect("HOLDING", Duration::from_secs(30)).await;
        assert!(
            holders_of(&server.endpoint(), &key)
                .await
                .contains(&holder.name),
            "the process holds a permit"
        );
        let killed_at = history.fault(format!("round {round}: SIGKILL a permit holder"));
        let _ = child.kill();
        let _ = child.wait();
        history.end_all(&holder.name, killed_at, End::Killed);
        let mut back = None;
        for _ in 0..500 {
            if !holders_of(&a.endpoint(), &key).await.contains(&holder.name) {
                back = Some(killed_at.elapsed());
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(10),
                "the killed holder's permit is still taken\n{}",
                output.all().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let back = back.expect("the permit came back");
        assert!(
            back < STORE_TIMEOUT + Duration::from_secs(1),
            "the permit came back {back:?} after the kill (TTL 30 s, store timeout {STORE_TIMEOUT:?})"
        );
        comebacks.push(back);
    }
    // Contention for a few seconds in all, kills included.
    let run_for = if full() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    };
    tokio::time::sleep(run_for.saturating_sub(started.elapsed())).await;
    stop.cancel();
    let waits = mode_waits(tasks).await;
    let grants = waits.len();
    assert!(grants >= 20, "only {grants} grants: the run checked little");
    let windows = history.grants_of(&key);
    let (most, when) = most_at_once(&windows, Instant::now());
    assert!(
        most <= PERMITS as usize,
        "{most} believed holders of {PERMITS} permits at {:?} into the run",
        when.map(|w| w - history.started)
    );
    assert_eq!(
        most, PERMITS as usize,
        "the semaphore was never full: the run checked nothing"
    );
    let bad = fence_order_violations(&windows);
    assert!(bad.is_empty(), "{bad:?}");
    eprintln!(
        "semaphore (seed {seed}), {:?}: {PERMITS} permits, 6 clients on two servers + {rounds} SIGKILLed holder process(es); {grants} grants, most believed at once {most}; kill → permit free: {:?}; Acquire wait p50 {:?}, max {:?}",
        started.elapsed(),
        comebacks,
        waits.get(waits.len() / 2).copied().unwrap_or_default(),
        waits.last().copied().unwrap_or_default(),
    );
}
