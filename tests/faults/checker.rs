//! The history of a fault scenario and its checker.
//!
//! Clients record every grant (when they asked, when the answer came, the
//! fencing token) and the end of the time they believed they held the lock
//! (they released it, learned it was lost, or were killed). A protected
//! [`Resource`] accepts a write only if its fencing token is at least the
//! highest it has seen, as Kleppmann describes fencing. [`check`] turns
//! both into a [`Report`]: grants, releases, faults, overlapping validity
//! windows (and how long they lasted), stale writes rejected, writes
//! accepted out of order, and fencing tokens that failed to increase.
//!
//! Every time is an `Instant` of the test process: events of client
//! processes are stamped when they reach it, so there is one clock.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a validity window ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The holder was about to release it (the window closes before the
    /// Release is sent, so a correct store never shows an overlap).
    Released,
    /// The holder learned that it had lost the lock (`lost()` fired).
    Lost,
    /// The holder's process was killed.
    Killed,
    /// The scenario ended while it was held.
    Open,
}

/// One grant and the time its holder believed it held the lock.
#[derive(Debug, Clone)]
pub struct Window {
    pub client: String,
    pub key: String,
    pub fence: u64,
    /// When the Acquire was sent (the grant happened after this).
    pub sent: Instant,
    /// When the holder got the grant.
    pub start: Instant,
    /// When it stopped believing it held the lock (None: still open).
    pub end: Option<(Instant, End)>,
}

/// A write the resource saw.
#[derive(Debug, Clone)]
pub struct Write {
    pub at: Instant,
    pub client: String,
    pub key: String,
    pub fence: u64,
    pub accepted: bool,
}

/// Everything clients reported during a scenario.
pub struct History {
    pub started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    windows: Vec<Window>,
    faults: Vec<(Instant, String)>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `client` got `key` with `fence`; it asked at `sent`. A second grant
    /// of the same lease to the same client (a retried Acquire answered
    /// by request id) is the same window.
    pub fn grant(&self, client: &str, key: &str, fence: u64, sent: Instant, at: Instant) {
        let mut inner = self.lock();
        let same = inner
            .windows
            .iter()
            .any(|w| w.client == client && w.key == key && w.fence == fence);
        if !same {
            inner.windows.push(Window {
                client: client.into(),
                key: key.into(),
                fence,
                sent,
                start: at,
                end: None,
            });
        }
    }

    /// `client` stopped believing it holds `key`'s lease `fence`.
    pub fn end(&self, client: &str, key: &str, fence: u64, at: Instant, how: End) {
        let mut inner = self.lock();
        if let Some(w) = inner
            .windows
            .iter_mut()
            .find(|w| w.client == client && w.key == key && w.fence == fence && w.end.is_none())
        {
            w.end = Some((at, how));
        }
    }

    /// Every window `client` still has open ends now with `how` (its
    /// process was killed, say).
    pub fn end_all(&self, client: &str, at: Instant, how: End) {
        for w in self.lock().windows.iter_mut() {
            if w.client == client && w.end.is_none() {
                w.end = Some((at, how));
            }
        }
    }

    /// A fault was injected.
    pub fn fault(&self, what: impl Into<String>) -> Instant {
        let at = Instant::now();
        self.lock().faults.push((at, what.into()));
        at
    }

    pub fn windows(&self) -> Vec<Window> {
        self.lock().windows.clone()
    }

    pub fn faults(&self) -> Vec<(Instant, String)> {
        self.lock().faults.clone()
    }

    /// Grants of `key` that `client` got, in order.
    pub fn grants_of(&self, key: &str) -> Vec<Window> {
        let mut w: Vec<Window> = self
            .windows()
            .into_iter()
            .filter(|w| w.key == key)
            .collect();
        w.sort_by_key(|w| w.start);
        w
    }
}

/// A protected resource: accepts a write only if its fencing token is at
/// least the highest it has seen for that key.
#[derive(Default)]
pub struct Resource {
    inner: Mutex<ResourceInner>,
}

#[derive(Default)]
struct ResourceInner {
    highest: HashMap<String, u64>,
    log: Vec<Write>,
}

impl Resource {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes to `key` with `fence`; false: rejected as stale.
    pub fn write(&self, client: &str, key: &str, fence: u64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let highest = inner.highest.get(key).copied().unwrap_or(0);
        let accepted = fence >= highest;
        if accepted {
            inner.highest.insert(key.to_string(), fence);
        }
        inner.log.push(Write {
            at: Instant::now(),
            client: client.into(),
            key: key.into(),
            fence,
            accepted,
        });
        accepted
    }

    pub fn log(&self) -> Vec<Write> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .clone()
    }
}

/// Two windows of one key that were open at the same time.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub key: String,
    /// (client, fence) of the earlier and the later grant.
    pub first: (String, u64),
    pub second: (String, u64),
    pub duration: Duration,
}

/// What a scenario's history shows.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub grants: usize,
    pub releases: usize,
    pub lost: usize,
    pub killed: usize,
    pub faults: Vec<String>,
    pub overlaps: Vec<Overlap>,
    /// Grants whose fencing token was not larger than that of the grant
    /// before it (in the order holders got them).
    pub fence_regressions: Vec<String>,
    pub writes_accepted: usize,
    pub stale_rejected: usize,
    /// Accepted writes whose token was smaller than one accepted before.
    pub accepted_out_of_order: usize,
    /// Rejected writes whose token was in fact not stale: a resource bug.
    pub wrongly_rejected: usize,
}

impl Report {
    pub fn max_overlap(&self) -> Duration {
        self.overlaps
            .iter()
            .map(|o| o.duration)
            .max()
            .unwrap_or_default()
    }

    pub fn total_overlap(&self) -> Duration {
        self.overlaps.iter().map(|o| o.duration).sum()
    }

    /// The safety properties that hold under every fault: tokens increase
    /// per key, and the resource never takes a write out of order.
    #[track_caller]
    pub fn assert_fencing_holds(&self) {
        assert!(
            self.fence_regressions.is_empty(),
            "fencing tokens did not increase: {:?}",
            self.fence_regressions
        );
        assert_eq!(
            self.accepted_out_of_order, 0,
            "writes accepted out of order"
        );
        assert_eq!(self.wrongly_rejected, 0, "writes rejected though not stale");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grants {} releases {} lost {} killed {} faults {} | overlaps {} (max {:?}, total {:?}) | writes accepted {} stale rejected {} accepted out of order {} | fence regressions {}",
            self.grants,
            self.releases,
            self.lost,
            self.killed,
            self.faults.len(),
            self.overlaps.len(),
            self.max_overlap(),
            self.total_overlap(),
            self.writes_accepted,
            self.stale_rejected,
            self.accepted_out_of_order,
            self.fence_regressions.len(),
        )
    }
}

/// Checks a history and the resource's log; windows still open are
/// closed at `now`.
pub fn check(history: &History, resource: &Resource, now: Instant) -> Report {
    let windows = history.windows();
    let mut report = Report {
        grants: windows.len(),
        faults: history.faults().into_iter().map(|(_, f)| f).collect(),
        ..Report::default()
    };
    let mut by_key: BTreeMap<&str, Vec<&Window>> = BTreeMap::new();
    for w in &windows {
        match w.end.map(|(_, how)| how) {
            Some(End::Released) => report.releases += 1,
            Some(End::Lost) => report.lost += 1,
            Some(End::Killed) => report.killed += 1,
            _ => {}
        }
        by_key.entry(&w.key).or_default().push(w);
    }
    for (key, mut ws) in by_key {
        ws.sort_by_key(|w| w.start);
        // Tokens strictly increase in the order holders got them.
        for pair in ws.windows(2) {
            if pair[1].fence <= pair[0].fence {
                report.fence_regressions.push(format!(
                    "{key}: {} got {} after {} got {}",
                    pair[1].client, pair[1].fence, pair[0].client, pair[0].fence
                ));
            }
        }
        // Overlapping validity windows.
        let end = |w: &Window| w.end.map(|(t, _)| t).unwrap_or(now);
        for (i, a) in ws.iter().enumerate() {
            for b in &ws[i + 1..] {
                if b.start >= end(a) {
                    continue;
                }
                let overlap = end(a).min(end(b)).saturating_duration_since(b.start);
                if !overlap.is_zero() {
                    report.overlaps.push(Overlap {
                        key: key.to_string(),
                        first: (a.client.clone(), a.fence),
                        second: (b.client.clone(), b.fence),
                        duration: overlap,
                    });
                }
            }
        }
    }
    // Replay the resource's log on its own.
    let mut highest: HashMap<&str, u64> = HashMap::new();
    let log = resource.log();
    for w in &log {
        let top = highest.get(w.key.as_str()).copied().unwrap_or(0);
        if w.accepted {
            report.writes_accepted += 1;
            if w.fence < top {
                report.accepted_out_of_order += 1;
            }
            highest.insert(&w.key, top.max(w.fence));
        } else {
            report.stale_rejected += 1;
            if w.fence >= top {
                report.wrongly_rejected += 1;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn a_clean_sequential_history_passes() {
        let h = History::new();
        let r = Resource::new();
        let t = Instant::now();
        for (i, (start, end)) in [(0, 10), (10, 20), (25, 40)].into_iter().enumerate() {
            let c = format!("c{i}");
            h.grant(&c, "k", 100 + i as u64, at(t, start), at(t, start));
            assert!(r.write(&c, "k", 100 + i as u64));
            h.end(&c, "k", 100 + i as u64, at(t, end), End::Released);
        }
        let report = check(&h, &r, at(t, 50));
        assert_eq!(report.grants, 3);
        assert_eq!(report.releases, 3);
        assert!(report.overlaps.is_empty(), "{report}");
        assert_eq!(report.stale_rejected, 0);
        report.assert_fencing_holds();
    }

    #[test]
    fn catches_a_constructed_overlap() {
        let h = History::new();
        let r = Resource::new();
        let t = Instant::now();
        // a believes it holds k until 300 ms (it was paused); b got it at 100 ms.
        h.grant("a", "k", 1, t, t);
        h.grant("b", "k", 2, at(t, 90), at(t, 100));
        h.end("a", "k", 1, at(t, 300), End::Lost);
        h.end("b", "k", 2, at(t, 400), End::Released);
        // A third that never ended is closed at `now`: overlaps nobody.
        h.grant("c", "k", 3, at(t, 500), at(t, 500));
        let report = check(&h, &r, at(t, 600));
        assert_eq!(report.overlaps.len(), 1, "{report}");
        let o = &report.overlaps[0];
        assert_eq!(o.first, ("a".to_string(), 1));
        assert_eq!(o.second, ("b".to_string(), 2));
        assert_eq!(o.duration, Duration::from_millis(200));
        assert_eq!(report.max_overlap(), Duration::from_millis(200));
        assert_eq!(report.lost, 1);
        report.assert_fencing_holds();
    }

    #[test]
    fn catches_a_stale_write_and_counts_it() {
        let h = History::new();
        let r = Resource::new();
        assert!(r.write("new", "k", 20));
        assert!(r.write("new", "k", 20), "the holder may write again");
        assert!(!r.write("old", "k", 10), "an older token is stale");
        assert!(r.write("x", "other", 5), "keys are fenced separately");
        let report = check(&h, &r, Instant::now());
        assert_eq!(report.writes_accepted, 3);
        assert_eq!(report.stale_rejected, 1);
        report.assert_fencing_holds();
    }

    #[test]
    fn catches_fencing_tokens_that_do_not_increase() {
        let h = History::new();
        let r = Resource::new();
        let t = Instant::now();
        h.grant("a", "k", 50, t, t);
        h.end("a", "k", 50, at(t, 10), End::Released);
        h.grant("b", "k", 50, at(t, 20), at(t, 20));
        h.end("b", "k", 50, at(t, 30), End::Released);
        h.grant("c", "k", 40, at(t, 40), at(t, 40));
        let report = check(&h, &r, at(t, 50));
        assert_eq!(report.fence_regressions.len(), 2, "{report}");
        assert!(report.fence_regressions[0].contains("b got 50 after a got 50"));
    }

    #[test]
    fn the_replay_catches_a_resource_that_accepts_out_of_order() {
        // Forge a log as a broken resource would leave it.
        let r = Resource::new();
        {
            let mut inner = r.inner.lock().unwrap();
            for (fence, accepted) in [(10, true), (5, true), (20, true), (15, false), (30, false)] {
                inner.log.push(Write {
                    at: Instant::now(),
                    client: "c".into(),
                    key: "k".into(),
                    fence,
                    accepted,
                });
            }
        }
        let report = check(&History::new(), &r, Instant::now());
        assert_eq!(report.accepted_out_of_order, 1);
        assert_eq!(report.wrongly_rejected, 1);
        assert_eq!(report.stale_rejected, 2);
    }

    #[test]
    fn the_same_lease_granted_twice_to_its_client_is_one_window() {
        let h = History::new();
        let t = Instant::now();
        h.grant("a", "k", 7, t, t);
        h.grant("a", "k", 7, t, at(t, 5));
        assert_eq!(h.windows().len(), 1);
        h.end_all("a", at(t, 9), End::Killed);
        let report = check(&h, &Resource::new(), at(t, 10));
        assert_eq!(report.killed, 1);
        assert!(report.overlaps.is_empty());
    }
}

/// The most of `windows` believed at the same instant (a window still open
/// counts until `now`), and when that was first reached. For a semaphore
/// of N this must be at most N; for an exclusive lock, one.
pub fn most_at_once(windows: &[Window], now: Instant) -> (usize, Option<Instant>) {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for w in windows {
        let end = w.end.map_or(now, |(at, _)| at);
        edges.push((w.start, 1));
        edges.push((end.max(w.start), -1));
    }
    // At one instant, a window that ended makes room before one starts.
    edges.sort_by_key(|&(at, delta)| (at, delta));
    let (mut now_in, mut most, mut when) = (0i32, 0i32, None);
    for (at, delta) in edges {
        now_in += delta;
        if now_in > most {
            most = now_in;
            when = Some(at);
        }
    }
    (usize::try_from(most).unwrap_or(0), when)
}

/// Grants out of fencing order: `b` asked after `a`'s grant reached its
/// holder, so `b` was granted later and must have the larger fencing token.
pub fn fence_order_violations(windows: &[Window]) -> Vec<String> {
    let mut bad = Vec::new();
    for a in windows {
        for b in windows {
            if a.key == b.key && a.start < b.sent && a.fence >= b.fence {
                bad.push(format!(
                    "{} got {} fence {} before {} asked, yet {} got fence {}",
                    a.client, a.key, a.fence, b.client, b.client, b.fence
                ));
            }
        }
    }
    bad
}

#[test]
fn most_at_once_and_fence_order_catch_what_they_must() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let w = |client: &str, fence: u64, sent: u64, start: u64, end: u64| Window {
        client: client.into(),
        key: "k".into(),
        fence,
        sent: ms(sent),
        start: ms(start),
        end: Some((ms(end), End::Released)),
    };
    // Two overlap, a third starts as the first ends (room made first).
    let windows = vec![
        w("a", 1, 0, 1, 10),
        w("b", 2, 0, 5, 20),
        w("c", 3, 9, 10, 30),
    ];
    assert_eq!(most_at_once(&windows, ms(40)).0, 2);
    assert!(fence_order_violations(&windows).is_empty());
    // c asked after a's grant arrived, yet got a smaller fence.
    let bad = vec![w("a", 5, 0, 1, 10), w("c", 3, 2, 3, 30)];
    assert_eq!(fence_order_violations(&bad).len(), 1);
}
