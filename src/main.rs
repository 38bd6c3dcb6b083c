//! The freqtag binary: parses flags, sets up logging, and turns errors into exit codes.

use clap::Parser;

/// mimalloc keeps freed pages for reuse: the forward passes allocate tens of MB per layer, and
/// glibc's malloc returns such blocks to the OS and page-faults them back in every time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's option enum (the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // Keep freed pages committed instead of purging them after 10 ms: the layers of a forward
    // pass free and re-allocate the same sizes, and every purge meant page faults and zeroing
    // again (about 3x fewer page faults, 5-15 % less CPU on the paper pipeline). A user's
    // MIMALLOC_PURGE_DELAY still wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called once, before any other thread exists
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
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
