//! Scenario 3: a client process SIGKILLed; its locks are released at once.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_client_process_killed() {
    let _serial = SERIAL.lock().await;
    let rounds = if full() { 20 } else { 2 };
    let RemoteRig {
        server,
        history,
        resource,
        mut hub,
    } = remote_rig().await;
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let keys: Vec<String> = (0..3).map(|i| format!("crash/{round}/{i}")).collect();
        let spec = remote::Spec {
            name: format!("holder-{round}"),
            role: "hold".into(),
            hub: hub.addr,
            endpoints: vec![server.endpoint()],
            keys: keys.clone(),
            ttl: Duration::from_secs(30),
            shared: None,
        };
        let (mut child, output) = spec.spawn();
        let mut holder = hub.next(Duration::from_secs(30)).await;
        holder.expect("HOLDING", Duration::from_secs(30)).await;
        let holder_fences: HashMap<String, u64> = history
            .windows()
            .into_iter()
            .filter(|w| w.client == holder.name)
            .map(|w| (w.key, w.fence))
            .collect();
        // One waiter per lock, each queued in the server before the kill.
        let mut waiting = Vec::new();
        for key in &keys {
            let client = sdk(&[server.endpoint()], Duration::from_secs(10)).await;
            let key = key.clone();
            waiting.push(tokio::spawn(async move {
                let sent = Instant::now();
                let guard = client
                    .lock(key.as_str())
                    .ttl(Duration::from_secs(5))
                    .wait(Duration::from_secs(20))
                    .await;
                (key, sent, Instant::now(), guard, client)
            }));
        }
        let queued = |key: &str| {
            server
                .output
                .all()
                .iter()
                .filter(|l| l.contains("waiting for the holder") && l.contains(key))
                .count()
        };
        until("every waiter queued", Duration::from_secs(10), || {
            keys.iter().all(|k| queued(k) >= 1)
        })
        .await;
        let killed_at = history.fault(format!("round {round}: SIGKILL client process"));
        let _ = child.kill();
        let _ = child.wait();
        history.end_all(&holder.name, killed_at, End::Killed);
        for task in waiting {
            let (key, sent, at, guard, _client) =
                tokio::time::timeout(Duration::from_secs(20), task)
                    .await
                    .expect("waiter finished")
                    .expect("waiter task");
            let guard = guard.expect("the waiter got the dead client's lock");
            history.grant("waiter", &key, guard.fencing_token(), sent, at);
            assert!(guard.fencing_token() > holder_fences[&key]);
            let latency = at - killed_at;
            assert!(
                latency < Duration::from_secs(1),
                "{key} reached its waiter {latency:?} after the kill\n{}",
                output.all().join("\n")
            );
            latencies.push(latency);
            history.end(
                "waiter",
                &key,
                guard.fencing_token(),
                Instant::now(),
                End::Released,
            );
            assert!(guard.release().await.expect("release"));
        }
    }
    let report = check(&history, &resource, Instant::now());
    latencies.sort();
    eprintln!(
        "scenario 3: {rounds} client process(es) SIGKILLed holding 3 locks each; kill → waiter granted: max {:?}, median {:?}; {report}",
        latencies.last().copied().unwrap_or_default(),
        latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
    );
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
}
