//! The `leasehold` binary: parse flags, set up tracing, run the library.

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = leasehold::cli::Cli::parse();
    leasehold::cli::init_tracing(cli.log_format);
    let code = leasehold::cli::run(cli).await;
    std::process::exit(code);
}
