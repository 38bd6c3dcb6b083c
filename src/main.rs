//! The freqtag binary: parses flags, sets up logging, and turns errors into exit codes.

use clap::Parser;

/// mimalloc keeps freed pages for reuse: the forward passes allocate tens of MB per layer, and
/// glibc's malloc returns such blocks to the OS and page-faults them back in every time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = freqtag::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let code = match freqtag::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
