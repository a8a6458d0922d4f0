//! Scenario 4: a client process frozen (SIGSTOP) past its TTL.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_4_client_paused_past_its_ttl() {
    let _serial = SERIAL.lock().await;
    let rounds = if full() { 10 } else { 1 };
    let RemoteRig {
        server,
        history,
        resource,
        mut hub,
    } = remote_rig().await;
    let ttl = Duration::from_secs(1);
    let mut learned = Vec::new();
    for round in 0..rounds {
        let key = format!("paused/{round}");
        let spec = remote::Spec {
            name: format!("paused-{round}"),
            role: "pause".into(),
            hub: hub.addr,
            endpoints: vec![server.endpoint()],
            keys: vec![key.clone()],
            ttl,
            shared: None,
        };
        let (child, output) = spec.spawn();
        let mut a = hub.next(Duration::from_secs(30)).await;
        let (_, grant) = a.expect("GRANT", Duration::from_secs(30)).await;
        let fa: u64 = grant
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse().ok())
            .expect("fence");
        a.expect("READY", Duration::from_secs(30)).await;
        let pid = child.id();
        let stopped_at = history.fault(format!("round {round}: SIGSTOP client process"));
        signal(pid, "STOP");

        // b waits for the lock, and gets it once a's lease expires.
        let b = sdk(&[server.endpoint()], Duration::from_secs(10)).await;
        let sent = Instant::now();
        let b_guard = b
            .lock(key.as_str())
            .ttl(Duration::from_secs(10))
            .wait(Duration::from_secs(10))
            .owner("b")
            .await
            .expect("b gets the lock after a's TTL");
        let b_at = Instant::now();
        let fb = b_guard.fencing_token();
        history.grant("b", &key, fb, sent, b_at);
        assert!(fb > fa);
        assert!(b_at - stopped_at < ttl + Duration::from_secs(2));
        assert!(resource.write("b", &key, fb));
        // The pause goes on a while after b took over (the fault's length,
        // not a wait for anything).
        tokio::time::sleep(Duration::from_millis(500)).await;

        history.fault(format!("round {round}: SIGCONT client process"));
        signal(pid, "CONT");
        let cont_at = Instant::now();
        a.send("GO");
        // Its write, already on its way when it froze, carries its old token.
        let (_, late) = a.expect("LATE", Duration::from_secs(10)).await;
        assert_eq!(late, "LATE STALE", "the stale write was rejected");
        let (lost_at, lost) = a.expect("LOST", Duration::from_secs(15)).await;
        assert!(
            lost.ends_with("NotHeld") || lost.ends_with("Expired"),
            "{lost}"
        );
        learned.push(lost_at - cont_at);
        let (_, released) = a.expect("RELEASED", Duration::from_secs(15)).await;
        assert!(
            released.ends_with("false"),
            "a stale release must not free b's lock: {released}\n{}",
            output.all().join("\n")
        );
        let info = b
            .describe(key.as_str())
            .await
            .expect("describe")
            .expect("b still holds it");
        assert_eq!(info.fencing_token, fb);
        history.end("b", &key, fb, Instant::now(), End::Released);
        assert!(b_guard.release().await.expect("release"));
        drop(child);
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "scenario 4: {rounds} client(s) frozen past a {ttl:?} TTL; after SIGCONT lost() fired within {:?}; {report}",
        learned,
    );
    report.assert_fencing_holds();
    assert_eq!(report.stale_rejected, rounds, "one stale write per round");
    // Each frozen client believed it held the lock while b held it.
    assert_eq!(report.overlaps.len(), rounds);
}
