//! The freqtag binary: parses flags, sets up logging, and turns errors into exit codes.

use clap::Parser;

/// With the `mimalloc` feature: mimalloc, its freed pages kept (purge delay -1) unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. Without it, glibc's malloc tuned (src/malloc.rs).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called before any other thread exists; 15 is mi_option_purge_delay
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
    // glibc's malloc, set to keep its heaps (src/malloc.rs)
    #[cfg(not(feature = "mimalloc"))]
    freqtag::malloc::tune();
    // Transparent huge pages off for this process, where the system backs any large mapping
    // with them: each thread's heap would be backed by 2 MB pages of which it touches a few KB,
    // so resident memory would grow with the worker count (under mimalloc, until session 19,
    // the paper pipeline on 16 workers took 678 against 557 MB with them, and no run got
    // slower without). FREQTAG_ALLOW_THP=1 keeps them.
    #[cfg(target_os = "linux")]
    if std::env::var_os("FREQTAG_ALLOW_THP").is_none_or(|v| v != "1") {
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
