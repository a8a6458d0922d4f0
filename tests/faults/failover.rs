//! Scenarios 1 and 1b: a Redis Cluster primary SIGKILLed under load, and a failover that loses an unreplicated grant.

use super::*;

/// Figures of one scenario 1 round.
#[derive(Debug, Default)]
struct FailoverFigures {
    acks: u32,
    kills: usize,
    failover: Vec<Duration>,
    hot_gap: Vec<Duration>,
    cold_gap: Vec<Duration>,
    cold_grants_during: Vec<usize>,
    grants: usize,
    overlaps: usize,
    max_overlap: Duration,
    stale_rejected: usize,
    errors: usize,
    report: String,
}

struct FailoverParams {
    hot_keys: usize,
    hot_workers: usize,
    cold_workers: usize,
    grants_between: usize,
    kills: usize,
}

/// Clients lock hot keys (all on one primary) and cold keys (on the other
/// primaries) through two servers while the hot keys' primary is
/// SIGKILLed, a replica promoted, and the old primary restarted as a
/// replica; `kills` times.
async fn failover_round(
    cluster: &mut RedisCluster,
    acks: u32,
    p: &FailoverParams,
) -> FailoverFigures {
    let prefix = unique_prefix();
    let url = cluster.url();
    let acks_flag = acks.to_string();
    let extra = ["--store-timeout", "1s", "--min-replica-acks", &acks_flag];
    let servers = [serve(&url, &prefix, &extra), serve(&url, &prefix, &extra)];
    let endpoints: Vec<String> = servers.iter().map(ServerProcess::endpoint).collect();
    let any = cluster.nodes[0].port;

    let hot_master =
        tokio::task::block_in_place(|| owner_of(any, slot_of(&prefix, "hot/0"))).expect("an owner");
    let hot_slots: Vec<(u16, u16)> = tokio::task::block_in_place(|| {
        cluster_nodes(any)
            .into_iter()
            .find(|n| n.port == hot_master)
            .map(|n| n.slots)
            .unwrap_or_default()
    });
    let on_hot = |s: u16| hot_slots.iter().any(|(a, b)| (*a..=*b).contains(&s));
    let hot = keys_where(&prefix, "hot", p.hot_keys, on_hot);
    let cold = keys_where(&prefix, "cold", 2, |s| !on_hot(s));
    let hot_slot = slot_of(&prefix, &hot[0]);

    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut crew = Crew::new();
    let load = |keys: &[String]| Load {
        keys: keys.to_vec(),
        ttl: Duration::from_secs(2),
        hold: Duration::from_millis(20),
        writes: 2,
        wait: Duration::from_secs(5),
    };
    for i in 0..p.hot_workers + p.cold_workers {
        let mut eps = endpoints.clone();
        eps.rotate_left(i % 2);
        let (name, keys) = if i < p.hot_workers {
            (format!("hot-{i}"), &hot)
        } else {
            (format!("cold-{i}"), &cold)
        };
        crew.add(name, &eps, load(keys), &history, &resource).await;
    }

    let mut figures = FailoverFigures {
        acks,
        kills: p.kills,
        ..FailoverFigures::default()
    };
    let mut since = history.started;
    for round in 0..p.kills {
        until(
            "hot grants before the kill",
            Duration::from_secs(60),
            || grants_after(&history, &hot, since).len() >= p.grants_between,
        )
        .await;
        let master = tokio::task::block_in_place(|| {
            let live = cluster
                .nodes
                .iter()
                .map(|n| n.port)
                .find(|p| redis_cli(*p, &["PING"]) == "PONG")
                .expect("a live node");
            owner_of(live, hot_slot)
        })
        .expect("the hot slot has an owner");
        let i = index_of(cluster, master);
        let killed_at = history.fault(format!(
            "round {round}: SIGKILL primary 127.0.0.1:{master} (owns the hot keys)"
        ));
        tokio::task::block_in_place(|| cluster.nodes[i].kill());
        // A waiting Acquire on a lock of a healthy primary, on a channel
        // no one subscribed yet, while the subscriber client reconnects:
        // granted (regression: it failed with UNAVAILABLE until the
        // failover was over).
        let fresh = keys_where(&prefix, &format!("fresh/{round}"), 1, |s| !on_hot(s));
        let mut raw = LockServiceClient::connect(endpoints[0].clone())
            .await
            .expect("connect");
        let fresh_grant = raw
            .acquire(acquire_wait(&fresh[0], 1_000, 5_000))
            .await
            .map(|r| r.into_inner().acquired);
        let fresh_at = Instant::now();
        let (new_master, promoted_at) = wait_promoted(cluster, master, hot_slot).await;
        assert_eq!(
            fresh_grant.map_err(|s| s.to_string()),
            Ok(true),
            "a waiting Acquire on a healthy primary during the failover"
        );
        assert!(
            fresh_at < promoted_at,
            "the waiting Acquire was held up by the failover"
        );
        let rejoined_at = rejoin(cluster, i).await;
        history.fault(format!(
            "round {round}: 127.0.0.1:{master} restarted, replica of 127.0.0.1:{new_master}"
        ));
        let resumed = until(
            "a hot grant after the rejoin",
            Duration::from_secs(60),
            || !grants_after(&history, &hot, rejoined_at.max(promoted_at)).is_empty(),
        )
        .await;
        let hot_outage = largest_gap(&history, &hot, killed_at, resumed);
        figures.failover.push(promoted_at - killed_at);
        figures.hot_gap.push(hot_outage);
        figures
            .cold_gap
            .push(largest_gap(&history, &cold, killed_at, promoted_at));
        figures.cold_grants_during.push(
            grants_after(&history, &cold, killed_at)
                .into_iter()
                .filter(|t| *t <= promoted_at)
                .count(),
        );
        eprintln!(
            "scenario 1 (--min-replica-acks {acks}) round {round}: failover {} (kill → replica promoted, cluster ok), old primary replicating again after {}, hot keys without a grant for {}, cold keys granted {} times while failing over",
            secs(promoted_at - killed_at),
            secs(rejoined_at - killed_at),
            secs(hot_outage),
            figures.cold_grants_during.last().copied().unwrap_or(0),
        );
        since = rejoined_at;
    }
    until(
        "hot grants after the last rejoin",
        Duration::from_secs(60),
        || grants_after(&history, &hot, since).len() >= p.grants_between,
    )
    .await;
    let errors = crew.stop().await;
    drop(servers);
    let report = check(&history, &resource, Instant::now());
    eprintln!("scenario 1 (--min-replica-acks {acks}): {report}");
    for o in &report.overlaps {
        eprintln!("  overlap {o:?}");
    }
    for (at, e) in errors.iter().take(5) {
        eprintln!(
            "  error {:.2} s in: {e}",
            (*at - history.started).as_secs_f64()
        );
    }
    report.assert_fencing_holds();
    figures.grants = report.grants;
    figures.overlaps = report.overlaps.len();
    figures.max_overlap = report.max_overlap();
    figures.stale_rejected = report.stale_rejected;
    figures.errors = errors.len();
    figures.report = report.to_string();
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_cluster_primary_killed() {
    let _serial = SERIAL.lock().await;
    let p = if full() {
        FailoverParams {
            hot_keys: 4,
            hot_workers: 8,
            cold_workers: 4,
            grants_between: 200,
            kills: 3,
        }
    } else {
        FailoverParams {
            hot_keys: 2,
            hot_workers: 4,
            cold_workers: 2,
            grants_between: 20,
            kills: 1,
        }
    };
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_node_timeout(1000));
    wait_replicated(&cluster).await;
    let mut all = Vec::new();
    for acks in [0, 1] {
        all.push(failover_round(&mut cluster, acks, &p).await);
    }
    for f in &all {
        eprintln!(
            "scenario 1 summary, --min-replica-acks {}: {} kill(s); failover {:?}; hot keys without a grant for {:?}; cold-key grants while failing over {:?} (largest gap {:?}); grants {}; overlaps {} (max {:?}); stale writes rejected {}; client errors {}",
            f.acks,
            f.kills,
            f.failover.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.hot_gap.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.cold_grants_during,
            f.cold_gap.iter().map(|d| secs(*d)).collect::<Vec<_>>(),
            f.grants,
            f.overlaps,
            f.max_overlap,
            f.stale_rejected,
            f.errors,
        );
        // Clients kept taking locks through every failover, and locks on
        // the other primaries never stopped (regression: fred's cluster
        // client used to stall every slot until the promotion).
        assert_eq!(f.hot_gap.len(), f.kills);
        assert!(
            f.cold_grants_during.iter().all(|n| *n > 0),
            "locks on healthy primaries stalled during a failover: {:?}",
            f.cold_grants_during
        );
        assert_eq!(f.errors, 0, "SDK calls failed past their retries");
    }
}

/// Acquire, retried while the server answers UNAVAILABLE (it may not have
/// found a just-promoted primary yet), for at most 20 s.
async fn retry_unavailable(
    raw: &mut LockServiceClient<tonic::transport::Channel>,
    req: pb::AcquireRequest,
) -> pb::AcquireResponse {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match raw.acquire(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("acquire failed: {s:?}"),
        }
    }
}

/// Fills the replication stream of the primary on `port` with `mib` MiB
/// written to keys in the slot of `tag`, so that what follows waits
/// behind it in the primary's memory while its replica is frozen.
async fn flood(port: u16, tag: &str, mib: usize) {
    use fred::prelude::*;
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).expect("url");
    let client = Builder::from_config(config).build().expect("fred client");
    client.init().await.expect("connect to the primary");
    let value = "x".repeat(1 << 20);
    for i in 0..mib {
        let _: () = client
            .set(
                format!("flood{{{tag}}}:{i}"),
                value.as_str(),
                None,
                None,
                false,
            )
            .await
            .expect("SET");
    }
    let _ = client.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1b_failover_loses_an_unreplicated_grant() {
    let _serial = SERIAL.lock().await;
    let mut cluster = tokio::task::block_in_place(|| RedisCluster::start_with_node_timeout(1000));
    wait_replicated(&cluster).await;
    let prefix = unique_prefix();
    let url = cluster.url();
    let plain = serve(&url, &prefix, &[]);
    let acked = serve(&url, &prefix, &["--min-replica-acks", "1"]);
    let key = "lost/a";
    let slot = slot_of(&prefix, key);
    let any = cluster.nodes[0].port;
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(30);

    // --min-replica-acks 0: the replica is frozen while the primary grants.
    let m_port = tokio::task::block_in_place(|| owner_of(any, slot)).expect("owner");
    let m = index_of(&cluster, m_port);
    let r = *tokio::task::block_in_place(|| replicas_of(&cluster, m_port))
        .first()
        .expect("a replica");
    let r_pid = cluster.nodes[r].pid().expect("running");
    signal(r_pid, "STOP");
    flood(m_port, key, 16).await;
    let a = sdk(&[plain.endpoint()], Duration::from_secs(20)).await;
    let sent = Instant::now();
    let a_guard = a
        .lock(key)
        .ttl(ttl)
        .wait(Duration::ZERO)
        .owner("a")
        .await
        .expect("granted by the primary");
    let fa = a_guard.fencing_token();
    history.grant("a", key, fa, sent, Instant::now());
    assert!(resource.write("a", key, fa));
    // When a learns that it lost the lock ends its validity window.
    let a_lost = {
        let lost = a_guard.lost();
        tokio::spawn(async move {
            let reason = lost.await;
            (reason, Instant::now())
        })
    };
    let killed_at = history.fault(format!("SIGKILL primary 127.0.0.1:{m_port}"));
    tokio::task::block_in_place(|| cluster.nodes[m].kill());
    signal(r_pid, "CONT");
    let (promoted, promoted_at) = wait_promoted(&cluster, m_port, slot).await;
    assert_eq!(promoted, cluster.nodes[r].port);
    // The promoted replica has neither the lock nor its fencing counter.
    let names = leasehold::store::RedisNames::of(
        &prefix,
        &leasehold::lock::LockKey::parse(key, 512).expect("key"),
    );
    let on_replica = tokio::task::block_in_place(|| {
        (
            redis_cli(promoted, &["EXISTS", &names.lock]),
            redis_cli(promoted, &["EXISTS", &names.fence]),
        )
    });
    assert_eq!(
        on_replica,
        ("0".to_string(), "0".to_string()),
        "the grant reached the replica: nothing was lost"
    );

    // So b gets the lock while a's 30 s lease should still run.
    let b = sdk(&[plain.endpoint()], Duration::from_secs(20)).await;
    let sent = Instant::now();
    let b_guard = b
        .lock(key)
        .ttl(ttl)
        .wait(Duration::from_secs(20))
        .owner("b")
        .await
        .expect("b is granted the lock a's grant was lost from");
    let fb = b_guard.fencing_token();
    history.grant("b", key, fb, sent, Instant::now());
    assert!(
        fb > fa,
        "the TIME floor keeps fencing tokens increasing across the lost counter: {fa} then {fb}"
    );
    assert!(resource.write("b", key, fb));
    // a's write, late: the fenced resource rejects it.
    assert!(
        !resource.write("a", key, fa),
        "a stale holder's write got through"
    );
    let (reason, learned_at) = tokio::time::timeout(ttl, a_lost)
        .await
        .expect("a learns it lost the lock")
        .expect("task");
    history.end("a", key, fa, learned_at, End::Lost);
    assert_eq!(reason, LostReason::NotHeld);
    history.end("b", key, fb, Instant::now(), End::Released);
    assert!(b_guard.release().await.expect("release"));
    let report = check(&history, &resource, Instant::now());
    let b_at = history
        .grants_of(key)
        .last()
        .map(|w| w.start)
        .expect("b's grant");
    let learned = if learned_at >= b_at {
        format!("{} after b's grant", secs(learned_at - b_at))
    } else {
        format!("{} before b's grant", secs(b_at - learned_at))
    };
    eprintln!(
        "scenario 1b (--min-replica-acks 0): failover {}; b granted {} after the kill, while a's 30 s lease had {} to run; a learned of its loss {learned}; {report}",
        secs(promoted_at - killed_at),
        secs(b_at - killed_at),
        secs(ttl.saturating_sub(b_at - history.grants_of(key)[0].start)),
    );
    report.assert_fencing_holds();
    // Whether a learned of its loss before b's grant is a race (a's
    // keepalive re-attaches on the promoted replica about when b asks).
    assert!(report.overlaps.len() <= 1, "{:?}", report.overlaps);
    assert_eq!(report.stale_rejected, 1);
    let overlap = report.max_overlap();

    // --min-replica-acks 1: the same freeze; the grant is not answered.
    rejoin(&mut cluster, m).await;
    let (r_port, m_pid) = (
        cluster.nodes[r].port,
        cluster.nodes[m].pid().expect("running"),
    );
    signal(m_pid, "STOP");
    let mut raw = LockServiceClient::connect(acked.endpoint())
        .await
        .expect("connect");
    let start = Instant::now();
    let refused = raw.acquire(acquire(key, 30_000)).await;
    let took = start.elapsed();
    let status = refused.expect_err("not answered without a replica's acknowledgement");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("acknowledged by 0 of 1"),
        "{status:?}"
    );
    // WAIT gives up after half the store timeout (2 s); then the undo.
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    let d = raw
        .describe(describe(key))
        .await
        .expect("describe")
        .into_inner();
    assert!(!d.held, "the unacknowledged grant was undone");
    history.fault(format!("SIGKILL primary 127.0.0.1:{r_port}"));
    tokio::task::block_in_place(|| cluster.nodes[r].kill());
    signal(m_pid, "CONT");
    wait_promoted(&cluster, r_port, slot).await;
    // The new primary has no replica: refused at once, nothing granted.
    let start = Instant::now();
    let status = loop {
        // fred may need a moment to route to the new primary.
        match raw.acquire(acquire(key, 30_000)).await {
            Err(s) if s.message().contains("replica(s) online") => break s,
            Err(s)
                if s.code() == Code::Unavailable && start.elapsed() < Duration::from_secs(20) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("expected a refusal for want of replicas, got {other:?}"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    let quick = Instant::now();
    let again = raw
        .acquire(acquire(key, 30_000))
        .await
        .expect_err("refused");
    assert!(again.message().contains("replica(s) online"), "{again:?}");
    assert!(quick.elapsed() < Duration::from_millis(500));
    // Without the flag the same primary grants (availability over safety).
    let mut raw_plain = LockServiceClient::connect(plain.endpoint())
        .await
        .expect("connect");
    let lease = lease_of(retry_unavailable(&mut raw_plain, acquire(key, 30_000)).await);
    assert!(lease.fencing_token > fb);
    assert!(
        raw_plain
            .release(release(key, &lease.token))
            .await
            .expect("release")
            .into_inner()
            .released
    );
    // A replica again: acknowledged grants.
    rejoin(&mut cluster, r).await;
    let c = sdk(&[acked.endpoint()], Duration::from_secs(20)).await;
    let c_guard = c
        .lock(key)
        .ttl(ttl)
        .wait(Duration::ZERO)
        .await
        .expect("granted with a replica's acknowledgement");
    assert!(c_guard.fencing_token() > lease.fencing_token);
    assert!(c_guard.release().await.expect("release"));
    eprintln!(
        "scenario 1b: with --min-replica-acks 0 the unreplicated grant was lost (validity windows overlapped for {}); with --min-replica-acks 1 the same grant was refused (UNAVAILABLE after {}) and nobody held the lock in the meantime",
        secs(overlap),
        secs(took)
    );
}
