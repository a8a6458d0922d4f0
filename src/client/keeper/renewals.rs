//! The keeper's renewals: sending what is due on the active stream, and
//! what each answer means for the lock it is about.

use super::*;

impl Keeper {
    /// Sends every renewal that is due and every release not yet sent.
    pub(super) fn send_due(&mut self, now: BootInstant) {
        let draining = self.draining.is_some();
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if stream.tx.is_closed() {
            // The call is over (its end is on its way on the response
            // side); do not spin on a stream that takes nothing.
            self.broken("the stream closed".into());
            return;
        }
        for (key, entry) in &mut self.locks {
            // A lock still depending on the draining stream moves as soon
            // as nothing of it is pending there.
            let move_now = draining && !entry.moved && !entry.old_pending;
            if entry.in_flight.is_none() && (entry.next_renew <= now || move_now) {
                let request = pb::KeepAliveRequest {
                    key: key.clone(),
                    token: entry.token.clone(),
                    ttl_ms: 0,
                    release: false,
                };
                if stream.tx.send(request).is_ok() {
                    entry.in_flight = Some(now);
                    stream
                        .sent
                        .entry(key.clone())
                        .or_default()
                        .push_back(Sent::Renew {
                            token: entry.token.clone(),
                            at: now,
                            clean: !entry.old_pending,
                        });
                }
            }
        }
        for ((key, token), releasing) in &mut self.releasing {
            if releasing.sent.is_none() {
                let request = pb::KeepAliveRequest {
                    key: key.clone(),
                    token: token.clone(),
                    ttl_ms: 0,
                    release: true,
                };
                if stream.tx.send(request).is_ok() {
                    releasing.sent = Some(stream.id);
                    stream
                        .sent
                        .entry(key.clone())
                        .or_default()
                        .push_back(Sent::Release {
                            token: token.clone(),
                        });
                }
            }
        }
    }

    /// Applies one answer from the server, on the active stream or (`old`)
    /// the draining one.
    pub(super) fn response(&mut self, response: pb::KeepAliveResponse, old: bool) {
        let now = BootInstant::now();
        let stream = if old {
            self.draining.as_mut()
        } else {
            self.stream.as_mut()
        };
        let Some(stream) = stream else {
            return;
        };
        let silence = stream.silence;
        let key = response.key;
        let Some(queue) = stream.sent.get_mut(&key) else {
            tracing::debug!(
                key = key.as_str(),
                "KeepAlive answer for nothing sent; ignored"
            );
            return;
        };
        let sent = queue.pop_front();
        if queue.is_empty() {
            stream.sent.remove(&key);
        }
        match sent {
            None => {}
            Some(Sent::Release { token }) => {
                self.releasing.remove(&(key, token));
            }
            Some(Sent::Renew { token, at, clean }) => {
                let Some(entry) = self.locks.get_mut(&key) else {
                    return;
                };
                if entry.token != token {
                    return;
                }
                if old {
                    entry.old_pending = false;
                } else {
                    entry.in_flight = None;
                    if let Some(r) = self.reattach.as_mut() {
                        r.pending = r.pending.saturating_sub(1);
                    }
                }
                if now >= entry.until() {
                    // Too late: lost() may already have fired on the clock,
                    // and a lost lock never comes back.
                    return;
                }
                if response.alive {
                    if response.ttl_ms > 0 {
                        entry.ttl = Duration::from_millis(response.ttl_ms.into());
                    }
                    // The renewal reached the store after it was sent.
                    let until = at + entry.ttl;
                    entry.deadline = if entry.known {
                        entry.deadline.max(until)
                    } else {
                        until
                    };
                    entry.known = true;
                    entry.attached = true;
                    if !old {
                        entry.next_renew = entry.deadline.saturating_sub(entry.ttl * 2 / 3);
                        if let Some(silence) = silence {
                            // This stream is now the lock's latest
                            // attachment; its server may release it after
                            // `silence` without news from us.
                            let margin = LOST_MARGIN.min(silence / 10);
                            entry.silence_bound = Some(at + silence.saturating_sub(margin));
                            // Renew well within it, so that a healthy
                            // stream never lets the bound pass.
                            entry.next_renew = entry.next_renew.min(at + silence * 2 / 3);
                        }
                        entry.moved |= clean;
                        if let Some(r) = self.reattach.as_mut() {
                            r.ok += 1;
                        }
                    }
                    entry.publish();
                } else if let Some(entry) = self.locks.remove(&key) {
                    tracing::warn!(
                        key = key.as_str(),
                        fencing_token = entry.fencing_token,
                        "lock lost: the server says this lease no longer holds it"
                    );
                    entry.lose(LostReason::NotHeld);
                }
                if let Some(r) = &self.reattach {
                    if r.pending == 0 {
                        let endpoint = self
                            .stream
                            .as_ref()
                            .map(|s| self.transport.uri(s.endpoint))
                            .unwrap_or_default();
                        tracing::info!(
                            endpoint,
                            reattached = r.ok,
                            after_ms =
                                now.saturating_duration_since(r.broken_at).as_millis() as u64,
                            "re-attached locks after the KeepAlive stream broke"
                        );
                        self.reattach = None;
                    }
                }
            }
        }
    }
}
