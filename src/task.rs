//! Owned background tasks: every task the server spawns is held by a guard
//! that aborts it on drop, so nothing outlives the thing that started it.

use std::future::Future;

use tokio::task::JoinHandle;
use tracing::Instrument;

/// Aborts its task when dropped.
#[derive(Debug)]
pub struct TaskGuard(JoinHandle<()>);

impl TaskGuard {
    /// Spawns `fut` on the current runtime inside a span named `name`.
    pub fn spawn<F>(name: &'static str, fut: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self(tokio::spawn(
            // `task = name`, not `name`: JSON logs already give the span's own
            // name under "name", and strict parsers refuse a duplicate key.
            fut.instrument(tracing::info_span!("task", task = name)),
        ))
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
