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
    // Transparent huge pages off for this process: mimalloc's per-thread segments were backed
    // by 2 MB pages of which a thread touched a few KB, so resident memory grew with the worker
    // count (paper pipeline, 16 workers here: 678 -> 557 MB; the quickstart on 16 workers 1.51
    // -> 1.29 GB). No run got slower (quickstart, 2 workers, 3 interleaved runs each: 9.0-10.0
    // s with, 8.9-10.0 s without), and the kernel's time went down (1.4-1.7 -> 0.6 s).
    // MIMALLOC_ALLOW_THP=1 keeps them.
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none_or(|v| v != "1") {
        // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    let cli = freqtag::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // colours only on a terminal: a log piped to a file or a pager stays plain text
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
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
