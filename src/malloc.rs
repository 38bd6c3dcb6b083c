//! The C library's malloc, tuned for the forward passes' large blocks.
//!
//! A forward pass allocates and frees blocks of megabytes layer after layer (activations, the
//! frames, Parquet's buffers). glibc's malloc by default maps such blocks afresh and hands freed
//! memory back to the system, so every pass faults its pages in again (session 18 measured it
//! 8-10 % slower than mimalloc on the paper pipeline, with 3.4x the page faults). With its
//! thresholds raised ([`tune`]) it keeps its heaps and reuses them: fewer page faults than
//! mimalloc's, and since it merges free neighbours into blocks of any size, much less resident
//! memory across many workers than mimalloc, which kept each thread's freed pages for blocks of
//! about the same size (README, "Speed", session 19). Blocks above 256 MiB are still mapped on
//! their own.

/// Sets glibc's malloc to keep its memory: blocks up to 256 MiB come from its heaps rather than
/// fresh mappings (`M_MMAP_THRESHOLD`), and free memory stays in the heaps rather than going
/// back to the system (`M_TRIM_THRESHOLD` 1 GiB). A user's `GLIBC_TUNABLES` that set any of
/// malloc's parameters win: then nothing is changed. Call once, before other threads start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("GLIBC_TUNABLES").map_or(true, |t| !t.contains("glibc.malloc.")) {
        // SAFETY: mallopt only sets malloc's parameters
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// After [`super::tune`] a 40 MB block comes from malloc's heap, not a mapping of its own.
    /// Untuned glibc maps every block above 32 MB (its threshold's ceiling), however its
    /// threshold has moved, so this fails without the tuning.
    #[test]
    fn tuned_malloc_keeps_large_blocks_in_its_heap() {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            eprintln!("SKIPPED: GLIBC_TUNABLES sets malloc's parameters, so tune() leaves them");
            return;
        }
        super::tune();
        let mapped = || unsafe { libc::mallinfo2() }.hblkhd;
        let before = mapped();
        let block = vec![1u8; 40 << 20];
        let during = mapped();
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 40 << 20);
        drop(block);
        assert!(
            during < before + (40 << 20),
            "a 40 MB block was mapped on its own ({before} -> {during} bytes in mappings)"
        );
    }
}
