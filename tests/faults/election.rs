//! Election: candidate *processes* (`client.elect`) on two servers over one
//! Redis, and a follower on each server (`client.observe`). The leader's
//! process is SIGKILLed, round after round. Checked: at most one believed
//! leader at any instant (belief = from the grant's return in the leader
//! to its kill), each new leader's term (fencing token) higher, every
//! follower sees every leader in term order, and failover — kill to the
//! next leader's grant — well under the leaders' TTL.

use super::*;

use leasehold::client::Leader;
use tokio_stream::StreamExt;

const LEADER_TTL: Duration = Duration::from_secs(10);

/// A follower's log: when it heard of each leader (`None`: nobody leads).
type Seen = Arc<Mutex<Vec<(Instant, Option<Leader>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_failover_after_a_leader_is_killed() {
    let _serial = SERIAL.lock().await;
    let kills = if full() { 8 } else { 2 };
    let url = cluster_url();
    let prefix = unique_prefix();
    let a = serve(&url, &prefix, &[]);
    let b = serve(&url, &prefix, &[]);
    let history = Arc::new(History::new());
    let resource = Arc::new(Resource::new());
    let mut hub = remote::Hub::start(history.clone(), resource.clone()).await;
    let key = "elect/leader".to_string();

    // One follower per server.
    let mut followers = Vec::new();
    for server in [&a, &b] {
        let client = sdk(&[server.endpoint()], Duration::from_secs(10)).await;
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let key = key.clone();
        let task = tokio::spawn(async move {
            let mut leaders = client.observe(key.as_str());
            while let Some(item) = leaders.next().await {
                match item {
                    Ok(leader) => log
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), leader)),
                    Err(e) => panic!("observe ended: {e}"),
                }
            }
        });
        followers.push((seen, task));
    }

    // kills + 1 candidates, half first on each server.
    let mut children = HashMap::new();
    let mut outputs = Vec::new();
    for c in 0..=kills {
        let spec = remote::Spec {
            name: format!("candidate-{c}"),
            role: "elect".into(),
            hub: hub.addr,
            endpoints: endpoints_alternating(c as u64, &a, &b),
            keys: vec![key.clone()],
            ttl: LEADER_TTL,
            shared: None,
        };
        let (child, output) = spec.spawn();
        children.insert(spec.name.clone(), child);
        outputs.push(output);
    }
    let mut remotes = Vec::new();
    for _ in 0..=kills {
        remotes.push(hub.next(Duration::from_secs(30)).await);
    }

    let leader_now = || {
        history
            .grants_of(&key)
            .into_iter()
            .filter(|w| w.end.is_none())
            .collect::<Vec<_>>()
    };
    let mut failovers = Vec::new();
    let mut kill_times = Vec::new();
    for round in 0..kills {
        let mut leaders = Vec::new();
        until("a leader", Duration::from_secs(20), || {
            leaders = leader_now();
            !leaders.is_empty()
        })
        .await;
        assert_eq!(leaders.len(), 1, "two believed leaders: {leaders:?}");
        let leader = leaders.remove(0);
        let killed_at = history.fault(format!("round {round}: SIGKILL leader {}", leader.client));
        let mut child = children
            .remove(&leader.client)
            .expect("the leader's process");
        let _ = child.kill();
        let _ = child.wait();
        history.end_all(&leader.client, killed_at, End::Killed);
        kill_times.push(killed_at);
        let next_at = until("the next leader", LEADER_TTL, || !leader_now().is_empty()).await;
        let next = leader_now();
        assert_eq!(next.len(), 1, "two believed leaders: {next:?}");
        assert!(
            next[0].fence > leader.fence,
            "term {} after {}",
            next[0].fence,
            leader.fence
        );
        let took = next[0].start.min(next_at) - killed_at;
        assert!(
            took < Duration::from_secs(3),
            "failover took {took:?} (TTL {LEADER_TTL:?})\n{}",
            outputs
                .iter()
                .flat_map(|o| o.all())
                .collect::<Vec<_>>()
                .join("\n")
        );
        failovers.push(took);
    }

    // Every leader's term, in order; each follower heard of each.
    let windows = history.grants_of(&key);
    let terms: Vec<u64> = windows.iter().map(|w| w.fence).collect();
    assert_eq!(terms.len(), kills + 1, "{windows:?}");
    let (most, when) = most_at_once(&windows, Instant::now());
    assert!(
        most <= 1,
        "{most} believed leaders at {:?} into the run",
        when.map(|w| w - history.started)
    );
    assert!(terms.windows(2).all(|t| t[0] < t[1]), "terms {terms:?}");
    let last = *terms.last().expect("a leader");
    let mut lags = Vec::new();
    for (seen, task) in &followers {
        until(
            "the followers to hear of the last leader",
            Duration::from_secs(10),
            || {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .any(|(_, l)| l.as_ref().is_some_and(|l| l.term == last))
            },
        )
        .await;
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let heard: Vec<u64> = seen
            .iter()
            .filter_map(|(_, l)| l.as_ref().map(|l| l.term))
            .collect();
        assert!(
            heard.windows(2).all(|t| t[0] < t[1]),
            "heard terms out of order: {heard:?}"
        );
        for (i, w) in windows.iter().enumerate() {
            let at = seen
                .iter()
                .find(|(_, l)| l.as_ref().is_some_and(|l| l.term == w.fence))
                .map(|(at, l)| (*at, l.clone()))
                .unwrap_or_else(|| {
                    panic!("a follower never saw term {} (heard {heard:?})", w.fence)
                });
            let leader = at.1.expect("a leader");
            assert_eq!(leader.value.as_deref(), Some(w.client.as_str()));
            // How long after the previous leader's kill this follower knew.
            if let Some(killed) = i.checked_sub(1).and_then(|k| kill_times.get(k)) {
                lags.push(at.0.saturating_duration_since(*killed));
            }
        }
        task.abort();
    }
    lags.sort();
    eprintln!(
        "election: {} candidate processes on two servers, {kills} leaders SIGKILLed; terms {terms:?}; kill → next leader {failovers:?} (TTL {LEADER_TTL:?}); followers heard of the new leader {:?} after the kill",
        kills + 1,
        lags,
    );
    drop(remotes);
}
