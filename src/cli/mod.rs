//! The `leasehold` command line: one binary, several subcommands. Each
//! subcommand's flags also read a `LEASEHOLD_*` environment variable.

pub mod admin;
pub mod connect;
pub mod election;
pub mod lock;
pub mod ops;
pub mod serve;
pub mod watchdog;

use clap::{Parser, Subcommand, ValueEnum};

/// Leasehold: distributed locks over gRPC, kept alive over one stream,
/// stored in Redis.
#[derive(Debug, Parser)]
#[command(
    name = "leasehold",
    version,
    about,
    long_about = None,
    after_help = "Without a command, leasehold runs `serve` and takes its flags: \
                  `leasehold --listen 0.0.0.0:50051` (see `leasehold serve --help`)."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LEASEHOLD_LOG_FORMAT", help_heading = "Observability", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Runtime worker threads: 0 runs everything on one thread (least CPU
    /// per call), N on N threads; default: one per CPU.
    #[arg(
        long,
        global = true,
        env = "LEASEHOLD_WORKER_THREADS",
        help_heading = "Runtime"
    )]
    pub worker_threads: Option<usize>,
    /// What to do; without a subcommand, `serve`, whose flags then work
    /// without the word: `leasehold --listen 0.0.0.0:50051`.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses `args` (the program name first). `leasehold` alone serves, so
    /// `leasehold --listen ADDR ...` means `leasehold serve --listen ADDR
    /// ...`: when the arguments do not parse as given, start with a flag,
    /// and parse once `serve` is put in front, that is what they mean.
    pub fn parse_from_args(args: Vec<std::ffi::OsString>) -> Result<Self, clap::Error> {
        let first = Self::try_parse_from(&args).map_err(|e| with_lock_hint(e, &args));
        let Err(e) = &first else {
            return first;
        };
        let starts_with_flag = args
            .get(1)
            .and_then(|a| a.to_str())
            .is_some_and(|a| a.starts_with("--"));
        if e.kind() != clap::error::ErrorKind::UnknownArgument || !starts_with_flag {
            return first;
        }
        let mut serve = args.clone();
        serve.insert(1, "serve".into());
        match Self::try_parse_from(serve) {
            Ok(cli) => Ok(cli),
            // A serve flag with a bad value: that error says more.
            Err(again) if again.kind() != clap::error::ErrorKind::UnknownArgument => Err(again),
            Err(_) => first,
        }
    }
}

/// `leasehold lock KEY echo hi` (or `elect`) fails on `echo`: the command goes after
/// `--` (so that its own flags are never taken for ours); say so.
fn with_lock_hint(mut e: clap::Error, args: &[std::ffi::OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let sub = args.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    let is_lock = sub == "lock" || sub == "elect";
    if is_lock && e.kind() == ErrorKind::UnknownArgument && !args.iter().any(|a| a == "--") {
        e.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![
                format!(
                    "put the command after `--`: leasehold {sub} KEY [OPTIONS] -- CMD [ARGS]..."
                )
                .into(),
            ]),
        );
    }
    e
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
// Parsed once per process; boxing `serve`'s many flags would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the lock server.
    Serve(serve::ServeArgs),
    /// Run a command while holding a lock: `leasehold lock NAME -- CMD ARGS...`.
    Lock(lock::LockArgs),
    /// Run a command while this process is the leader: `leasehold elect NAME -- CMD ARGS...`.
    Elect(election::ElectArgs),
    /// Print a lock's state, then one line per change, until stopped.
    Watch(election::WatchArgs),
    /// Take a lock and print the lease (not kept alive: renew or release it).
    Acquire(ops::AcquireArgs),
    /// Give a lock back with its token.
    Release(ops::ReleaseArgs),
    /// Extend a lock's TTL with its token.
    Renew(ops::RenewArgs),
    /// Show who holds a lock.
    Describe(ops::DescribeArgs),
    /// List held locks by key prefix (needs an admin grant).
    List(admin::ListArgs),
    /// Take a lock from its holder now, with a reason (needs an admin grant).
    ForceRelease(admin::ForceReleaseArgs),
    /// Measure Leasehold against the gRPC floor and direct Redis.
    #[cfg(feature = "bench")]
    Bench(crate::bench::BenchArgs),
    /// The bare tonic server `bench` compares against (internal).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchFloor(crate::bench::FloorArgs),
    /// A lock holder for `bench crash` to kill (internal).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchCrashHolder(crate::bench::CrashHolderArgs),
    /// SIGKILLs a command's process group when `lock` or `elect` dies
    /// (internal; see src/cli/watchdog.rs).
    #[command(hide = true)]
    Watchdog(watchdog::WatchdogArgs),
}

/// Sets up tracing: `LEASEHOLD_LOG` (or `RUST_LOG`) as an EnvFilter,
/// default `info`, written to stderr in the chosen format.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("LEASEHOLD_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Builds the tokio runtime the command line asked for.
pub fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    match cli.worker_threads {
        Some(0) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
}

/// Runs a parsed command line; the process exit code is the result.
pub async fn run(cli: Cli) -> i32 {
    // `leasehold` alone serves, every flag at its default or LEASEHOLD_* value.
    let command = match cli.command {
        Some(command) => command,
        None => match Cli::try_parse_from(["leasehold", "serve"]).map(|c| c.command) {
            Ok(Some(command)) => command,
            Ok(None) => return 2,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        },
    };
    let (name, result) = match command {
        Command::Serve(args) => ("serve", serve::run(args).await),
        #[cfg(feature = "bench")]
        Command::Bench(args) => ("bench", crate::bench::run(args).await),
        #[cfg(feature = "bench")]
        Command::BenchFloor(args) => ("bench-floor", crate::bench::run_floor(args).await),
        #[cfg(feature = "bench")]
        Command::BenchCrashHolder(args) => (
            "bench-crash-holder",
            crate::bench::run_crash_holder(args).await,
        ),
        Command::Watchdog(args) => return watchdog::run(args),
        Command::Lock(args) => return lock::run(args).await,
        Command::Elect(args) => return election::elect(args).await,
        Command::Watch(args) => return election::watch(args).await,
        Command::Acquire(args) => return ops::acquire(args).await,
        Command::Release(args) => return ops::release(args).await,
        Command::Renew(args) => return ops::renew(args).await,
        Command::Describe(args) => return ops::describe(args).await,
        Command::List(args) => return admin::list(args).await,
        Command::ForceRelease(args) => return admin::force_release(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("leasehold {name}: {e}");
            1
        }
    }
}
