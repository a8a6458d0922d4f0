//! The `leasehold` binary: parse flags, set up tracing, run the library.

/// mimalloc instead of glibc malloc: the RPC path allocates many small,
/// short-lived buffers, and the profile showed malloc/free near the top.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = match leasehold::cli::Cli::parse_from_args(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    leasehold::cli::init_tracing(cli.log_format);
    let code = match leasehold::cli::runtime(&cli) {
        Ok(runtime) => runtime.block_on(leasehold::cli::run(cli)),
        Err(e) => {
            eprintln!("leasehold: cannot start the async runtime: {e}");
            1
        }
    };
    std::process::exit(code);
}
