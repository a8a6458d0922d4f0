//! Scenario 5: Redis cut off from the servers, then back.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_5_redis_unreachable() {
    let _serial = SERIAL.lock().await;
    let outage = if full() {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(3)
    };
    let redis = tokio::task::block_in_place(RedisServer::start);
    let upstream = redis.addr().parse().expect("addr");
    let proxy = proxy::Proxy::start(upstream).await;
    let prefix = unique_prefix();
    let server = serve(
        &proxy.url(),
        &prefix,
        &["--store-timeout", "800ms", "--pool-size", "2"],
    );
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let health = HealthLog::watch(&server.endpoint()).await;
    let holder = sdk(&[server.endpoint()], Duration::from_secs(30)).await;
    let mut raw = LockServiceClient::connect(server.endpoint())
        .await
        .expect("connect");
    let mut crew = Crew::new();
    crew.add(
        "worker".into(),
        &[server.endpoint()],
        Load {
            keys: vec!["outage/cycle".into()],
            ttl: Duration::from_secs(5),
            hold: Duration::from_millis(20),
            writes: 2,
            wait: Duration::from_secs(5),
        },
        &history,
        &resource,
    )
    .await;
    for (round, mode) in [proxy::Mode::Cut, proxy::Mode::Pause]
        .into_iter()
        .enumerate()
    {
        let key = format!("outage/held/{round}");
        let sent = Instant::now();
        let guard = holder
            .lock(key.as_str())
            .ttl(outage * 3)
            .wait(Duration::ZERO)
            .await
            .expect("held before the outage");
        history.grant("holder", &key, guard.fencing_token(), sent, Instant::now());
        let mut lost = guard.lost();
        until("worker grants", Duration::from_secs(20), || {
            grants_after(&history, &["outage/cycle".to_string()], sent).len() >= 5
        })
        .await;

        let cut_at = history.fault(format!("{mode:?}: Redis unreachable for {outage:?}"));
        proxy.set(mode);
        // Calls fail with UNAVAILABLE within the store timeout (800 ms),
        // never hang; probed every 100 ms through the outage.
        let mut latencies = Vec::new();
        let mut probes = 0;
        while cut_at.elapsed() < outage {
            let start = Instant::now();
            let result = raw
                .acquire(acquire(&format!("outage/probe/{round}/{probes}"), 5_000))
                .await;
            let took = start.elapsed();
            probes += 1;
            match result {
                Err(s) if s.code() == Code::Unavailable => {}
                // The first probe may still get through before the cut bites.
                Ok(_) if probes == 1 && took < Duration::from_millis(100) => continue,
                other => panic!("expected UNAVAILABLE during the outage, got {other:?}"),
            }
            assert!(took < Duration::from_millis(1_500), "took {took:?}");
            latencies.push(took);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let not_serving = health
            .reached("NOT_SERVING", cut_at, Duration::from_secs(5))
            .await;
        let restored_at = history.fault(format!("{mode:?}: Redis reachable again"));
        proxy.set(proxy::Mode::Pass);
        let serving = health
            .reached("SERVING", restored_at, Duration::from_secs(20))
            .await;
        // Recovered without a restart: a fresh grant, fenced above the last.
        let lease = lease_of(
            raw.acquire(acquire(&format!("outage/after/{round}"), 5_000))
                .await
                .expect("acquire after recovery")
                .into_inner(),
        );
        assert!(lease.fencing_token > guard.fencing_token());
        // The lock held through the outage is still held (Redis kept it).
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match holder.describe(key.as_str()).await {
                    Ok(Some(info)) if info.fencing_token == guard.fencing_token() => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("the held lock survived the outage");
        assert_eq!(futures_util::FutureExt::now_or_never(&mut lost), None);
        history.end(
            "holder",
            &key,
            guard.fencing_token(),
            Instant::now(),
            End::Released,
        );
        assert!(guard.release().await.expect("release"));
        let first_worker_grant = until(
            "a worker grant after recovery",
            Duration::from_secs(20),
            || !grants_after(&history, &["outage/cycle".to_string()], restored_at).is_empty(),
        )
        .await;
        latencies.sort();
        let line = format!(
            "{mode:?} for {outage:?}: {} calls, all UNAVAILABLE, median {:?}, slowest {:?}; NOT_SERVING {} after the cut; SERVING {} after Redis came back; worker granted again {} after",
            latencies.len(),
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1],
            secs(not_serving - cut_at),
            secs(serving - restored_at),
            secs(first_worker_grant - restored_at),
        );
        eprintln!("scenario 5: {line}");
    }
    let _errors = crew.stop().await;
    let report = check(&history, &resource, Instant::now());
    eprintln!("scenario 5: {report}");
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    drop(redis);
}
