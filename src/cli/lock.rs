//! `leasehold lock NAME -- CMD ARGS...`: run a command under a lock, as
//! `flock`, `consul lock` or `etcdctl lock` do.
//!
//! Takes the lock (waiting up to `--wait`), runs CMD in its own process
//! group with `LEASEHOLD_KEY` and `LEASEHOLD_FENCING_TOKEN` in its
//! environment, keeps the lock alive while CMD runs, releases it when CMD
//! exits and exits with CMD's status. If the lock is lost, the whole process
//! group gets SIGTERM, then SIGKILL after `--grace`, and the exit code is 76.
//! SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to `leasehold lock` are passed
//! on to CMD's process group.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use clap::Args;
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};

use super::connect::{self, ConnectArgs, exit};

/// Flags of `leasehold lock`.
#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// The lock's name.
    pub key: String,
    /// TTL to ask for (e.g. `30s`); without it, the server's default. It is
    /// renewed about every third of it while CMD runs.
    #[arg(long, env = "LEASEHOLD_TTL", value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// How long to wait while another client holds the lock; without it,
    /// as long as it takes; `0s` tries once. Not acquired in time: exit 75.
    #[arg(long, env = "LEASEHOLD_WAIT", value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// When the lock is lost: how long CMD has to exit after SIGTERM before
    /// it gets SIGKILL.
    #[arg(long, env = "LEASEHOLD_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Who holds the lock, as `describe` shows it (default: HOST:PID).
    #[arg(long, env = "LEASEHOLD_OWNER")]
    pub owner: Option<String>,
    /// A `KEY=VALUE` pair shown by `describe`; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = connect::parse_kv)]
    pub metadata: Vec<(String, String)>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: ConnectArgs,
    /// The command to run under the lock, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// The signals passed on to CMD.
struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for (number, kind) in [
            (2, SignalKind::interrupt()),
            (15, SignalKind::terminate()),
            (1, SignalKind::hangup()),
            (3, SignalKind::quit()),
        ] {
            streams.push((number, signal(kind)?));
        }
        Ok(Self { streams })
    }

    /// The number of the next signal received.
    async fn recv(&mut self) -> i32 {
        let waits = self.streams.iter_mut().map(|(number, stream)| {
            let number = *number;
            Box::pin(async move {
                stream.recv().await;
                number
            })
        });
        futures_util::future::select_all(waits).await.0
    }
}

fn to_signal(number: i32) -> Signal {
    match number {
        1 => Signal::HUP,
        2 => Signal::INT,
        3 => Signal::QUIT,
        9 => Signal::KILL,
        _ => Signal::TERM,
    }
}

/// Sends `signal` to CMD's process group (CMD leads it).
fn signal_group(group: Option<Pid>, number: i32) {
    if let Some(group) = group {
        // ESRCH: everyone in the group has exited already.
        let _ = rustix::process::kill_process_group(group, to_signal(number));
    }
}

/// CMD's exit code as a shell reports it: its status, or 128 + signal.
fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs `leasehold lock`; the result is the process exit code.
pub async fn run(args: LockArgs) -> i32 {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("leasehold lock: cannot handle signals: {e}");
            return exit::FAILURE;
        }
    };
    let client = tokio::select! {
        client = args.connect.connect() => match client {
            Ok(c) => c,
            Err(e) => return connect::fail("lock", &e),
        },
        number = signals.recv() => return 128 + number,
    };
    let mut builder = client.lock(args.key.clone()).owner(
        args.owner
            .clone()
            .unwrap_or_else(|| connect::default_owner(std::process::id())),
    );
    if let Some(ttl) = args.ttl {
        builder = builder.ttl(ttl);
    }
    if let Some(wait) = args.wait {
        builder = builder.wait(wait);
    }
    for (k, v) in &args.metadata {
        builder = builder.metadata(k.clone(), v.clone());
    }
    // Cancelling a waiting Acquire leaves nothing behind on the server.
    let guard = tokio::select! {
        guard = builder.acquire() => match guard {
            Ok(g) => g,
            Err(e) => return connect::fail("lock", &e),
        },
        number = signals.recv() => return 128 + number,
    };

    let Some((program, rest)) = args.command.split_first() else {
        eprintln!("leasehold lock: no command given after --");
        return exit::USAGE;
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(rest)
        .env("LEASEHOLD_KEY", guard.key())
        .env("LEASEHOLD_FENCING_TOKEN", guard.fencing_token().to_string())
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_EXECUTE
            };
            eprintln!(
                "leasehold lock: cannot run {}: {e}",
                program.to_string_lossy()
            );
            let _ = guard.release().await;
            return code;
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(Pid::from_raw);
    let lost = guard.lost();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(status) => status_code(status),
                    Err(e) => {
                        eprintln!("leasehold lock: lost track of the command: {e}");
                        exit::FAILURE
                    }
                };
                let key = guard.key().to_string();
                return match guard.release().await {
                    Ok(true) => code,
                    Ok(false) => {
                        eprintln!("leasehold lock: the lock {key:?} was lost before the command finished (the server no longer knew this lease)");
                        exit::LOST
                    }
                    Err(e) => {
                        eprintln!("leasehold lock: the command finished but the lock could not be released ({e}); it expires with its TTL");
                        code
                    }
                };
            }
            reason = &mut lost => {
                eprintln!(
                    "leasehold lock: lost the lock {:?} (fencing token {}): {reason}; stopping the command (SIGTERM, then SIGKILL after {})",
                    guard.key(),
                    guard.fencing_token(),
                    humantime::format_duration(args.grace)
                );
                signal_group(group, 15);
                if tokio::time::timeout(args.grace, child.wait()).await.is_err() {
                    signal_group(group, 9);
                    let _ = child.wait().await;
                }
                return exit::LOST;
            }
            number = signals.recv() => signal_group(group, number),
        }
    }
}
