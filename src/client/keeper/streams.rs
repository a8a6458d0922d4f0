//! The keeper's streams: opening one, moving every lock to a new one when
//! the active one stalls (the stalled one drains until nothing depends on
//! it), and starting over when one breaks.

use super::*;

impl Keeper {
    /// A renewal on the active stream went unanswered too long: keep that
    /// stream open (ending it would release its locks) but stop using it,
    /// and open a new one to move every lock to.
    pub(super) fn stall(&mut self, cause: String) {
        // One draining stream at most: what still depends on an older one
        // is given up with it.
        self.abandon_draining("another stream stalled before its locks moved off it");
        let Some(stream) = self.stream.take() else {
            return;
        };
        let now = BootInstant::now();
        self.transport.failed(stream.endpoint);
        for entry in self.locks.values_mut() {
            entry.old_pending = entry.in_flight.is_some();
            entry.in_flight = None;
            entry.moved = false;
        }
        tracing::info!(
            endpoint = self.transport.uri(stream.endpoint),
            %cause,
            locks = self.locks.len(),
            "KeepAlive stream stalled; moving its locks to a new stream before leaving it"
        );
        self.draining = Some(stream);
        self.retry_at = None;
        self.broken_at = Some(now);
        self.reattach = None;
    }

    /// Drops the draining stream: every lock that has not moved off it is
    /// lost now, since the server releases it when that stream ends.
    pub(super) fn abandon_draining(&mut self, cause: &str) {
        let Some(old) = self.draining.take() else {
            return;
        };
        let now = BootInstant::now();
        let stuck: Vec<String> = self
            .locks
            .iter()
            .filter(|(_, e)| !e.moved)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stuck {
            if let Some(entry) = self.locks.remove(&key) {
                tracing::warn!(
                    key = key.as_str(),
                    fencing_token = entry.fencing_token,
                    cause,
                    "lock lost: leaving a stalled KeepAlive stream it was still attached to"
                );
                self.lose_and_release(key, entry, LostReason::Abandoned, now);
            }
        }
        self.resend_releases_of(old.id);
    }

    /// Drops the draining stream once no lock depends on it any more.
    pub(super) fn finish_drain(&mut self) {
        if self.draining.is_some() && self.locks.values().all(|e| e.moved) {
            if let Some(old) = self.draining.take() {
                tracing::debug!(
                    endpoint = self.transport.uri(old.endpoint),
                    "every lock moved off the stalled stream; leaving it"
                );
                self.resend_releases_of(old.id);
            }
        }
    }

    /// Releases sent on stream `id`, which is gone, go out again.
    pub(super) fn resend_releases_of(&mut self, id: u64) {
        for releasing in self.releasing.values_mut() {
            if releasing.sent == Some(id) {
                releasing.sent = None;
            }
        }
    }

    /// The stream broke: forget what was in flight on it and reconnect,
    /// starting with the next endpoint.
    pub(super) fn broken(&mut self, cause: String) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let now = BootInstant::now();
        self.transport.failed(stream.endpoint);
        for entry in self.locks.values_mut() {
            entry.in_flight = None;
        }
        self.resend_releases_of(stream.id);
        self.broken_at = Some(now);
        self.reattach = None;
        if now.saturating_duration_since(stream.opened) < Duration::from_secs(1) {
            // Streams that break as soon as they open (a server whose store
            // is down) are retried with backoff, not in a tight loop.
            self.failures += 1;
            self.retry_at = Some(now + self.backoff.next_delay());
        } else {
            self.failures = 0;
            self.backoff.reset();
            self.retry_at = None;
        }
        if self.has_work() {
            tracing::info!(
                endpoint = self.transport.uri(stream.endpoint),
                %cause,
                locks = self.locks.len(),
                "KeepAlive stream broke; reconnecting to re-attach locks"
            );
        } else {
            tracing::debug!(endpoint = self.transport.uri(stream.endpoint), %cause, "idle KeepAlive stream ended");
        }
    }

    /// Starts opening a stream on the current endpoint.
    pub(super) fn connect(&mut self) {
        let (i, channel) = self.transport.pick();
        let limit =
            self.transport.settings.connect_timeout + self.transport.settings.request_timeout;
        let id = self.next_id;
        self.next_id += 1;
        self.connecting = Some(Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut client = LockServiceClient::new(channel);
            let call = client.keep_alive(UnboundedReceiverStream::new(rx));
            let result = match tokio::time::timeout(limit, call).await {
                Ok(Ok(response)) => Ok(Stream {
                    id,
                    endpoint: i,
                    opened: BootInstant::now(),
                    tx,
                    silence: response
                        .metadata()
                        .get(SILENCE_RELEASE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_millis),
                    rx: response.into_inner(),
                    sent: HashMap::new(),
                }),
                Ok(Err(status)) => Err(status),
                Err(_) => Err(Status::unavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(limit)
                ))),
            };
            (i, result)
        }));
    }

    pub(super) fn connected(&mut self, i: usize, result: Result<Stream, Status>) {
        let now = BootInstant::now();
        match result {
            Ok(stream) => {
                tracing::debug!(endpoint = self.transport.uri(i), "KeepAlive stream open");
                // Backoff is reset only once the stream has proved healthy
                // (see `broken`).
                self.stream = Some(stream);
                self.retry_at = None;
                // Re-attach everything at once, with the same tokens.
                for entry in self.locks.values_mut() {
                    entry.next_renew = now;
                    entry.in_flight = None;
                }
                if let Some(broken_at) = self.broken_at.take() {
                    if !self.locks.is_empty() {
                        self.reattach = Some(Reattach {
                            broken_at,
                            pending: self.locks.len(),
                            ok: 0,
                        });
                    }
                }
            }
            Err(status) => {
                self.transport.failed(i);
                self.failures += 1;
                let delay = if self.failures % self.transport.len() == 0 {
                    self.backoff.next_delay()
                } else {
                    Duration::ZERO
                };
                tracing::debug!(endpoint = self.transport.uri(i), cause = %error::cause(&status), ?delay, "could not open a KeepAlive stream");
                self.retry_at = Some(now + delay);
            }
        }
    }
}
