//! The randomized run's clients: raw gRPC clients, SDK users and the
//! Describe prober, each writing what it believes into the record. Part of
//! `random.rs`.

use super::*;

// ------------------------------------------------------------ the clients

/// A way from a client to a server: direct, or through a proxy.
#[derive(Clone)]
pub(super) struct Route {
    pub(super) channel: Channel,
    pub(super) proxy: Option<usize>,
}

pub(super) fn lazy_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// A lease as a raw client holds it.
pub(super) struct Held {
    pub(super) key: String,
    pub(super) token: String,
    pub(super) fence: u64,
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    pub(super) index: usize,
}

pub(super) enum Outcome {
    Granted(pb::Lease, Instant, Instant),
    NotAcquired,
    Retryable(&'static str),
    Failed,
}

/// One raw gRPC client: Acquire (deadlines, cancels, retries with its
/// request id, duplicates), hold (Renew RPCs or a KeepAlive stream), let go
/// (Release, KeepAlive release, stream end, or expiry).
pub(super) struct Raw {
    pub(super) name: String,
    pub(super) rng: StdRng,
    pub(super) routes: Vec<Route>,
    pub(super) keys: Vec<String>,
    pub(super) rec: Arc<Record>,
}

impl Raw {
    pub(super) fn route(&mut self) -> Route {
        let i = self.rng.random_range(0..self.routes.len());
        self.routes[i].clone()
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let Some(held) = self.acquire(n).await else {
                let pause = self.rng.random_range(0..150);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            };
            self.hold(held, &stop).await;
        }
    }

    /// One Acquire with retries; the lease if one was granted.
    pub(super) async fn acquire(&mut self, n: u64) -> Option<Held> {
        let key = self.keys[self.rng.random_range(0..self.keys.len())].clone();
        let ttl_ms: u32 = self.rng.random_range(600..3000);
        let wait_ms: u32 = if self.rng.random_bool(0.4) {
            self.rng.random_range(50..2500)
        } else {
            0
        };
        let request_id = format!("{}-{n}", self.name);
        let mut first_send = None;
        for attempt in 0..4 {
            if attempt > 0 {
                bump(&self.rec.counters.request_id_retries);
            }
            let req = pb::AcquireRequest {
                key: key.clone(),
                ttl_ms,
                wait_ms,
                owner: self.name.clone(),
                request_id: request_id.clone(),
                ..Default::default()
            };
            let deadline =
                Duration::from_millis(self.rng.random_range(100..(wait_ms as u64 + 2500)));
            let cancel = self.rng.random_bool(0.1).then(|| {
                Duration::from_millis(self.rng.random_range(0..deadline.as_millis() as u64))
            });
            let duplicate = self.rng.random_bool(0.15);
            let dup_cancel = duplicate && self.rng.random_bool(0.5);
            let dup_cancel_after = Duration::from_millis(self.rng.random_range(0..30));
            let route = self.route();
            let dup_route = self.route();
            let sent = Instant::now();
            let first = *first_send.get_or_insert(sent);
            bump(&self.rec.counters.acquire_calls);
            let main = call_acquire(route.channel.clone(), req.clone(), deadline, cancel);
            let outcome = if duplicate {
                bump(&self.rec.counters.duplicates);
                let dup = call_acquire(
                    dup_route.channel.clone(),
                    req.clone(),
                    deadline,
                    dup_cancel.then_some(dup_cancel_after),
                );
                let (a, b) = tokio::join!(main, dup);
                self.merge_duplicates(&key, first, a, b)
            } else {
                main.await
            };
            match outcome {
                Outcome::Granted(lease, at, this_sent) => {
                    bump(&self.rec.counters.granted);
                    let ttl = Duration::from_millis(lease.ttl_ms.into());
                    let deadline = if lease.valid_for_ms > 0 {
                        this_sent + Duration::from_millis(lease.valid_for_ms.into())
                    } else {
                        first + ttl
                    };
                    let granted = format!(
                        "attempt {} of its request id{}{}",
                        attempt + 1,
                        if duplicate {
                            ", sent twice at once"
                        } else {
                            ""
                        },
                        if wait_ms > 0 {
                            format!(", wait_ms {wait_ms}")
                        } else {
                            String::new()
                        },
                    );
                    let index =
                        self.believe(&key, lease.fencing_token, first, at, deadline, granted);
                    return Some(Held {
                        key,
                        token: lease.token,
                        fence: lease.fencing_token,
                        ttl,
                        deadline,
                        index,
                    });
                }
                Outcome::NotAcquired => {
                    bump(&self.rec.counters.not_acquired);
                    return None;
                }
                Outcome::Retryable(what) => {
                    let c = &self.rec.counters;
                    bump(match what {
                        "deadline" => &c.deadline_exceeded,
                        "cancelled" => &c.cancelled,
                        _ => &c.unavailable,
                    });
                    if !self.rng.random_bool(0.75) {
                        return None;
                    }
                }
                Outcome::Failed => {
                    bump(&self.rec.counters.other_errors);
                    return None;
                }
            }
        }
        None
    }

    /// Two answers to one request id: the same lease (a replay), or two
    /// different grants (both believed: the checker sees the overlap).
    pub(super) fn merge_duplicates(
        &mut self,
        key: &str,
        first: Instant,
        a: Outcome,
        b: Outcome,
    ) -> Outcome {
        match (a, b) {
            (Outcome::Granted(la, ta, sa), Outcome::Granted(lb, tb, sb)) => {
                if la.token == lb.token {
                    bump(&self.rec.counters.replays_seen);
                    return Outcome::Granted(la, ta.min(tb), sa.min(sb));
                }
                // Two leases for one request id: believe the second one
                // under a name of its own until its deadline.
                let ttl = Duration::from_millis(lb.ttl_ms.into());
                let name = format!("{}/dup", self.name);
                push(
                    &self.rec.beliefs,
                    Belief {
                        client: name,
                        key: key.to_string(),
                        fence: lb.fencing_token,
                        sent: first,
                        start: tb,
                        end: first + ttl,
                        how: End::Open,
                        why: "second lease of one request id, never renewed".into(),
                        via_proxy: Vec::new(),
                        granted: "the other copy of a duplicated Acquire".into(),
                    },
                );
                Outcome::Granted(la, ta, sa)
            }
            (g @ Outcome::Granted(..), _) | (_, g @ Outcome::Granted(..)) => g,
            (Outcome::NotAcquired, _) | (_, Outcome::NotAcquired) => Outcome::NotAcquired,
            (r @ Outcome::Retryable(_), _) | (_, r @ Outcome::Retryable(_)) => r,
            _ => Outcome::Failed,
        }
    }

    pub(super) fn believe(
        &self,
        key: &str,
        fence: u64,
        sent: Instant,
        start: Instant,
        deadline: Instant,
        granted: String,
    ) -> usize {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        beliefs.push(Belief {
            client: self.name.clone(),
            key: key.into(),
            fence,
            sent,
            start,
            end: deadline,
            how: End::Open,
            why: "open".into(),
            via_proxy: Vec::new(),
            granted,
        });
        beliefs.len() - 1
    }

    pub(super) fn end_belief(&self, h: &Held, at: Instant, how: End, why: &str) {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut beliefs[h.index];
        b.end = at.min(h.deadline);
        b.how = if at >= h.deadline { End::Lost } else { how };
        b.why = if at >= h.deadline {
            "own deadline passed".into()
        } else {
            why.into()
        };
    }

    pub(super) fn via_proxy(&self, h: &Held, proxy: usize, from: Instant, to: Instant) {
        let mut beliefs = self.rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
        beliefs[h.index].via_proxy.push((proxy, from, to));
    }

    pub(super) fn deny(&self, h: &Held, what: &'static str, sent: Instant, deadline: Instant) {
        push(
            &self.rec.denials,
            Denial {
                client: self.name.clone(),
                key: h.key.clone(),
                fence: h.fence,
                what,
                sent,
                replied: Instant::now(),
                deadline,
            },
        );
    }

    /// Writes to the fenced resource while the belief lasts.
    pub(super) fn write(&self, h: &Held) {
        if Instant::now() < h.deadline {
            self.rec.resource.write(&self.name, &h.key, h.fence);
        }
    }

    pub(super) async fn hold(&mut self, mut h: Held, stop: &CancellationToken) {
        let hold_for =
            Duration::from_millis(self.rng.random_range(0..(h.ttl.as_millis() as u64 * 2)));
        let until = Instant::now() + hold_for;
        let use_stream = self.rng.random_bool(0.5);
        let mut stream = None;
        if use_stream {
            let route = self.route();
            stream = KaStream::open(&route).await;
            if stream.is_some() {
                bump(&self.rec.counters.streams);
            }
        }
        // The attach, or a race of the attach with the stream's end.
        if let Some(s) = stream.as_mut() {
            if self.rng.random_bool(0.2) {
                bump(&self.rec.counters.attach_close_races);
                let at = Instant::now();
                s.send(&h, false);
                let how = if self.rng.random_bool(0.5) {
                    "half-close"
                } else {
                    "cancel"
                };
                let closed = Instant::now();
                self.end_belief(&h, at, End::Released, &format!("attach then {how} at once"));
                if let Some(p) = s.route.proxy {
                    self.via_proxy(&h, p, at, closed);
                }
                if how == "half-close" {
                    s.tx = None;
                    // The attach was sent before the end: it must be released.
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: "attach then half-close",
                            gone_by: closed + STREAM_END_BOUND,
                            stream_end: Some(closed),
                        },
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
                }
                return;
            }
        }
        let mut attached_since: Option<Instant> = None;
        let mut confirmed = false;
        let mut next = Instant::now();
        loop {
            self.write(&h);
            let now = Instant::now();
            if now >= until || stop.is_cancelled() {
                break;
            }
            if now >= h.deadline {
                self.end_belief(&h, h.deadline, End::Lost, "own deadline passed");
                bump(&self.rec.counters.expiries);
                if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                    if let Some(p) = s.route.proxy {
                        self.via_proxy(&h, p, from, h.deadline);
                    }
                }
                return;
            }
            if now >= next {
                bump(&self.rec.counters.renewals);
                let sent = Instant::now();
                let answer = match stream.as_mut() {
                    Some(s) => {
                        attached_since.get_or_insert(sent);
                        s.renew(&h, h.deadline.saturating_duration_since(sent))
                            .await
                    }
                    None => self.renew_rpc(&h).await,
                };
                match answer {
                    Some(true) => {
                        confirmed |= stream.is_some();
                        h.deadline = h.deadline.max(sent + h.ttl);
                    }
                    Some(false) => {
                        self.deny(
                            &h,
                            if stream.is_some() {
                                "KeepAlive alive=false"
                            } else {
                                "Renew renewed=false"
                            },
                            sent,
                            h.deadline,
                        );
                        self.end_belief(&h, Instant::now(), End::Lost, "renewal denied");
                        if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                            if let Some(p) = s.route.proxy {
                                self.via_proxy(&h, p, from, Instant::now());
                            }
                        }
                        return;
                    }
                    // The stream broke or stayed silent: dropping it ends
                    // the stream, which releases what it holds, so the
                    // belief ends here.
                    None if stream.is_some() => {
                        let at = Instant::now();
                        self.end_belief(
                            &h,
                            at,
                            End::Lost,
                            "KeepAlive stream broke or stayed silent; dropped it",
                        );
                        if let (Some(s), Some(from)) = (stream.as_ref(), attached_since) {
                            if let Some(p) = s.route.proxy {
                                self.via_proxy(&h, p, from, at);
                            }
                        }
                        return;
                    }
                    // A Renew RPC that failed: the belief goes on to its deadline.
                    None => {}
                }
                next = Instant::now() + h.ttl / 3;
            }
            let step = Duration::from_millis(self.rng.random_range(20..120));
            tokio::time::sleep(step.min(until.saturating_duration_since(Instant::now()))).await;
        }
        self.let_go(h, stream, attached_since, confirmed).await;
    }

    /// Renew RPC: Some(renewed), None on error.
    pub(super) async fn renew_rpc(&mut self, h: &Held) -> Option<bool> {
        let route = self.route();
        let mut client = LockServiceClient::new(route.channel);
        let mut req = Request::new(pb::RenewRequest {
            key: h.key.clone(),
            token: h.token.clone(),
            ttl_ms: h.ttl.as_millis() as u32,
        });
        req.set_timeout(Duration::from_millis(self.rng.random_range(200..1500)));
        match tokio::time::timeout(Duration::from_secs(3), client.renew(req)).await {
            Ok(Ok(r)) => Some(r.into_inner().renewed),
            _ => None,
        }
    }

    pub(super) async fn let_go(
        &mut self,
        h: Held,
        stream: Option<KaStream>,
        attached_since: Option<Instant>,
        confirmed: bool,
    ) {
        let choice = self.rng.random_range(0..10);
        let at = Instant::now();
        let span = stream
            .as_ref()
            .and_then(|s| s.route.proxy)
            .zip(attached_since);
        let proxy_span = |this: &Self, to: Instant| {
            if let Some((p, from)) = span {
                this.via_proxy(&h, p, from, to);
            }
        };
        if at >= h.deadline {
            self.end_belief(&h, h.deadline, End::Lost, "own deadline passed");
            proxy_span(self, h.deadline);
            bump(&self.rec.counters.expiries);
            return;
        }
        match (choice, stream) {
            // Stop renewing: the lease ends with its TTL.
            (0, stream) => {
                self.end_belief(&h, h.deadline, End::Lost, "left to expire");
                proxy_span(self, h.deadline);
                bump(&self.rec.counters.expiries);
                if let Some(mut s) = stream {
                    // Detach by release would be a release; keep the
                    // stream open until the deadline instead.
                    let wait = h.deadline.saturating_duration_since(Instant::now());
                    let _ = tokio::time::timeout(wait, s.drain()).await;
                }
            }
            // End the stream: half-close, or cancel it.
            (1..=3, Some(mut s)) => {
                let half = choice != 3;
                self.end_belief(
                    &h,
                    at,
                    End::Released,
                    if half {
                        "stream half-closed"
                    } else {
                        "stream cancelled"
                    },
                );
                proxy_span(self, at);
                bump(&self.rec.counters.releases);
                if half || confirmed {
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: if half {
                                "stream half-closed"
                            } else {
                                "stream cancelled"
                            },
                            gone_by: at + STREAM_END_BOUND,
                            stream_end: Some(at),
                        },
                    );
                }
                if half {
                    s.tx = None;
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
                }
            }
            // Release over the stream.
            (4..=5, Some(mut s)) => {
                self.end_belief(&h, at, End::Released, "KeepAlive release=true");
                bump(&self.rec.counters.releases);
                s.send(&h, true);
                let r = tokio::time::timeout(Duration::from_millis(1500), s.rx.message()).await;
                proxy_span(self, Instant::now());
                if let Ok(Ok(Some(_))) = r {
                    push(
                        &self.rec.let_go,
                        LetGo {
                            client: self.name.clone(),
                            key: h.key.clone(),
                            fence: h.fence,
                            what: "KeepAlive release answered",
                            gone_by: Instant::now(),
                            stream_end: None,
                        },
                    );
                }
                // Then the stream ends (half-close).
                s.tx = None;
                let _ = tokio::time::timeout(Duration::from_secs(2), s.drain()).await;
            }
            // Release RPC, retried with the same token after an error.
            (_, stream) => {
                self.end_belief(&h, at, End::Released, "Release RPC");
                bump(&self.rec.counters.releases);
                for attempt in 0..3 {
                    let route = self.route();
                    let mut client = LockServiceClient::new(route.channel);
                    let mut req = Request::new(pb::ReleaseRequest {
                        key: h.key.clone(),
                        token: h.token.clone(),
                    });
                    req.set_timeout(Duration::from_millis(self.rng.random_range(150..1500)));
                    let sent = Instant::now();
                    match tokio::time::timeout(Duration::from_secs(3), client.release(req)).await {
                        Ok(Ok(r)) => {
                            if r.into_inner().released {
                                push(
                                    &self.rec.let_go,
                                    LetGo {
                                        client: self.name.clone(),
                                        key: h.key.clone(),
                                        fence: h.fence,
                                        what: "Release answered released=true",
                                        gone_by: Instant::now(),
                                        stream_end: None,
                                    },
                                );
                            } else {
                                self.deny(
                                    &h,
                                    if attempt == 0 {
                                        "Release released=false"
                                    } else {
                                        "retried Release released=false"
                                    },
                                    sent,
                                    h.deadline,
                                );
                            }
                            break;
                        }
                        _ => continue,
                    }
                }
                proxy_span(self, Instant::now());
                // Any stream it was attached to ends now too.
                drop(stream);
            }
        }
    }
}

/// A raw KeepAlive stream.
pub(super) struct KaStream {
    pub(super) route: Route,
    pub(super) tx: Option<mpsc::Sender<pb::KeepAliveRequest>>,
    pub(super) rx: tonic::Streaming<pb::KeepAliveResponse>,
}

impl KaStream {
    pub(super) async fn open(route: &Route) -> Option<Self> {
        let (tx, rx) = mpsc::channel(16);
        let mut client = LockServiceClient::new(route.channel.clone());
        let call = client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx));
        match tokio::time::timeout(Duration::from_millis(1500), call).await {
            Ok(Ok(r)) => Some(Self {
                route: route.clone(),
                tx: Some(tx),
                rx: r.into_inner(),
            }),
            _ => None,
        }
    }

    pub(super) fn send(&mut self, h: &Held, release: bool) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(pb::KeepAliveRequest {
                key: h.key.clone(),
                token: h.token.clone(),
                ttl_ms: h.ttl.as_millis() as u32,
                release,
            });
        }
    }

    /// One renewal: Some(alive), None if the stream broke or stayed silent.
    pub(super) async fn renew(&mut self, h: &Held, within: Duration) -> Option<bool> {
        self.send(h, false);
        let within = within.clamp(Duration::from_millis(100), Duration::from_millis(1500));
        match tokio::time::timeout(within, self.rx.message()).await {
            Ok(Ok(Some(r))) => Some(r.alive),
            _ => None,
        }
    }

    pub(super) async fn drain(&mut self) {
        while let Ok(Some(_)) = self.rx.message().await {}
    }
}

/// One Acquire call with a deadline (grpc-timeout), maybe cancelled.
pub(super) async fn call_acquire(
    channel: Channel,
    req: pb::AcquireRequest,
    deadline: Duration,
    cancel: Option<Duration>,
) -> Outcome {
    let mut client = LockServiceClient::new(channel);
    let mut request = Request::new(req);
    request.set_timeout(deadline);
    let sent = Instant::now();
    let call = client.acquire(request);
    let bound = cancel.unwrap_or(deadline + Duration::from_secs(2));
    match tokio::time::timeout(bound, call).await {
        Err(_) if cancel.is_some() => Outcome::Retryable("cancelled"),
        Err(_) => Outcome::Retryable("deadline"),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            match (r.acquired, r.lease) {
                (true, Some(lease)) => Outcome::Granted(lease, Instant::now(), sent),
                (true, None) => Outcome::Failed,
                (false, _) => Outcome::NotAcquired,
            }
        }
        Ok(Err(s)) => match s.code() {
            Code::DeadlineExceeded => Outcome::Retryable("deadline"),
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                Outcome::Retryable("unavailable")
            }
            _ => Outcome::Failed,
        },
    }
}

/// An SDK user: takes locks (sometimes cancelling the take), holds them
/// with the SDK's KeepAlive, writes while `lost()` has not fired, then
/// releases or drops the guard.
pub(super) async fn sdk_user(
    name: String,
    client: Client,
    keys: Vec<String>,
    seed: u64,
    rec: Arc<Record>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.is_cancelled() {
        let key = keys[rng.random_range(0..keys.len())].clone();
        let ttl = Duration::from_millis(rng.random_range(900..3000));
        let wait = Duration::from_millis(rng.random_range(0..2000));
        let cancel = rng
            .random_bool(0.1)
            .then(|| Duration::from_millis(rng.random_range(0..400)));
        let sent = Instant::now();
        let take = client
            .lock(key.as_str())
            .ttl(ttl)
            .wait(wait)
            .owner(name.as_str());
        let taken = match cancel {
            Some(c) => match tokio::time::timeout(c, take).await {
                Ok(r) => r,
                Err(_) => {
                    bump(&rec.counters.sdk_cancels);
                    continue;
                }
            },
            None => tokio::select! {
                r = take => r,
                _ = stop.cancelled() => break,
            },
        };
        let Ok(guard) = taken else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
            continue;
        };
        bump(&rec.counters.sdk_grants);
        let start = Instant::now();
        let fence = guard.fencing_token();
        let index = {
            let mut b = rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
            b.push(Belief {
                client: name.clone(),
                key: key.clone(),
                fence,
                sent,
                start,
                end: start,
                how: End::Open,
                why: "open".into(),
                via_proxy: Vec::new(),
                granted: format!("SDK lock(), wait {wait:?}, TTL {ttl:?}"),
            });
            b.len() - 1
        };
        let hold = Duration::from_millis(rng.random_range(0..(ttl.as_millis() as u64 * 2)));
        let until = Instant::now() + hold;
        let mut lost = guard.lost();
        let mut why = None;
        while Instant::now() < until && !stop.is_cancelled() {
            rec.resource.write(&name, &key, fence);
            tokio::select! {
                reason = &mut lost => { why = Some(reason); break }
                _ = tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))) => {}
            }
        }
        let at = Instant::now();
        {
            let mut b = rec.beliefs.lock().unwrap_or_else(|e| e.into_inner());
            let b = &mut b[index];
            b.end = at;
            match why {
                Some(reason) => {
                    b.how = End::Lost;
                    b.why = format!("SDK lost(): {reason}");
                }
                None => {
                    b.how = End::Released;
                    b.why = "SDK release".into();
                }
            }
        }
        if why.is_some() {
            bump(&rec.counters.sdk_lost);
            continue;
        }
        if rng.random_bool(0.5) {
            if let Ok(Ok(true)) =
                tokio::time::timeout(Duration::from_secs(5), guard.release()).await
            {
                push(
                    &rec.let_go,
                    LetGo {
                        client: name.clone(),
                        key: key.clone(),
                        fence,
                        what: "SDK release() answered true",
                        gone_by: Instant::now(),
                        stream_end: None,
                    },
                );
            }
        } else {
            // The keeper releases it over its stream: gone within the bound
            // unless a fault got in the way.
            drop(guard);
            let at = Instant::now();
            push(
                &rec.let_go,
                LetGo {
                    client: name.clone(),
                    key: key.clone(),
                    fence,
                    what: "SDK guard dropped",
                    gone_by: at + STREAM_END_BOUND,
                    stream_end: Some(at),
                },
            );
        }
    }
}

/// Describes every key in turn until `stop`.
pub(super) async fn prober(
    channels: Vec<Channel>,
    keys: Vec<String>,
    rec: Arc<Record>,
    stop: CancellationToken,
) {
    let mut i = 0usize;
    while !stop.is_cancelled() {
        let key = keys[i % keys.len()].clone();
        let mut client = LockServiceClient::new(channels[i % channels.len()].clone());
        i += 1;
        let mut req = Request::new(pb::DescribeRequest { key: key.clone() });
        req.set_timeout(Duration::from_millis(500));
        let sent = Instant::now();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.describe(req)).await
        {
            let r = r.into_inner();
            bump(&rec.counters.describes);
            push(
                &rec.observations,
                Observation {
                    key,
                    sent,
                    replied: Instant::now(),
                    held: r.held.then_some(r.fencing_token),
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}
