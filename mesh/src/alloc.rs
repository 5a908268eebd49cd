//! Handing freed memory back to the kernel. Every binary's global allocator
//! is mimalloc (declared in each `main.rs`); it keeps freed pages for a
//! purge delay (1 s by default) and purges them only when the same process
//! allocates again. A process that goes idle right after a burst (the agent
//! after loading its eBPF objects and its first translation, the waypoint
//! after start-up) would keep that burst's peak as its idle RSS.

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3
/// option tables; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc hand memory back to the kernel as soon as a span of it is
/// free, instead of a purge delay later; call it first in `main`. The
/// agent's control path frees a model's worth of memory on every change,
/// and with the delay most of what it freed stayed resident: 7 MB per
/// 1,000 pods watched instead of 2.5 MB. The data path's buffers are
/// reused from the thread's own pages, so it rarely frees a whole span
/// (no CPU cost showed in the L4 benchmark). An operator who set
/// `MIMALLOC_PURGE_DELAY` keeps their value.
pub fn purge_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer in mimalloc's option table; any thread, any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

/// Returns every freed page of every thread to the kernel now (mimalloc's
/// forced collect purges all arenas). Costs a few madvise calls: call it
/// on the control path after a burst, never per connection.
pub fn release_freed() {
    // SAFETY: no arguments to uphold; safe to call from any thread at any
    // time, also when mimalloc is not the global allocator (a no-op then).
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Turns transparent huge pages off for this process; call it first in
/// `main`. mimalloc asks for them on its segments (`MADV_HUGEPAGE`), and
/// the kernel then makes each touched 2 MiB of a sparse heap resident at
/// once: 6 of the idle agent's 19 MB were such pages. A proxy's heap is
/// small and scattered; TLB reach is not what it lacks. (mimalloc's own
/// switch, `MIMALLOC_ALLOW_THP=0`, is an environment variable the
/// operator would have to set.)
pub fn no_huge_pages() {
    // SAFETY: integer arguments only; it changes a flag of this process.
    // Refused only by kernels before 3.15: huge pages then stay allowed.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use libmimalloc_sys::{mi_free, mi_malloc};
    use std::sync::Mutex;

    /// The tests below measure this process's RSS: one at a time.
    static RSS: Mutex<()> = Mutex::new(());

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn no_huge_pages_turns_them_off_for_the_process() {
        super::no_huge_pages();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.lines().any(|l| l == "THP_enabled:\t0"), "{status}");
    }

    /// Allocates and touches 64 MiB with mimalloc, frees it, calls `after_free`;
    /// returns the RSS (KiB) before, at the peak and after.
    fn burst(after_free: fn()) -> (u64, u64, u64) {
        // mimalloc is not this test binary's global allocator: use it directly.
        const BLOCK: usize = 256 << 10;
        const BLOCKS: usize = 256; // 64 MiB
        let before = rss_kib();
        let blocks: Vec<*mut u8> = (0..BLOCKS)
            .map(|_| {
                // SAFETY: plain allocation, checked below, freed once below.
                let p = unsafe { mi_malloc(BLOCK) }.cast::<u8>();
                assert!(!p.is_null());
                // SAFETY: `p` holds BLOCK bytes; touching them makes them resident.
                unsafe { p.write_bytes(1, BLOCK) };
                p
            })
            .collect();
        let peak = rss_kib();
        for p in blocks {
            // SAFETY: allocated above by mi_malloc, freed once.
            unsafe { mi_free(p.cast()) };
        }
        after_free();
        let after = rss_kib();
        assert!(
            peak >= before + 48 * 1024,
            "the burst was not resident: {before} -> {peak} KiB"
        );
        (before, peak, after)
    }

    #[test]
    fn release_freed_hands_a_freed_burst_back() {
        let _one = RSS.lock().unwrap_or_else(|e| e.into_inner());
        let (before, peak, after) = burst(super::release_freed);
        assert!(
            after <= before + 16 * 1024,
            "freed memory kept: {before} KiB before, {peak} at the peak, {after} after"
        );
    }

    #[test]
    fn purge_at_once_hands_a_freed_burst_back_without_a_collect() {
        let _one = RSS.lock().unwrap_or_else(|e| e.into_inner());
        // The option is process-wide: restore the delay for the other tests.
        // SAFETY: reads and sets one integer of mimalloc's option table.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert!(
            std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
            "unset MIMALLOC_PURGE_DELAY to run this test: it overrides purge_at_once"
        );
        super::purge_at_once();
        let (before, peak, after) = burst(|| {});
        // SAFETY: as above.
        unsafe { libmimalloc_sys::mi_option_set(super::MI_OPTION_PURGE_DELAY, delay) };
        assert!(
            after <= before + 16 * 1024,
            "freed memory kept until a collect: {before} KiB before, {peak} at the peak, {after} after"
        );
    }
}
