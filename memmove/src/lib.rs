//! `memmove` for the static musl binaries we ship (agent, waypoint).
//!
//! musl's x86_64 `memmove` (src/string/x86_64/memmove.s) copies forward with
//! `memcpy` only when the destination is below the source; otherwise, also
//! when the two are *equal*, it sets the direction flag and copies byte by
//! byte backwards (`std; rep movsb`), which the CPU runs without its fast
//! string microcode: a cycle or more per byte. rustls's deframer ends every
//! `process_new_packets` with `copy_within(0..used, 0)` (nothing taken: it
//! moves the partial record it keeps onto itself), so on the HBONE data path
//! each 16 KiB TLS record read paid such a copy of the 2 KiB after it: 6 %
//! of the agents' CPU in the bulk benchmark (README, "Benchmark").
//!
//! Defining `memmove` in the program keeps musl's out of the link (a static
//! archive member is pulled only for a symbol still undefined), and every
//! caller, Rust or C, gets this one. Glibc builds keep glibc's (vectorised,
//! and it returns at once for equal pointers); the override is compiled for
//! `target_env = "musl"` only. A binary links it with `extern crate memmove;`.
#![no_std]
// LLVM recognises copy loops and replaces them with calls to memmove or
// memcpy; in this crate that call would be the function itself.
#![no_builtins]

/// Copies `n` bytes from `src` to `dst`, which may overlap, as C's
/// `memmove`, and returns `dst`.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `n` bytes.
pub unsafe fn move_bytes(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let (d, s) = (dst as usize, src as usize);
    if d == s || n == 0 {
        return dst;
    }
    if d.wrapping_sub(s) >= n && s.wrapping_sub(d) >= n {
        // Disjoint: the libc's memcpy (musl's is `rep movsq`, which the
        // CPU runs with its fast string microcode).
        // SAFETY: the caller's contract, and the ranges do not overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: the caller's contract; each direction reads every byte
    // before the copy overwrites it.
    unsafe {
        if d < s {
            forward(dst, src, n);
        } else {
            backward(dst, src, n);
        }
    }
    dst
}

unsafe extern "C" {
    fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
}

/// Overlapping, `dst` below `src`: front to back, a word at a time. A word
/// is read whole before it is written, and later reads lie above every
/// byte written so far, since `dst < src`.
unsafe fn forward(dst: *mut u8, src: *const u8, n: usize) {
    const W: usize = core::mem::size_of::<u64>();
    let mut i = 0;
    // SAFETY (all four accesses): i + W <= n, or i < n, inside both ranges.
    while i + W <= n {
        unsafe { (dst.add(i) as *mut u64).write_unaligned((src.add(i) as *const u64).read_unaligned()) };
        i += W;
    }
    while i < n {
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
    }
}

/// Overlapping, `dst` above `src`: back to front, a word at a time; later
/// reads lie below every byte written so far.
unsafe fn backward(dst: *mut u8, src: *const u8, n: usize) {
    const W: usize = core::mem::size_of::<u64>();
    let mut i = n;
    // SAFETY (all four accesses): i - W >= 0, or i > 0, inside both ranges.
    while i >= W {
        i -= W;
        unsafe { (dst.add(i) as *mut u64).write_unaligned((src.add(i) as *const u64).read_unaligned()) };
    }
    while i > 0 {
        i -= 1;
        unsafe { *dst.add(i) = *src.add(i) };
    }
}

/// The C symbol: every `memmove` of a musl build resolves here.
///
/// # Safety
/// As [`move_bytes`].
#[cfg(target_env = "musl")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract is the same.
    unsafe { move_bytes(dst, src, n) }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    /// A buffer whose bytes all differ (mod 251) so that a misplaced byte shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Every overlap the callers make (both directions, equal, disjoint,
    /// shifts below and above a word, unaligned starts, tails), checked
    /// against a copy through a separate buffer.
    #[test]
    fn moves_as_through_a_separate_buffer_for_every_overlap() {
        let len = 96;
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 40] {
            for from in 0..len - n {
                for to in 0..len - n {
                    let mut buf = pattern(len);
                    let mut want = buf.clone();
                    let part: Vec<u8> = want[from..from + n].to_vec();
                    want[to..to + n].copy_from_slice(&part);
                    let p = buf.as_mut_ptr();
                    // SAFETY: both ranges lie inside `buf`.
                    let ret = unsafe { super::move_bytes(p.add(to), p.add(from), n) };
                    assert_eq!(ret, p.wrapping_add(to));
                    assert_eq!(buf, want, "n={n} from={from} to={to}");
                }
            }
        }
    }

    #[test]
    fn moves_a_large_block_both_ways() {
        for (from, to) in [(0, 2031), (2031, 0), (3, 16406), (16406, 3), (100, 100)] {
            let n = 16384 + 17;
            let mut buf = pattern(40_000);
            let mut want = buf.clone();
            want.copy_within(from..from + n, to);
            let p = buf.as_mut_ptr();
            // SAFETY: both ranges lie inside `buf`.
            unsafe { super::move_bytes(p.add(to), p.add(from), n) };
            assert!(buf == want, "from={from} to={to}");
        }
    }
}
