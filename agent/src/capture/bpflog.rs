//! `agent run --bpf-log`: the kernel programs' aya-log records, read from
//! their ring buffer and written through `tracing` (target `bpf`), so an
//! operator sees why each connection was or was not captured.
//!
//! Off by default: the programs are then loaded with `AYA_LOG_LEVEL` = 0,
//! which lives in frozen read-only data, so the verifier removes the logging
//! code and nothing reaches the ring buffer.
use std::{os::fd::AsFd, time::Duration};

use aya::Ebpf;
use aya_log::EbpfLogger;

use super::CaptureError;

/// The level the kernel programs log at (aya-log's `Level::Debug`).
pub const DEBUG: u8 = aya_log::Level::Debug as u8;
/// Nothing is logged.
pub const OFF: u8 = 0;

/// How long one wait for records lasts; bounds how late a shutdown is seen
/// and how long records wait when the ring wakes no one.
const POLL: Duration = Duration::from_millis(500);

/// Forwards aya-log records to `tracing`.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // The operator asked for these with --bpf-log: emit them at info
        // (under target `bpf`) so the default filter shows them; the kernel
        // level stays in a field.
        tracing::info!(target: "bpf", bpf_level = %record.level(), "{}", record.args());
    }

    fn flush(&self) {}
}

/// Takes the log ring out of `ebpf` and reads it on a thread for as long as
/// the process lives. Call after every program is loaded: the ring's fd must
/// stay open while programs that write to it are loaded and attached (aya's
/// pitfall: dropping the logger breaks the next program load).
pub fn start(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let mut logger = EbpfLogger::init_with_logger(ebpf, ToTracing).map_err(|e| CaptureError::Bpf {
        what: "aya-log".into(),
        message: e.to_string(),
    })?;
    std::thread::Builder::new()
        .name("bpf-log".into())
        .spawn(move || loop {
            wait_readable(&logger);
            logger.flush();
        })
        .map_err(|e| CaptureError::Bpf {
            what: "aya-log reader thread".into(),
            message: e.to_string(),
        })?;
    tracing::info!("kernel program logs on (--bpf-log): each capture decision is logged under target `bpf`");
    Ok(())
}

/// Blocks until the ring has records or [`POLL`] passes.
fn wait_readable(fd: &impl AsFd) {
    if super::sys::poll(fd.as_fd(), libc::POLLIN, Some(POLL)).is_err() {
        // EINTR or the like: do not spin.
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use agent_common::programs as progs;
    use aya::{programs::CgroupSockAddr, EbpfLoader};

    use super::*;
    use crate::capture::sys;

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

    /// Size of connect4 after verification, loaded at `level`.
    fn connect4_size(level: u8, pins: &Path) -> u32 {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins)
            .override_global(aya_log::LEVEL, &level, true)
            .load(OBJECT)
            .expect("run `cargo xtask build-ebpf` before the unit tests");
        let prog: &mut CgroupSockAddr = ebpf.program_mut(progs::CONNECT4).unwrap().try_into().unwrap();
        prog.load().unwrap();
        sys::prog_info(prog.fd().unwrap().as_fd()).unwrap().xlated_len
    }

    #[test]
    fn logging_code_is_gone_when_off() {
        let pins = crate::capture::TestPins::new("bpflog");
        let (off, on) = (connect4_size(OFF, &pins.0), connect4_size(DEBUG, &pins.0));
        // The level is frozen read-only data: with it at 0 the verifier
        // drops every logging branch, so the program is much smaller.
        assert!(off * 2 < on, "connect4 is {off} bytes with logs off, {on} with logs on");
    }
}
