//! The randomized run's record (beliefs, denials, leases let go of,
//! Describe answers, faults) and its judge, which turns the record into
//! violations. Part of `random.rs`.

use super::*;

// ------------------------------------------------------------ the record

/// One client's belief that it holds one lease.
#[derive(Debug, Clone)]
pub struct Belief {
    pub client: String,
    pub key: String,
    pub fence: u64,
    /// First send of the Acquire's request id.
    pub sent: Instant,
    /// The reply that granted it.
    pub start: Instant,
    /// When the belief ended and why.
    pub end: Instant,
    pub how: End,
    pub why: String,
    /// Spans in which the lease was attached to a KeepAlive stream that
    /// ran through proxy `.0` (a cut of that proxy ends the stream, which
    /// may release the lease).
    pub via_proxy: Vec<(usize, Instant, Instant)>,
    /// How it was granted (attempts of its request id, a duplicate, a wait).
    pub granted: String,
}

/// A server's answer that a lease no longer holds its lock.
#[derive(Debug, Clone)]
pub(super) struct Denial {
    pub(super) client: String,
    pub(super) key: String,
    pub(super) fence: u64,
    pub(super) what: &'static str,
    pub(super) sent: Instant,
    pub(super) replied: Instant,
    /// The holder's own deadline when it sent the request.
    pub(super) deadline: Instant,
}

/// A lease its holder let go of, which must then be gone.
#[derive(Debug, Clone)]
pub(super) struct LetGo {
    pub(super) client: String,
    pub(super) key: String,
    pub(super) fence: u64,
    pub(super) what: &'static str,
    /// From this instant on, Describe must not show the lease.
    pub(super) gone_by: Instant,
    /// The stream end, for excluding faults (None: a Release answered true).
    pub(super) stream_end: Option<Instant>,
}

/// One Describe answer.
#[derive(Debug, Clone)]
pub(super) struct Observation {
    pub(super) key: String,
    pub(super) sent: Instant,
    pub(super) replied: Instant,
    pub(super) held: Option<u64>,
}

/// An injected fault, from start to end.
#[derive(Debug, Clone)]
pub(super) struct Fault {
    pub(super) start: Instant,
    pub(super) end: Instant,
    pub(super) what: String,
    pub(super) proxy_cut: Option<usize>,
}

/// A safety violation, for the report.
#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: &'static str,
    pub key: String,
    pub detail: String,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) acquire_calls: AtomicU64,
    pub(super) granted: AtomicU64,
    pub(super) not_acquired: AtomicU64,
    pub(super) deadline_exceeded: AtomicU64,
    pub(super) unavailable: AtomicU64,
    pub(super) other_errors: AtomicU64,
    pub(super) cancelled: AtomicU64,
    pub(super) request_id_retries: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) replays_seen: AtomicU64,
    pub(super) renewals: AtomicU64,
    pub(super) streams: AtomicU64,
    pub(super) attach_close_races: AtomicU64,
    pub(super) releases: AtomicU64,
    pub(super) expiries: AtomicU64,
    pub(super) describes: AtomicU64,
    pub(super) sdk_grants: AtomicU64,
    pub(super) sdk_lost: AtomicU64,
    pub(super) sdk_cancels: AtomicU64,
    /// Leases let go of that the judge checked, and skipped (a fault in the span).
    pub(super) let_go_checked: AtomicU64,
    pub(super) let_go_skipped: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Everything the run records.
#[derive(Default)]
pub(super) struct Record {
    pub(super) beliefs: Mutex<Vec<Belief>>,
    pub(super) denials: Mutex<Vec<Denial>>,
    pub(super) let_go: Mutex<Vec<LetGo>>,
    pub(super) observations: Mutex<Vec<Observation>>,
    pub(super) faults: Mutex<Vec<Fault>>,
    pub(super) counters: Counters,
    pub(super) resource: Resource,
}

pub(super) fn push<T>(v: &Mutex<Vec<T>>, t: T) {
    v.lock().unwrap_or_else(|e| e.into_inner()).push(t);
}

pub(super) fn all<T: Clone>(v: &Mutex<Vec<T>>) -> Vec<T> {
    v.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ------------------------------------------------------------ the judge

/// The belief's end, moved earlier to the first cut of a proxy its
/// KeepAlive stream ran through (the stream's end may have released it).
pub(super) fn effective_end(b: &Belief, faults: &[Fault]) -> (Instant, String) {
    let mut end = (b.end, b.why.clone());
    for (p, from, to) in &b.via_proxy {
        for f in faults {
            if f.proxy_cut == Some(*p) && f.start >= *from && f.start < *to && f.start < end.0 {
                end = (f.start, format!("connection cut ({})", f.what));
            }
        }
    }
    end
}

pub(super) fn t(base: Instant, at: Instant) -> String {
    format!("{:.3}s", at.saturating_duration_since(base).as_secs_f64())
}

/// Judges the record: every violation, described.
pub(super) fn judge(
    rec: &Record,
    base: Instant,
    now: Instant,
) -> (Vec<Violation>, crate::checker::Report) {
    let faults = all(&rec.faults);
    let beliefs: Vec<Belief> = all(&rec.beliefs)
        .into_iter()
        .map(|mut b| {
            let (end, why) = effective_end(&b, &faults);
            b.end = end.min(now);
            b.why = why;
            b
        })
        .collect();
    let mut violations = Vec::new();

    // Overlaps and fencing, by the shared checker.
    let history = History::new();
    for (i, b) in beliefs.iter().enumerate() {
        // A grant whose reply came after the client's own deadline was
        // never believed: it claims nothing, not even its place in the
        // order of fencing tokens.
        if b.end <= b.start {
            continue;
        }
        // One window per belief, named so each is its own.
        let client = format!("{}#{i}", b.client);
        history.grant(&client, &b.key, b.fence, b.sent, b.start);
        history.end(&client, &b.key, b.fence, b.end.max(b.start), b.how);
    }
    let report = check(&history, &rec.resource, now);
    let describe = |client: &str| -> String {
        let i: usize = client
            .rsplit('#')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        describe_belief(base, &beliefs[i])
    };
    for o in &report.overlaps {
        violations.push(Violation {
            kind: "overlap",
            key: o.key.clone(),
            detail: format!(
                "{} and {} overlap for {:?}",
                describe(&o.first.0),
                describe(&o.second.0),
                o.duration
            ),
        });
    }
    for f in &report.fence_regressions {
        // "key: later#i got F after earlier#j got G": name both beliefs.
        let named: Vec<String> = f
            .split_whitespace()
            .filter(|w| w.contains('#'))
            .map(&describe)
            .collect();
        violations.push(Violation {
            kind: "fencing token did not increase",
            key: f.split(':').next().unwrap_or_default().to_string(),
            detail: format!("{f}: {}", named.join(" after ")),
        });
    }
    let find = |client: &str, key: &str, fence: u64| {
        beliefs
            .iter()
            .find(|b| b.client == client && b.key == key && b.fence == fence)
    };

    // Denials while the holder still believed.
    for d in all(&rec.denials) {
        let Some(b) = find(&d.client, &d.key, d.fence) else {
            continue;
        };
        let cut_end = effective_end(
            &Belief {
                end: d.replied,
                ..b.clone()
            },
            &faults,
        )
        .0;
        let retried = d.what.starts_with("retried");
        let before_own_end = d.replied + MARGIN < d.deadline && cut_end >= d.replied;
        if before_own_end {
            violations.push(Violation {
                kind: if retried {
                    "retried release lied"
                } else if d.what.starts_with("Release") {
                    // Taken before, or a release that lies about itself.
                    "release answered not held while held"
                } else {
                    "taken from holder"
                },
                key: d.key.clone(),
                detail: format!(
                    "{} fence {} (first sent {}, {}, granted {}): a request sent at {} was answered {} at {}, {:?} before the holder's own deadline {}",
                    d.client,
                    d.fence,
                    t(base, b.sent),
                    b.granted,
                    t(base, b.start),
                    t(base, d.sent),
                    d.what,
                    t(base, d.replied),
                    d.deadline - d.replied,
                    t(base, d.deadline),
                ),
            });
        }
    }

    // Describe while a holder believed: it must show the holder's lease.
    let observations = all(&rec.observations);
    let mut by_key: HashMap<&str, Vec<&Observation>> = HashMap::new();
    for o in &observations {
        by_key.entry(o.key.as_str()).or_default().push(o);
    }
    for b in &beliefs {
        let wrong: Vec<&&Observation> = by_key
            .get(b.key.as_str())
            .map(|v| {
                v.iter()
                    .filter(|o| {
                        o.sent >= b.start && o.replied + MARGIN <= b.end && o.held != Some(b.fence)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(first) = wrong.first() {
            violations.push(Violation {
                kind: "taken from holder",
                key: b.key.clone(),
                detail: format!(
                    "{}; Describe at {} answered {} ({} such answers before the belief ended)",
                    describe_belief(base, b),
                    t(base, first.replied),
                    match first.held {
                        Some(f) => format!("held by fence {f}"),
                        None => "free".into(),
                    },
                    wrong.len()
                ),
            });
        }
    }

    // Leases let go of must be gone.
    for g in all(&rec.let_go) {
        if let Some(end) = g.stream_end {
            let faulty = faults
                .iter()
                .any(|f| f.start <= g.gone_by && f.end + STREAM_END_BOUND >= end);
            if faulty {
                bump(&rec.counters.let_go_skipped);
                continue;
            }
        }
        bump(&rec.counters.let_go_checked);
        let late: Vec<&&Observation> = by_key
            .get(g.key.as_str())
            .map(|v| {
                v.iter()
                    .filter(|o| o.sent > g.gone_by && o.held == Some(g.fence))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(first) = late.first() {
            violations.push(Violation {
                kind: "left behind",
                key: g.key.clone(),
                detail: format!(
                    "{} fence {}: {}; must be gone by {}, Describe at {} still shows it ({} such answers)",
                    g.client,
                    g.fence,
                    g.what,
                    t(base, g.gone_by),
                    t(base, first.replied),
                    late.len()
                ),
            });
        }
    }

    // Fencing tokens as Describe saw them, in order, per key.
    for (key, obs) in &by_key {
        let mut top = 0u64;
        for o in obs {
            if let Some(f) = o.held {
                if f < top {
                    violations.push(Violation {
                        kind: "fencing token did not increase",
                        key: key.to_string(),
                        detail: format!(
                            "Describe at {} shows fence {f} after {top}",
                            t(base, o.replied)
                        ),
                    });
                }
                top = top.max(f);
            }
        }
    }
    (violations, report)
}

pub(super) fn describe_belief(base: Instant, b: &Belief) -> String {
    format!(
        "{} fence {} (first sent {}, {}) believed [{} .. {}] ({})",
        b.client,
        b.fence,
        t(base, b.sent),
        b.granted,
        t(base, b.start),
        t(base, b.end),
        b.why
    )
}

// ------------------------------------------------------------ the judge, tested

#[cfg(test)]
mod judge_tests {
    use super::*;

    fn ms(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn belief(client: &str, fence: u64, base: Instant, from: u64, to: u64, how: End) -> Belief {
        Belief {
            client: client.into(),
            key: "k".into(),
            fence,
            sent: ms(base, from.saturating_sub(5)),
            start: ms(base, from),
            end: ms(base, to),
            how,
            why: "test".into(),
            via_proxy: Vec::new(),
            granted: "test".into(),
        }
    }

    fn observe(rec: &Record, base: Instant, at: u64, held: Option<u64>) {
        push(
            &rec.observations,
            Observation {
                key: "k".into(),
                sent: ms(base, at),
                replied: ms(base, at + 1),
                held,
            },
        );
    }

    fn kinds(v: &[Violation]) -> Vec<&'static str> {
        let mut k: Vec<_> = v.iter().map(|v| v.kind).collect();
        k.sort();
        k
    }

    #[test]
    fn a_clean_history_has_no_violation() {
        let base = Instant::now();
        let rec = Record::default();
        push(&rec.beliefs, belief("a", 10, base, 0, 500, End::Released));
        push(&rec.beliefs, belief("b", 20, base, 600, 900, End::Released));
        observe(&rec, base, 100, Some(10));
        observe(&rec, base, 550, None);
        observe(&rec, base, 700, Some(20));
        observe(&rec, base, 1000, None);
        push(
            &rec.let_go,
            LetGo {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Release answered released=true",
                gone_by: ms(base, 510),
                stream_end: None,
            },
        );
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn catches_each_kind() {
        let base = Instant::now();
        let rec = Record::default();
        // a believes until 1000; b is granted at 400 with a larger fence.
        push(&rec.beliefs, belief("a", 10, base, 0, 1000, End::Released));
        push(&rec.beliefs, belief("b", 20, base, 400, 600, End::Released));
        // Describe saw b's lease during a's belief.
        observe(&rec, base, 450, Some(20));
        // a's renewal was denied at 700, before its own deadline 1000.
        push(
            &rec.denials,
            Denial {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Renew renewed=false",
                sent: ms(base, 699),
                replied: ms(base, 700),
                deadline: ms(base, 1000),
            },
        );
        // b released at 600 (answered), yet Describe shows it at 800.
        push(
            &rec.let_go,
            LetGo {
                client: "b".into(),
                key: "k".into(),
                fence: 20,
                what: "Release answered released=true",
                gone_by: ms(base, 601),
                stream_end: None,
            },
        );
        observe(&rec, base, 800, Some(20));
        // A later Describe goes back to an older fence.
        observe(&rec, base, 900, Some(15));
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert_eq!(
            kinds(&v),
            [
                "fencing token did not increase",
                "left behind",
                "overlap",
                "taken from holder",
                "taken from holder",
            ],
            "{v:?}"
        );
    }

    #[test]
    fn a_cut_stream_ends_the_belief() {
        let base = Instant::now();
        let rec = Record::default();
        // a's stream ran through proxy 0 from 0 to 1000; the proxy was cut at
        // 300 (the stream's end may release); b was granted at 400.
        let mut a = belief("a", 10, base, 0, 1000, End::Released);
        a.via_proxy.push((0, ms(base, 0), ms(base, 1000)));
        push(&rec.beliefs, a);
        push(&rec.beliefs, belief("b", 20, base, 400, 600, End::Released));
        push(
            &rec.faults,
            Fault {
                start: ms(base, 300),
                end: ms(base, 350),
                what: "cut proxy 0".into(),
                proxy_cut: Some(0),
            },
        );
        push(
            &rec.denials,
            Denial {
                client: "a".into(),
                key: "k".into(),
                fence: 10,
                what: "Renew renewed=false",
                sent: ms(base, 699),
                replied: ms(base, 700),
                deadline: ms(base, 1000),
            },
        );
        observe(&rec, base, 450, Some(20));
        let (v, _) = judge(&rec, base, ms(base, 2000));
        assert!(v.is_empty(), "{v:?}");
    }
}
