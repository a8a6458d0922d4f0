//! Owned background tasks: every task the server or the SDK spawns is held
//! by a [`AbortOnDropHandle`] (tokio-util), which aborts it on drop, so
//! nothing outlives the thing that started it.

use std::future::Future;

pub use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

/// An owned background task: aborted when dropped.
pub type TaskGuard = AbortOnDropHandle<()>;

/// Spawns `fut` on the current runtime inside a span named `name`; the
/// task lives as long as the handle.
pub fn spawn<F>(name: &'static str, fut: F) -> TaskGuard
where
    F: Future<Output = ()> + Send + 'static,
{
    AbortOnDropHandle::new(tokio::spawn(
        // `task = name`, not `name`: JSON logs already give the span's own
        // name under "name", and strict parsers refuse a duplicate key.
        fut.instrument(tracing::info_span!("task", task = name)),
    ))
}
