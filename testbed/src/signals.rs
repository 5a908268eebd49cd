//! Ctrl-C and SIGTERM for programs that build clusters (the demo, the
//! benchmark): the handler only sets a flag; a watcher thread tears every
//! cluster of the process down and exits with 130.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers; `what` names what is torn down in the message.
pub fn teardown_on_signal(what: &'static str) {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: tearing {what} down");
            if let Err(e) = crate::teardown_all() {
                eprintln!("teardown: {e:#}");
            }
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// Whether a signal asked the program to stop.
pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}
