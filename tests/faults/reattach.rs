//! Scenario 6 (documentation/safety.md): a client's connection to one
//! server is cut off (a partition: the proxy holds every byte) while the
//! client holds locks. The client re-attaches them through the other
//! server; the old server notices the dead connection only when its HTTP/2
//! PINGs go unanswered, and ends the old stream then. Rivals on the other
//! server wait for the same keys the whole time. The latest attachment owns
//! the stream-end release, so the old stream's end releases nothing: the
//! checker sees no overlap of believed-held intervals, and no holder loses
//! its lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checker::{End, History, Resource, check};
use crate::common::*;
use crate::proxy::{Mode, Proxy};
use crate::{Crew, Load, SERIAL, full, sdk, serve};

/// The old server notices a silent client after 2 + 2 s of silence: later
/// than the holders notice the stall (a renewal unanswered for TTL/3 = 1 s,
/// renewals every 1 s), as with the defaults (15 s, and a 30 s TTL: at most
/// 10 + 5 s). Every lock moves; none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6_partitioned_client_reattaches_elsewhere() {
    partitions(
        ["--keepalive-interval", "2s", "--keepalive-timeout", "2s"],
        false,
    )
    .await;
}

/// The old server notices first (0.5 + 0.5 s of silence, sooner than the
/// holders' stall detection): it ends the streams and releases the locks
/// before they could move. The holders were told (the stream's
/// `leasehold-silence-release-ms`) and stop believing before that release:
/// locks are lost, but no rival is granted one while its holder believes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6b_old_server_notices_first() {
    partitions(
        [
            "--keepalive-interval",
            "500ms",
            "--keepalive-timeout",
            "500ms",
        ],
        true,
    )
    .await;
}

async fn partitions(pings: [&str; 4], losses_allowed: bool) {
    let _serial = SERIAL.lock().await;
    let (holders, rounds) = if full() { (6, 5) } else { (3, 2) };
    let redis = tokio::task::block_in_place(RedisServer::start);
    let url = redis.url();
    let prefix = unique_prefix();
    let a: ServerProcess = serve(&url, &prefix, &pings);
    let b: ServerProcess = serve(&url, &prefix, &pings);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let ttl = Duration::from_secs(3);
    let mut moved = Vec::new();
    let mut lost_holders = 0;

    for round in 0..rounds {
        let proxy = Proxy::start(a.addr.parse().expect("server address")).await;
        // Holders reach A through the proxy first, B is their second endpoint.
        let via_a = format!("http://{}", proxy.addr);
        let mut held = Vec::new();
        for h in 0..holders {
            let client = sdk(&[via_a.clone(), b.endpoint()], Duration::from_secs(20)).await;
            let key = format!("partitioned/{round}/{h}");
            let name = format!("holder-{h}");
            let sent = Instant::now();
            let guard = client
                .lock(key.as_str())
                .ttl(ttl)
                .wait(Duration::ZERO)
                .owner(name.as_str())
                .await
                .expect("held");
            let fence = guard.fencing_token();
            history.grant(&name, &key, fence, sent, Instant::now());
            // The instant the holder stops believing, recorded as it happens.
            let lost = guard.lost();
            let watcher = tokio::spawn({
                let (history, name, key) = (history.clone(), name.clone(), key.clone());
                async move {
                    lost.await;
                    history.end(&name, &key, fence, Instant::now(), End::Lost);
                }
            });
            held.push((name, key, guard, client, watcher));
        }
        // Rivals wait on B for every held key, taking each the moment it is
        // free (which must not be while its holder believes it holds it).
        let keys: Vec<String> = held.iter().map(|h| h.1.clone()).collect();
        let mut crew = Crew::new();
        for r in 0..2 {
            let load = Load {
                keys: keys.clone(),
                ttl,
                hold: Duration::from_millis(20),
                writes: 2,
                wait: Duration::from_secs(2),
            };
            crew.add(
                format!("rival-{round}-{r}"),
                &[b.endpoint()],
                load,
                &history,
                &resource,
            )
            .await;
        }

        let cut = history.fault(format!(
            "round {round}: partition between the holders and A"
        ));
        proxy.set(Mode::Pause);
        let observer = sdk(&[b.endpoint()], Duration::from_secs(10)).await;
        if !losses_allowed {
            // Every held lock is renewed through B well before its TTL: its
            // remaining TTL, read from B, jumps up.
            let mut last = std::collections::HashMap::new();
            let mut renewed = std::collections::HashMap::new();
            let end = Instant::now() + ttl;
            while renewed.len() < held.len() {
                for key in &keys {
                    if renewed.contains_key(key) {
                        continue;
                    }
                    if let Ok(Some(info)) = observer.describe(key.as_str()).await {
                        if let Some(before) = last.insert(key.clone(), info.ttl_remaining) {
                            if info.ttl_remaining > before + Duration::from_millis(50) {
                                renewed.insert(key.clone(), Instant::now());
                            }
                        }
                    }
                }
                assert!(
                    Instant::now() < end,
                    "a held lock was not re-attached through B within its TTL"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            moved.extend(renewed.values().map(|at| at.duration_since(cut)));
        }
        // Past A's PING deadline (at most 4 s after the last byte) with
        // margin: A has ended the old streams meanwhile.
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        for (name, key, guard, _, _) in &held {
            if guard.is_lost() {
                assert!(losses_allowed, "{name} lost {key} after moving to B");
                continue;
            }
            let info = observer
                .describe(key.as_str())
                .await
                .expect("describe")
                .expect("still held");
            assert_eq!(info.fencing_token, guard.fencing_token(), "{key}");
            resource.write(name, key, guard.fencing_token());
        }
        for (name, key, guard, _, watcher) in held.drain(..) {
            watcher.abort();
            if guard.is_lost() {
                lost_holders += 1;
                continue;
            }
            crate::give_back(&history, &name, &key, guard).await;
        }
        let errors = crew.stop().await;
        assert!(errors.is_empty(), "{errors:?}");
        drop(proxy);
    }
    let report = check(&history, &resource, Instant::now());
    eprintln!(
        "scenario 6{}: {rounds} partition(s) of {holders} holders; locks renewed through the other server {:?} after the partition; holders that lost their lock {lost_holders}; {report}",
        if losses_allowed { "b" } else { "" },
        moved
            .iter()
            .map(|d| format!("{:.3}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
    );
    report.assert_fencing_holds();
    assert!(report.overlaps.is_empty(), "{:?}", report.overlaps);
    if !losses_allowed {
        assert_eq!(report.lost, 0, "a holder or rival lost a lock");
    }
}
