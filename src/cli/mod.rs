//! The `leasehold` command line: one binary, several subcommands. Each
//! subcommand's flags also read a `LEASEHOLD_*` environment variable.

pub mod connect;
pub mod lock;
pub mod ops;
pub mod serve;

use clap::{Parser, Subcommand, ValueEnum};

/// Leasehold: distributed locks over gRPC, kept alive over one stream,
/// stored in Redis.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LEASEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Runtime worker threads: 0 runs everything on one thread (least CPU
    /// per call), N on N threads; default: one per CPU.
    #[arg(long, global = true, env = "LEASEHOLD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// What to do; without a subcommand, `serve` with its defaults.
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// Take a lock and print the lease (not kept alive: renew or release it).
    Acquire(ops::AcquireArgs),
    /// Give a lock back with its token.
    Release(ops::ReleaseArgs),
    /// Extend a lock's TTL with its token.
    Renew(ops::RenewArgs),
    /// Show who holds a lock.
    Describe(ops::DescribeArgs),
    /// Measure Leasehold against the gRPC floor and direct Redis.
    Bench(crate::bench::BenchArgs),
    /// The bare tonic server `bench` compares against (internal).
    #[command(hide = true)]
    BenchFloor(crate::bench::FloorArgs),
    /// A lock holder for `bench crash` to kill (internal).
    #[command(hide = true)]
    BenchCrashHolder(crate::bench::CrashHolderArgs),
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
        Command::Bench(args) => ("bench", crate::bench::run(args).await),
        Command::BenchFloor(args) => ("bench-floor", crate::bench::run_floor(args).await),
        Command::BenchCrashHolder(args) => (
            "bench-crash-holder",
            crate::bench::run_crash_holder(args).await,
        ),
        Command::Lock(args) => return lock::run(args).await,
        Command::Acquire(args) => return ops::acquire(args).await,
        Command::Release(args) => return ops::release(args).await,
        Command::Renew(args) => return ops::renew(args).await,
        Command::Describe(args) => return ops::describe(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("leasehold {name}: {e}");
            1
        }
    }
}
