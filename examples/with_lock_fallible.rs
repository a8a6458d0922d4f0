//! `try_with_lock`: run fallible work under a lock, with one `Result` of
//! your own error type; the lock is released whether the work succeeded or
//! failed.
//!
//! The error type needs `From<leasehold::client::Error>` (taking the lock
//! can fail, and so can holding it: `Error::Lost`); an enum with
//! `#[from]` variants, `anyhow::Error` or `Box<dyn Error>` all have it. It
//! is inferred from the function's return type, so the work's `?` and
//! `Ok(..)` need no annotation. (`with_lock` returns the work's value
//! inside the SDK's `Result`: fallible work there reads
//! `Ok::<_, io::Error>(..)` and `.await??`.)
//!
//! ```text
//! leasehold serve &
//! cargo run --example with_lock_fallible
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use leasehold::client::Client;

const KEY: &str = "examples/report";

#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error(transparent)]
    Lock(#[from] leasehold::client::Error),
    #[error("cannot write the report: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one line, fenced by the lease's fencing token, to `path` under
/// the lock; returns the fencing token written.
async fn append_report(client: &Client, path: &Path) -> Result<u64, ReportError> {
    client
        .try_with_lock(KEY, |lease| async move {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(
                file,
                "report written under fencing token {}",
                lease.fencing_token
            )?;
            Ok(lease.fencing_token)
        })
        .await
}

#[tokio::main]
async fn main() -> Result<(), ReportError> {
    let endpoint =
        std::env::var("LEASEHOLD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let client = Client::connect(endpoint).await?;

    let dir = std::env::temp_dir().join(format!("leasehold-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let report = dir.join("report.txt");
    let token = append_report(&client, &report).await?;
    println!("wrote {} under fencing token {token}", report.display());

    // Work that fails: the error comes back as the work's own, and the lock
    // is released all the same.
    let missing: PathBuf = dir.join("no-such-directory").join("report.txt");
    match append_report(&client, &missing).await {
        Err(ReportError::Io(e)) => println!("the work failed as expected: {e}"),
        other => {
            eprintln!("expected an I/O error, got {other:?}");
            std::process::exit(1);
        }
    }
    let holder = client.describe(KEY).await?;
    println!(
        "after the failed work the lock is free: {}",
        holder.is_none()
    );
    std::fs::remove_dir_all(&dir)?;
    if holder.is_some() {
        std::process::exit(1);
    }
    Ok(())
}
