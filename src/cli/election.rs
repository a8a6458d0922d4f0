//! `leasehold watch NAME` (one line per event of a lock) and `leasehold
//! elect NAME -- CMD` (run CMD while this process is the leader): the SDK's
//! [`Client::watch`](crate::client::Client::watch) and
//! [`Client::elect`](crate::client::Client::elect) for scripts.

use std::ffi::OsString;
use std::time::Duration;

use clap::Args;
use rustix::process::Signal;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt;

use super::connect::{self, ConnectArgs, exit};
use super::lock::{or_exit, start, supervise};
use super::ops::text;
use crate::client::{LEADER_VALUE_KEY, WatchEvent};

/// Flags of `leasehold watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// The lock's name.
    pub key: String,
    /// Print one JSON object per event instead of a text line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
}

/// Flags of `leasehold elect`.
#[derive(Debug, Clone, Args)]
pub struct ElectArgs {
    /// The election's name (a lock key).
    pub key: String,
    /// What followers should know of this leader (an address, say): stored
    /// in the lock's metadata as `value`, shown by `describe` and `watch`.
    #[arg(long, env = "LEASEHOLD_VALUE")]
    pub value: Option<String>,
    /// Who this candidate is, as `describe` shows it (default: HOST:PID).
    #[arg(long, env = "LEASEHOLD_OWNER")]
    pub owner: Option<String>,
    /// The leader's TTL (e.g. `15s`, more than 0): how long a silent leader
    /// (paused, cut off) stays leader. A leader whose process ends is
    /// replaced at once. Without it, the server's default.
    #[arg(long, env = "LEASEHOLD_TTL", allow_hyphen_values = true, value_parser = connect::parse_ttl)]
    pub ttl: Option<Duration>,
    /// How long to wait to become leader; without it, as long as it takes.
    /// Not leader in time: exit 75.
    #[arg(long, env = "LEASEHOLD_WAIT", allow_hyphen_values = true, value_parser = connect::parse_duration_not_negative)]
    pub wait: Option<Duration>,
    /// How long CMD has to exit after SIGTERM before it gets SIGKILL, when
    /// leadership is lost or about to be (as for `leasehold lock`).
    #[arg(long, env = "LEASEHOLD_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How long before the earliest instant the server could elect another
    /// leader CMD must be gone (as for `leasehold lock`).
    #[arg(long, env = "LEASEHOLD_MARGIN", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub margin: Duration,
    /// A `KEY=VALUE` pair for followers; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = connect::parse_kv)]
    pub metadata: Vec<(String, String)>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
    /// The command to run while leader, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// `leasehold elect`: waits to be the leader, runs CMD while leader with
/// `LEASEHOLD_KEY` and `LEASEHOLD_FENCING_TOKEN` (the term) in its
/// environment, and stops it when leadership is lost — everything as
/// `leasehold lock` does, exit codes included.
pub async fn elect(args: ElectArgs) -> i32 {
    let (mut signals, client) = match start("elect", &args.connect).await {
        Ok(started) => started,
        Err(code) => return code,
    };
    let mut builder = client.elect(args.key.clone()).owner(
        args.owner
            .clone()
            .unwrap_or_else(|| connect::default_owner(std::process::id())),
    );
    if let Some(value) = &args.value {
        builder = builder.value(value.clone());
    }
    if let Some(ttl) = args.ttl {
        builder = builder.ttl(ttl);
    }
    if let Some(wait) = args.wait {
        builder = builder.wait(wait);
    }
    for (k, v) in &args.metadata {
        builder = builder.metadata(k.clone(), v.clone());
    }
    let leadership = match or_exit("elect", builder.campaign(), &mut signals).await {
        Ok(leadership) => leadership,
        Err(code) => return code,
    };
    eprintln!(
        "leasehold elect: leader of {:?}, term {}",
        leadership.key(),
        leadership.term()
    );
    supervise(
        "elect",
        leadership.into_lock_guard(),
        &mut signals,
        &args.command,
        args.grace,
        args.margin,
    )
    .await
}

/// One event as `leasehold watch` prints it.
fn event_fields(key: &str, event: &WatchEvent) -> Vec<(&'static str, Value)> {
    let holders: Vec<Value> = event
        .holders
        .iter()
        .map(|h| {
            let mut metadata: Vec<_> = h.metadata.iter().collect();
            metadata.sort();
            let metadata: serde_json::Map<String, Value> = metadata
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            json!({
                "owner": h.owner,
                "fencing_token": h.fencing_token,
                "ttl_ms": u64::try_from(h.ttl_remaining.as_millis()).unwrap_or(u64::MAX),
                "metadata": metadata,
            })
        })
        .collect();
    vec![
        ("event", json!(event.kind.as_str())),
        ("key", json!(key)),
        ("fencing_token", json!(event.fencing_token)),
        ("held", json!(!event.holders.is_empty())),
        (
            "mode",
            json!(if event.shared { "shared" } else { "exclusive" }),
        ),
        ("holders", Value::Array(holders)),
    ]
}

/// The text line: `event=... key=... fencing_token=... held=... mode=...
/// holders=N`, then for an exclusive holder its `owner=` (and `value=`).
fn text_line(key: &str, event: &WatchEvent) -> String {
    let mut line = format!(
        "event={} key={} fencing_token={} held={} mode={} holders={}",
        event.kind,
        text(key),
        event.fencing_token,
        !event.holders.is_empty(),
        if event.shared { "shared" } else { "exclusive" },
        event.holders.len()
    );
    if let Some(h) = event.exclusive_holder() {
        line.push_str(&format!(
            " owner={} holder_fencing_token={}",
            text(&h.owner),
            h.fencing_token
        ));
        if let Some(value) = h.metadata.get(LEADER_VALUE_KEY) {
            line.push_str(&format!(" value={}", text(value)));
        }
    }
    line
}

/// `leasehold watch`: prints the lock's state, then one line per event,
/// until Ctrl-C / SIGTERM (exit 128 + the signal) or the server ends the
/// stream (exit 0 when it ends cleanly, else the error's exit code).
pub async fn watch(args: WatchArgs) -> i32 {
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("leasehold watch: cannot handle signals: {e}");
            return exit::FAILURE;
        }
    };
    let work = async {
        let client = args.connect.connect().await?;
        let mut events = client.watch(args.key.clone()).await?;
        while let Some(event) = events.next().await {
            let event = event?;
            if args.json {
                let object: serde_json::Map<String, Value> = event_fields(&args.key, &event)
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                println!("{}", Value::Object(object));
            } else {
                println!("{}", text_line(&args.key, &event));
            }
        }
        Ok::<(), crate::client::Error>(())
    };
    tokio::select! {
        result = work => match result {
            Ok(()) => exit::OK,
            Err(e) => connect::fail("watch", &e),
        },
        _ = int.recv() => 128 + Signal::INT.as_raw(),
        _ = term.recv() => 128 + Signal::TERM.as_raw(),
    }
}
