//! Two workers contending for one lock: they take turns, never overlap,
//! and every grant carries a larger fencing token than the one before.
//!
//! Each worker has its own `Client`, as two processes would. A protected
//! resource that remembers the largest fencing token it has seen can
//! refuse a write from a holder that paused and lost the lock meanwhile;
//! `Resource::write` below is that check.
//!
//! ```text
//! leasehold serve &
//! cargo run --example contending_workers
//! ```

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use leasehold::client::{Client, Error};

const KEY: &str = "examples/contending-workers";
const ROUNDS: usize = 3;

/// The thing the lock protects: it accepts a write only with a fencing
/// token at least as large as any it has seen, and records who was inside.
#[derive(Default)]
struct Resource {
    largest_token: u64,
    inside: Option<&'static str>,
    log: Vec<(&'static str, u64)>,
}

impl Resource {
    fn enter(&mut self, worker: &'static str, fencing_token: u64) -> Result<(), String> {
        if let Some(other) = self.inside {
            return Err(format!("{worker} entered while {other} was inside"));
        }
        if fencing_token <= self.largest_token {
            return Err(format!(
                "{worker}'s fencing token {fencing_token} is not larger than {}",
                self.largest_token
            ));
        }
        self.largest_token = fencing_token;
        self.inside = Some(worker);
        self.log.push((worker, fencing_token));
        Ok(())
    }

    fn leave(&mut self) {
        self.inside = None;
    }
}

async fn worker(
    name: &'static str,
    endpoint: String,
    resource: Arc<Mutex<Resource>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = Client::connect(endpoint).await?;
    for _ in 0..ROUNDS {
        // Waits (in the server, woken by the release) while the other
        // worker holds the lock.
        let guard = client.lock(KEY).owner(name).await?;
        let token = guard.fencing_token();
        resource
            .lock()
            .map_err(|e| e.to_string())?
            .enter(name, token)?;
        println!("{name} holds the lock with fencing token {token}");
        tokio::select! {
            reason = guard.lost() => return Err(format!("{name} lost the lock: {reason}").into()),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        resource.lock().map_err(|e| e.to_string())?.leave();
        if !guard.release().await? {
            return Err(format!("{name}'s lock was lost before its release").into());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let endpoint =
        std::env::var("LEASEHOLD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let resource = Arc::new(Mutex::new(Resource::default()));
    let a = tokio::spawn(worker("worker-a", endpoint.clone(), resource.clone()));
    let b = tokio::spawn(worker("worker-b", endpoint, resource.clone()));
    a.await??;
    b.await??;

    let resource = resource.lock().map_err(|e| e.to_string())?;
    let tokens: Vec<u64> = resource.log.iter().map(|(_, t)| *t).collect();
    println!(
        "{} grants, fencing tokens strictly increasing: {tokens:?}",
        tokens.len()
    );
    if tokens.len() != 2 * ROUNDS || tokens.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Protocol(format!("unexpected grants {tokens:?}")).into());
    }
    Ok(())
}
