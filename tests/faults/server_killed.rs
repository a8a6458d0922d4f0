//! Scenario 2: a Leasehold server SIGKILLed; its clients renew through another server.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_leasehold_server_killed() {
    let _serial = SERIAL.lock().await;
    let (holders, workers, kills, grants_between) = if full() {
        (8, 8, 4, 200)
    } else {
        (3, 4, 1, 20)
    };
    let url = cluster_url();
    let prefix = unique_prefix();
    let mut servers = [serve(&url, &prefix, &[]), serve(&url, &prefix, &[])];
    let endpoints: Vec<String> = servers.iter().map(ServerProcess::endpoint).collect();
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(2);

    // Long holders: two locks each, kept alive across every kill.
    let mut held = Vec::new();
    for h in 0..holders {
        let client = sdk(&endpoints, Duration::from_secs(20)).await;
        for j in 0..2 {
            let key = format!("held/{h}/{j}");
            held.push(hold(&client, &history, &format!("holder-{h}"), key, ttl).await);
        }
        // The guards keep the client's keepalive task running.
        drop(client);
    }
    let hot: Vec<String> = (0..2).map(|i| format!("hot/{i}")).collect();
    let mut crew = Crew::new();
    for i in 0..workers {
        let mut eps = endpoints.clone();
        eps.rotate_left(i % 2);
        let load = Load {
            keys: hot.clone(),
            ttl,
            hold: Duration::from_millis(20),
            writes: 2,
            wait: Duration::from_secs(5),
        };
        crew.add(format!("worker-{i}"), &eps, load, &history, &resource)
            .await;
    }
    let mut since = history.started;
    let mut reattach = Vec::new();
    let mut gaps = Vec::new();
    for round in 0..kills {
        until("grants before the kill", Duration::from_secs(60), || {
            grants_after(&history, &hot, since).len() >= grants_between
        })
        .await;
        let victim = round % 2;
        let addr = servers[victim].addr.clone();
        let killed_at = history.fault(format!("round {round}: SIGKILL leasehold serve {addr}"));
        servers[victim].signal("KILL");
        let _ = tokio::task::block_in_place(|| servers[victim].wait_exit(Duration::from_secs(10)));
        // Every held lock is renewed through the other server before its
        // TTL runs out: its remaining TTL, read after the kill, jumps up.
        let observer = sdk(&[servers[1 - victim].endpoint()], Duration::from_secs(20)).await;
        let mut previous: HashMap<String, Duration> = HashMap::new();
        let mut renewed: HashMap<String, Instant> = HashMap::new();
        let end = Instant::now() + ttl;
        while renewed.len() < held.len() {
            for (_, key, _, _) in &held {
                if renewed.contains_key(key) {
                    continue;
                }
                if let Ok(Some(info)) = observer.describe(key.as_str()).await {
                    let now = info.ttl_remaining;
                    match previous.insert(key.clone(), now) {
                        Some(before) if now > before + Duration::from_millis(50) => {
                            renewed.insert(key.clone(), Instant::now());
                        }
                        _ => {}
                    }
                }
            }
            assert!(
                Instant::now() < end,
                "held locks not renewed within a TTL of the kill: {renewed:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = renewed.values().max().copied().unwrap_or(killed_at);
        reattach.push(last - killed_at);
        until("grants after the kill", Duration::from_secs(60), || {
            grants_after(&history, &hot, killed_at).len() >= grants_between
        })
        .await;
        gaps.push(
            grants_after(&history, &hot, killed_at)
                .first()
                .map(|t| *t - killed_at)
                .unwrap_or_default(),
        );
        // The dead server comes back on the same address.
        servers[victim] = tokio::task::block_in_place(|| {
            ServerProcess::start_on(
                &addr,
                &[
                    "--redis-url",
                    &url,
                    "--key-prefix",
                    &prefix,
                    "--health-interval",
                    "100ms",
                ],
            )
        });
        since = Instant::now();
    }
    // Two more TTLs on the surviving servers: nothing was lost.
    tokio::time::sleep(ttl * 2).await;
    let errors = crew.stop().await;
    let probe = sdk(&endpoints, Duration::from_secs(20)).await;
    for (name, key, guard, lost) in held.iter_mut() {
        assert_eq!(
            futures_util::FutureExt::now_or_never(lost),
            None,
            "{name} lost {key}"
        );
        let info = probe
            .describe(key.as_str())
            .await
            .expect("describe")
            .expect("still held");
        assert_eq!(info.fencing_token, guard.fencing_token());
    }
    for (name, key, guard, _) in held.drain(..) {
        give_back(&history, &name, &key, guard).await;
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "scenario 2: {kills} server kill(s); held locks re-attached through the other server within {:?} of the kill; first worker grant after the kill {:?}; {report}",
        reattach.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
        gaps.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
    );
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    assert_eq!(report.lost, 0, "a worker lost a lock");
    assert!(errors.is_empty(), "{errors:?}");
}
