//! `leasehold lock NAME -- CMD ARGS...`: run a command under a lock, as
//! `flock`, `consul lock` or `etcdctl lock` do.
//!
//! Takes the lock (waiting up to `--wait`), runs CMD in its own process
//! group with `LEASEHOLD_KEY` and `LEASEHOLD_FENCING_TOKEN` in its
//! environment, keeps the lock alive while CMD runs, releases it when CMD
//! exits and exits with CMD's status. CMD starts only once the server has
//! answered the lock's attach to the KeepAlive stream, so a killed
//! `leasehold lock` releases it at once.
//!
//! CMD is stopped before the lease can expire: when the lease has less than
//! `--grace` + `--margin` left (no renewal came back in time), the whole
//! process group gets SIGTERM, then SIGKILL `--grace` later, which is still
//! `--margin` before the earliest instant the server could expire the lease;
//! the exit code is 76. The same when the server says the lease is gone (then
//! it may already be someone else's). SIGINT, SIGTERM, SIGHUP and SIGQUIT
//! are passed on to CMD's process group; SIGTSTP (Ctrl-Z) stops CMD's group
//! (SIGSTOP) and then this process, and SIGCONT resumes CMD only if the lease
//! is still safely valid (otherwise CMD is killed while stopped).
//!
//! Everything after the grant is `supervise()`, which `leasehold elect`
//! (`super::election`) runs on its leadership's guard.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use clap::Args;
use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};

use super::connect::{self, ConnectArgs, exit};
use crate::client::{Client, LockGuard};

/// Flags of `leasehold lock`.
#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// The lock's name.
    pub key: String,
    /// TTL to ask for (e.g. `30s`, more than 0); without it, the server's
    /// default. It is renewed about every third of it while CMD runs.
    #[arg(long, env = "LEASEHOLD_TTL", allow_hyphen_values = true, value_parser = connect::parse_ttl)]
    pub ttl: Option<Duration>,
    /// How long to wait while another client holds the lock; without it,
    /// as long as it takes; `0s` tries once. Not acquired in time: exit 75.
    #[arg(long, env = "LEASEHOLD_WAIT", allow_hyphen_values = true, value_parser = connect::parse_duration_not_negative)]
    pub wait: Option<Duration>,
    /// How long CMD has to exit after SIGTERM before it gets SIGKILL, when
    /// the lease runs short or is lost. Shortened to fit in half the TTL,
    /// minus `--margin`, so that CMD is gone before the lease can expire.
    #[arg(long, env = "LEASEHOLD_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How long before the earliest instant the server could expire the
    /// lease CMD must be gone (SIGKILL at that instant minus this): room
    /// for scheduling delays and for CMD's last writes to land. At most
    /// half the TTL.
    #[arg(long, env = "LEASEHOLD_MARGIN", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub margin: Duration,
    /// Take the lock SHARED: `--shared` alone runs readers beside each
    /// other while a writer (no `--shared`) waits for all of them;
    /// `--shared --limit 3` lets three commands run at once (a semaphore).
    #[arg(long, env = "LEASEHOLD_SHARED")]
    pub shared: bool,
    /// With --shared: at most this many holders at once (0: no limit).
    /// Every holder of a key gives the same limit.
    #[arg(
        long,
        env = "LEASEHOLD_LIMIT",
        requires = "shared",
        default_value_t = 0
    )]
    pub limit: u32,
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
pub(super) struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    pub(super) fn new() -> std::io::Result<Self> {
        let mut streams = Vec::new();
        for sig in [
            Signal::INT,
            Signal::TERM,
            Signal::HUP,
            Signal::QUIT,
            Signal::TSTP,
            Signal::CONT,
        ] {
            let number = sig.as_raw();
            streams.push((number, signal(SignalKind::from_raw(number))?));
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

/// Sends `signal` to CMD's process group (CMD leads it).
fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        // ESRCH: everyone in the group has exited already.
        let _ = rustix::process::kill_process_group(group, signal);
    }
}

/// Stops this process as SIGTSTP would have (its handler replaced the
/// default action); returns once it is continued.
fn stop_self() {
    let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::STOP);
}

/// Waits for `fut`, stopping this process on SIGTSTP meanwhile (nothing
/// runs under the lock yet); another signal ends the wait with it.
async fn until_signalled<F: std::future::Future>(
    fut: F,
    signals: &mut Signals,
) -> Result<F::Output, i32> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            number = signals.recv() => {
                if number == Signal::TSTP.as_raw() {
                    stop_self();
                } else if number != Signal::CONT.as_raw() {
                    return Err(number);
                }
            }
        }
    }
}

/// CMD's exit code as a shell reports it: its status, or 128 + signal.
fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The start of `leasehold lock` and `leasehold elect` (`verb`): signal
/// handling, then a connected client; else the exit code to return.
pub(super) async fn start(verb: &str, connect: &ConnectArgs) -> Result<(Signals, Client), i32> {
    let mut signals = Signals::new().map_err(|e| {
        eprintln!("leasehold {verb}: cannot handle signals: {e}");
        exit::FAILURE
    })?;
    let client = or_exit(verb, connect.connect(), &mut signals).await?;
    Ok((signals, client))
}

/// `fut`'s value unless a signal comes first; else the exit code: its
/// error's (reported as `leasehold {verb}`), or 128 + the signal.
pub(super) async fn or_exit<T>(
    verb: &str,
    fut: impl std::future::Future<Output = Result<T, crate::client::Error>>,
    signals: &mut Signals,
) -> Result<T, i32> {
    match until_signalled(fut, signals).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(connect::fail(verb, &e)),
        Err(number) => Err(128 + number),
    }
}

/// Runs `leasehold lock`; the result is the process exit code.
pub async fn run(args: LockArgs) -> i32 {
    let (mut signals, client) = match start("lock", &args.connect).await {
        Ok(started) => started,
        Err(code) => return code,
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
    if args.shared {
        builder = builder.shared(args.limit);
    }
    for (k, v) in &args.metadata {
        builder = builder.metadata(k.clone(), v.clone());
    }
    // Cancelling a waiting Acquire leaves nothing behind on the server.
    // The guard comes once the server answered the attach.
    let guard = match or_exit("lock", builder.acquire(), &mut signals).await {
        Ok(guard) => guard,
        Err(code) => return code,
    };

    supervise(
        "lock",
        guard,
        &mut signals,
        &args.command,
        args.grace,
        args.margin,
    )
    .await
}

/// Runs `command` while `guard` holds its lock, for `leasehold lock` and
/// `leasehold elect` (`verb` names which in messages): starts it only with
/// more than grace + margin of the lease left, with `LEASEHOLD_KEY` and
/// `LEASEHOLD_FENCING_TOKEN` in its environment, in its own process group;
/// passes signals on; stops it (SIGTERM, SIGKILL after the grace) when the
/// lease runs short or is lost. The result is the exit code: the
/// command's, or [`exit::LOST`].
pub(super) async fn supervise(
    verb: &str,
    guard: LockGuard,
    signals: &mut Signals,
    command: &[OsString],
    grace: Duration,
    margin: Duration,
) -> i32 {
    let Some((program, rest)) = command.split_first() else {
        eprintln!("leasehold {verb}: no command given after --");
        return exit::USAGE;
    };
    // SIGTERM once the lease has less than grace + margin left, which must
    // fit in what a renewal every TTL/3 leaves (2/3 of the TTL) with room
    // for the renewal's round trip: half the TTL.
    let half = guard.ttl() / 2;
    let wanted_grace = grace;
    let margin = margin.min(half);
    let grace = grace.min(half.saturating_sub(margin));
    if grace < wanted_grace {
        eprintln!(
            "leasehold {verb}: note: --grace {} shortened to {} so that the command is gone {} before the lease (TTL {}) can expire",
            humantime::format_duration(wanted_grace),
            humantime::format_duration(grace),
            humantime::format_duration(margin),
            humantime::format_duration(guard.ttl()),
        );
    }
    let budget = grace + margin;
    if guard.valid_for() <= budget {
        eprintln!(
            "leasehold {verb}: the lease of {:?} has less than --grace + --margin left; not starting the command",
            guard.key()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), guard.release()).await;
        return exit::LOST;
    }
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
                "leasehold {verb}: cannot run {}: {e}",
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
    // If this process is killed outright, CMD must not outlive it.
    let watchdog = group.and_then(|g| super::watchdog::Watchdog::start(verb, g));
    let code = watch_command(verb, guard, signals, &mut child, group, grace, margin).await;
    // CMD is gone (or the group holds only what it left behind).
    if let Some(watchdog) = watchdog {
        watchdog.disarm();
    }
    code
}

/// Waits for CMD (`child`, leader of `group`) while the lease lasts,
/// passing signals on; once the lease runs short (less than `grace` +
/// `margin` left) or is lost, stops CMD. The exit code: CMD's, or
/// [`exit::LOST`].
async fn watch_command(
    verb: &str,
    guard: LockGuard,
    signals: &mut Signals,
    child: &mut tokio::process::Child,
    group: Option<Pid>,
    grace: Duration,
    margin: Duration,
) -> i32 {
    let budget = grace + margin;
    let lost = guard.lost();
    tokio::pin!(lost);
    let why = loop {
        let left = guard.valid_for();
        if left <= budget {
            break format!(
                "the lease has {} left and no renewal came back in time",
                humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
            );
        }
        // Looked at again at least every 250 ms (the boot clock may jump
        // after a host suspend).
        let check = (left - budget).min(Duration::from_millis(250));
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(status) => status_code(status),
                    Err(e) => {
                        eprintln!("leasehold {verb}: lost track of the command: {e}");
                        exit::FAILURE
                    }
                };
                let key = guard.key().to_string();
                return match guard.release().await {
                    Ok(true) => code,
                    Ok(false) => {
                        eprintln!("leasehold {verb}: the lock {key:?} was lost before the command finished (the server no longer knew this lease)");
                        exit::LOST
                    }
                    Err(e) => {
                        eprintln!("leasehold {verb}: the command finished but the lock could not be released ({e}); it expires with its TTL");
                        code
                    }
                };
            }
            reason = &mut lost => break reason.to_string(),
            number = signals.recv() => {
                if number == Signal::TSTP.as_raw() {
                    // Stop CMD with us: it must not run while nothing renews.
                    signal_group(group, Signal::STOP);
                    stop_self();
                    // Continued: CMD resumes only if the lease is still
                    // safe; otherwise it dies without running again.
                    if guard.valid_for() > budget {
                        signal_group(group, Signal::CONT);
                    } else {
                        eprintln!(
                            "leasehold {verb}: the lease of {:?} (fencing token {}) ran short while stopped; killing the stopped command (SIGKILL)",
                            guard.key(),
                            guard.fencing_token()
                        );
                        signal_group(group, Signal::KILL);
                        let _ = child.wait().await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), guard.release()).await;
                        return exit::LOST;
                    }
                } else if number == Signal::CONT.as_raw() {
                    if guard.valid_for() > budget {
                        signal_group(group, Signal::CONT);
                    }
                } else if let Some(signal) = Signal::from_named_raw(number) {
                    signal_group(group, signal);
                }
            }
            _ = tokio::time::sleep(check) => {}
        }
    };
    // Stop CMD: SIGTERM now, SIGKILL after --grace but no later than
    // --margin before the lease's deadline. A lease already gone (the
    // server said so, or its deadline passed while this process was
    // stopped) may be someone else's now: CMD still gets its --grace to
    // clean up, as it would without the lock service.
    let left = guard.valid_for();
    let kill_in = if left.is_zero() {
        grace
    } else {
        grace.min(left.saturating_sub(margin))
    };
    eprintln!(
        "leasehold {verb}: lost the lock {:?} (fencing token {}): {why}; stopping the command (SIGTERM, then SIGKILL after {})",
        guard.key(),
        guard.fencing_token(),
        humantime::format_duration(Duration::from_millis(kill_in.as_millis() as u64))
    );
    signal_group(group, Signal::TERM);
    // A stopped CMD would never see the SIGTERM.
    signal_group(group, Signal::CONT);
    if kill_in.is_zero() || tokio::time::timeout(kill_in, child.wait()).await.is_err() {
        signal_group(group, Signal::KILL);
        let _ = child.wait().await;
    }
    // Still ours if it only ran short: give it back to the next holder.
    let _ = tokio::time::timeout(Duration::from_secs(1), guard.release()).await;
    exit::LOST
}
