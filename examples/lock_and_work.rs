//! Take a lock and work under it while watching `lost()`.
//!
//! The work runs longer than the lock's TTL, so it only finishes because
//! the client renews the lock in the background (at about a third of the
//! TTL). The work is raced against `guard.lost()`: if the lock were lost
//! (the server expired it, or no renewal got through in time), the work
//! would stop at its next `.await` instead of carrying on unprotected.
//!
//! ```text
//! leasehold serve &                      # a server on 127.0.0.1:50051
//! cargo run --example lock_and_work      # LEASEHOLD_ENDPOINT=... for another
//! ```

use std::time::Duration;

use leasehold::client::{Client, Error};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let endpoint =
        std::env::var("LEASEHOLD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let client = Client::connect(endpoint).await?;

    // A short TTL to show renewals; a real job would keep the default (30 s).
    let ttl = Duration::from_secs(1);
    let guard = client
        .lock("examples/lock-and-work")
        .ttl(ttl)
        .owner(format!("lock_and_work pid {}", std::process::id()))
        .await?;
    println!(
        "holding {} with fencing token {} (TTL {:?})",
        guard.key(),
        guard.fencing_token(),
        guard.ttl()
    );

    // Work for twice the TTL, in steps; each step would carry the fencing
    // token to the resource the lock protects.
    let fencing_token = guard.fencing_token();
    let work = async move {
        for step in 1..=4 {
            tokio::time::sleep(ttl / 2).await;
            println!("step {step} done under fencing token {fencing_token}");
        }
    };
    tokio::select! {
        reason = guard.lost() => {
            eprintln!("lost {} during the work: {reason}", guard.key());
            std::process::exit(1);
        }
        () = work => {}
    }

    // Ok(false) would mean the lock had been lost before the release.
    let released = guard.release().await?;
    println!("released: {released}");
    if !released {
        std::process::exit(1);
    }
    Ok(())
}
