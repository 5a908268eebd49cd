//! Handing freed memory back to the kernel. Every binary's global allocator
//! is mimalloc (declared in each `main.rs`); it keeps freed pages for a
//! purge delay (1 s by default) and purges them only when the same process
//! allocates again. A process that goes idle right after a burst (the agent
//! after loading its eBPF objects and its first translation, the waypoint
//! after start-up) would keep that burst's peak as its idle RSS.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    ffi::c_void,
};

use libmimalloc_sys::{mi_free, mi_malloc_aligned, mi_realloc_aligned, mi_zalloc_aligned};

/// The global allocator of the agent and the waypoint: mimalloc, except
/// that a large block allocated on a thread marked with [`control_thread`]
/// gets pages of its own, mapped when it is allocated and unmapped when it
/// is freed.
///
/// Why: mimalloc puts blocks of 84 to 512 KiB in 4 MiB pages, one size
/// class per page, and a page goes back to the kernel only when all its
/// blocks are free. The control path rebuilds its tables of that size for
/// every batch of changes (the translated pods, the workloads by IP). Each
/// rebuild freed the last copy inside a page that a live table still
/// held: 2.4 MB of freed blocks stayed resident at 10,000 pods watched.
/// The data path's large blocks (the tunnels' read buffers) are reused
/// from its threads' own pages, and keep being: mapping and unmapping them
/// per connection cost a third of the HBONE throughput when tried.
pub struct Allocator;

/// Control-thread blocks of at least this size get pages of their own.
/// mimalloc shares its pages among blocks up to 512 KiB (its 512 KiB pages
/// hold those up to 84 KiB, its 4 MiB pages the larger ones); it maps a
/// larger block pages of its own already.
const OWN_PAGES_FROM: usize = 64 << 10;

/// An alignment above mimalloc's over-allocation limit (64 KiB): it then
/// maps a block a page of its own from the kernel, outside its arenas, and
/// unmaps it when the block is freed.
const OWN_PAGES_ALIGN: usize = 128 << 10;

thread_local! {
    /// This thread runs the control path (see [`control_thread`]). A const
    /// initialiser and no destructor: reading it never allocates.
    static CONTROL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a control-path thread: its large blocks get
/// pages of their own (see [`Allocator`]). Call it first on the thread;
/// never on a data-path thread.
pub fn control_thread() {
    CONTROL.set(true);
}

/// The alignment to ask mimalloc for a block of `size` bytes.
#[inline]
fn align_for(size: usize, align: usize) -> usize {
    if size >= OWN_PAGES_FROM && CONTROL.get() {
        align.max(OWN_PAGES_ALIGN)
    } else {
        align
    }
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free`
// finds a block's page whatever alignment it was allocated with); an
// alignment is only ever raised, so every block is aligned as its layout
// asks.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's aligned malloc accepts any size and any
        // power-of-two alignment (`align_for` returns one).
        unsafe { mi_malloc_aligned(layout.size(), align_for(layout.size(), layout.align())).cast() }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { mi_zalloc_aligned(layout.size(), align_for(layout.size(), layout.align())).cast() }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (the caller's
        // contract), so by mimalloc.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is mimalloc's (as in `dealloc`); mimalloc keeps the
        // block where it is only when it already has the alignment asked.
        unsafe { mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align_for(new_size, layout.align())).cast() }
    }
}

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

/// Unmaps the pages of this program's own code and read-only data that are
/// resident now; call it once, after start-up. They are clean pages of the
/// executable file, so nothing is lost: the page cache keeps them (shared
/// with every process that maps the file, and reclaimable by the kernel),
/// and a page the program runs again is mapped back by a minor fault. Much
/// of what start-up ran (flags, configuration, loading and relocating the
/// eBPF objects) never runs again, but the kernel maps code in 64 KiB
/// windows (fault-around), so it stayed resident: 10 of the agent's
/// 12.7 MB idle RSS were pages of its binary. Only mappings of the
/// executable that cannot be written and hold no private copy of a page
/// (`Anonymous: 0 kB`; the relocated data made read-only after start has
/// some) are unmapped, so what a later fault maps is what was there.
/// Returns the bytes of resident set they held.
pub fn release_startup_code() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in clean_file_mappings(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of this process's executable
        // that is neither writable nor holds a private page (checked in
        // smaps above; it cannot gain one: a write to it faults). Dropping
        // its page table entries loses nothing: a later access maps the
        // same file page again, the code of this very function included.
        if unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        released += m.rss;
    }
    Ok(released)
}

/// Start-up is over (the first model applied, the first certificates in):
/// unmaps its code with [`release_startup_code`] and says how it went.
pub fn startup_over() {
    match release_startup_code() {
        Ok(bytes) => tracing::debug!(kib = bytes >> 10, "start-up over: its code unmapped"),
        Err(e) => tracing::warn!(error = %e, "cannot unmap the start-up code; idle memory stays higher"),
    }
}

/// A mapping of the executable that [`release_startup_code`] may drop.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    len: usize,
    /// Resident bytes (smaps' `Rss`).
    rss: u64,
}

/// The mappings in `smaps` (the text of `/proc/<pid>/smaps`) of the file
/// `exe` that are private, not writable, resident, and say they hold no
/// anonymous (copied-on-write) page.
fn clean_file_mappings(smaps: &str, exe: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping whose block is being read, while it still qualifies, and
    // whether its block said `Anonymous: 0 kB`.
    let mut cur: Option<(Mapping, bool)> = None;
    for line in smaps.lines() {
        if let Some((start, end, rest)) = header(line) {
            out.extend(cur.take().filter(|(m, clean)| *clean && m.rss > 0).map(|(m, _)| m));
            let mut fields = rest.splitn(5, ' ');
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("").trim_start();
            if path == exe && perms.as_bytes().get(1) == Some(&b'-') && perms.ends_with('p') {
                cur = Some((
                    Mapping {
                        start,
                        len: end - start,
                        rss: 0,
                    },
                    false,
                ));
            }
        } else if let Some((m, clean)) = cur.as_mut() {
            match kib_field(line) {
                Some(("Rss", kib)) => m.rss = kib * 1024,
                Some(("Anonymous", 0)) => *clean = true,
                Some(("Anonymous", _)) => cur = None,
                _ => {}
            }
        }
    }
    out.extend(cur.filter(|(m, clean)| *clean && m.rss > 0).map(|(m, _)| m));
    out
}

/// `start`, `end` and the rest of a mapping's header line in smaps.
fn header(line: &str) -> Option<(usize, usize, &str)> {
    let (range, rest) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    (end > start).then_some((start, end, rest))
}

/// `Key:   123 kB` of smaps as `("Key", 123)`.
fn kib_field(line: &str) -> Option<(&str, u64)> {
    let (key, value) = line.split_once(':')?;
    let kib = value.trim().strip_suffix(" kB")?.trim().parse().ok()?;
    Some((key, kib))
}

#[cfg(test)]
mod tests {
    use libmimalloc_sys::{mi_free, mi_malloc};
    use std::sync::Mutex;

    /// The tests below measure this process's RSS: one at a time.
    static RSS: Mutex<()> = Mutex::new(());

    /// A KiB field of `/proc/self/status` (`VmRSS`, `RssFile`, ...).
    fn status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn rss_kib() -> u64 {
        status_kib("VmRSS")
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

    /// Runs `f` on a new thread, marked as a control thread or not.
    fn on_thread<T: Send + 'static>(control: bool, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            if control {
                super::control_thread();
            }
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_control_threads_large_block_goes_back_to_the_kernel_when_freed() {
        use std::alloc::{GlobalAlloc, Layout};
        let _one = RSS.lock().unwrap_or_else(|e| e.into_inner());
        // Tables of a batch, interleaved with tables that stay: in pages
        // shared by one size class, every freed block would share its page
        // with a live one, and stay resident.
        let (before, after) = on_thread(true, || {
            let layout = Layout::from_size_align(256 << 10, 8).unwrap();
            let alloc = |_| {
                // SAFETY: a non-zero size; checked, then touched within it.
                let p = unsafe { super::Allocator.alloc(layout) };
                assert!(!p.is_null());
                unsafe { p.write_bytes(1, layout.size()) };
                p as usize
            };
            let blocks: Vec<(usize, usize)> = (0..64).map(|i| (alloc(i), alloc(i))).collect();
            let before = rss_kib();
            for (_, freed) in &blocks {
                // SAFETY: allocated above with `layout`, freed once.
                unsafe { super::Allocator.dealloc(*freed as *mut u8, layout) };
            }
            super::release_freed();
            let after = rss_kib();
            for (kept, _) in blocks {
                // SAFETY: as above.
                unsafe { super::Allocator.dealloc(kept as *mut u8, layout) };
            }
            // Nothing left resident for the next test that measures RSS.
            super::release_freed();
            (before, after)
        });
        // 16 MiB freed; other tests of this binary allocate meanwhile.
        assert!(
            after + 12 * 1024 <= before,
            "freed blocks stayed resident: {before} KiB before freeing 16 MiB, {after} after"
        );
    }

    #[test]
    fn blocks_keep_their_contents_and_alignment_across_reallocs() {
        use std::alloc::{GlobalAlloc, Layout};
        for control in [true, false] {
            on_thread(control, move || {
                let a = super::Allocator;
                // Grown from a shared page to pages of its own and back.
                let mut layout = Layout::from_size_align(1000, 8).unwrap();
                // SAFETY: non-zero sizes; every access within the block's
                // current size; each block freed once with its layout.
                unsafe {
                    let mut p = a.alloc(layout);
                    for i in 0..1000 {
                        *p.add(i) = i as u8;
                    }
                    for size in [100 << 10, 700 << 10, 2000] {
                        p = a.realloc(p, layout, size);
                        assert!(!p.is_null());
                        layout = Layout::from_size_align(size, 8).unwrap();
                        assert!(
                            (0..1000).all(|i| *p.add(i) == i as u8),
                            "control: {control}, size {size}"
                        );
                    }
                    a.dealloc(p, layout);
                    // A larger alignment than the one raised to is kept.
                    let big = Layout::from_size_align(70 << 10, 256 << 10).unwrap();
                    let p = a.alloc_zeroed(big);
                    assert_eq!(p as usize % (256 << 10), 0);
                    assert!((0..big.size()).all(|i| *p.add(i) == 0));
                    a.dealloc(p, big);
                }
            });
        }
    }

    /// An excerpt of a static-pie binary's smaps: read-only data, code,
    /// relocated data made read-only after start (private copies), data,
    /// another file, an anonymous executable mapping.
    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r--p 00000000 fd:01 1234                       /usr/bin/agent
Size:               2048 kB
Rss:                1600 kB
Anonymous:             0 kB
55d0c0200000-55d0c1400000 r-xp 00200000 fd:01 1234                       /usr/bin/agent
Size:              18432 kB
Rss:                8512 kB
Anonymous:             0 kB
55d0c1400000-55d0c1470000 r--p 01400000 fd:01 1234                       /usr/bin/agent
Size:                448 kB
Rss:                 448 kB
Anonymous:           448 kB
55d0c1470000-55d0c1480000 rw-p 01470000 fd:01 1234                       /usr/bin/agent
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
55d0c1480000-55d0c1490000 r--p 00000000 fd:01 99                         /usr/bin/agent-old
Size:                 64 kB
Rss:                  64 kB
Anonymous:             0 kB
7f0000000000-7f0000100000 r-xp 00000000 00:00 0 
Size:               1024 kB
Rss:                  12 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_executable_are_dropped() {
        let got = super::clean_file_mappings(SMAPS, "/usr/bin/agent");
        assert_eq!(
            got,
            [
                super::Mapping {
                    start: 0x55d0c0000000,
                    len: 2048 << 10,
                    rss: 1600 << 10
                },
                super::Mapping {
                    start: 0x55d0c0200000,
                    len: 18432 << 10,
                    rss: 8512 << 10
                },
            ]
        );
        // A mapping whose block says nothing of private copies is kept.
        let unsure = SMAPS.replace("Anonymous:             0 kB\n55d0c0200000", "55d0c0200000");
        assert_eq!(super::clean_file_mappings(&unsure, "/usr/bin/agent").len(), 1);
    }

    #[test]
    fn release_startup_code_unmaps_the_resident_code_and_it_still_runs() {
        let _one = RSS.lock().unwrap_or_else(|e| e.into_inner());
        let before = status_kib("RssFile");
        let released = super::release_startup_code().unwrap();
        let after = status_kib("RssFile");
        // The code that ran so far (the harness, std, this crate's other
        // tests) was resident; only what runs from here on comes back.
        assert!(released >= 256 << 10, "released only {released} bytes");
        assert!(
            after + 128 < before,
            "file-backed RSS {before} KiB before, {after} KiB after releasing {released} bytes"
        );
        // Code and read-only data that were unmapped still work.
        assert_eq!(super::clean_file_mappings(SMAPS, "/usr/bin/agent").len(), 2);
    }
}
