//! `leasehold list | force-release`: what an operator runs when a lock
//! seems stuck (documentation/operations.md). Both call the AdminService,
//! which needs an admin token (`--auth-token-file`) or a server started
//! with `--admin`.

use clap::Args;
use serde_json::{Value, json};

use super::connect::{self, ConnectArgs, exit};
use super::ops::{ms, print, text};
use crate::client::LockInfo;

/// Pages one `list` may read: 10 million locks at the largest page.
const MAX_PAGES: usize = 10_000;

/// Flags of `leasehold list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only locks whose key starts with this (default: every lock the
    /// token's scopes allow).
    #[arg(default_value = "")]
    pub prefix: String,
    /// Locks asked for per call (at most 1000).
    #[arg(long, env = "LEASEHOLD_PAGE_SIZE", default_value_t = 100)]
    pub page_size: u32,
    /// Print one JSON object per lock instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Flags of `leasehold force-release`.
#[derive(Debug, Clone, Args)]
pub struct ForceReleaseArgs {
    /// The lock's name.
    pub key: String,
    /// Why: logged by the server with your name, for whoever asks later.
    #[arg(long)]
    pub reason: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// `leasehold list`: every held lock under the prefix, a page at a time.
pub async fn list(args: ListArgs) -> i32 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("list", &e),
    };
    let mut token: Option<String> = None;
    let mut rows = Vec::new();
    for _ in 0..MAX_PAGES {
        let page = match client
            .list(&args.prefix, args.page_size, token.as_deref())
            .await
        {
            Ok(page) => page,
            Err(e) => return connect::fail("list", &e),
        };
        for (key, info) in page.locks {
            if args.json {
                println!("{}", lock_json(&key, &info));
            } else {
                rows.push(row(&key, &info));
            }
        }
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    if !args.json {
        print_table(&rows);
    }
    exit::OK
}

/// `leasehold force-release`: exit 0 whether or not anyone held the lock.
pub async fn force_release(args: ForceReleaseArgs) -> i32 {
    let client = match args.connect.connect().await {
        Ok(c) => c,
        Err(e) => return connect::fail("force-release", &e),
    };
    match client.force_release(&args.key, &args.reason).await {
        Ok(released) => {
            print(
                args.json,
                &[("key", json!(args.key)), ("released", json!(released))],
            );
            exit::OK
        }
        Err(e) => connect::fail("force-release", &e),
    }
}

fn lock_json(key: &str, info: &LockInfo) -> Value {
    json!({
        "key": key,
        "mode": "exclusive",
        "holders": 1,
        "owner": info.owner,
        "fencing_token": info.fencing_token,
        "ttl_ms": ms(info.ttl_remaining),
        "metadata": info.metadata,
    })
}

const HEADER: [&str; 6] = [
    "KEY",
    "MODE",
    "HOLDERS",
    "OWNER",
    "FENCING_TOKEN",
    "TTL_LEFT",
];

fn row(key: &str, info: &LockInfo) -> [String; 6] {
    [
        text(key),
        "exclusive".into(),
        "1".into(),
        text(&info.owner),
        info.fencing_token.to_string(),
        format!("{:.1}s", info.ttl_remaining.as_secs_f64()),
    ]
}

/// Columns padded to their widest cell; keys and owners quoted when they
/// hold spaces or control characters, so every row stays one line.
fn print_table(rows: &[[String; 6]]) {
    let mut widths = HEADER.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(HEADER);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}
