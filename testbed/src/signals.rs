//! Ctrl-C and SIGTERM for programs that build clusters (the demo, the
//! benchmark): the handler only sets a flag; a watcher thread tears every
//! cluster of the process down and exits with 130.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static STOP: AtomicBool = AtomicBool::new(false);
/// Files an interrupted program removes before it exits (a run's lock file).
static FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Settings an interrupted program writes back before it exits (the guest's
/// halt polling a benchmark set: `crate::idle::HaltPoll`).
static RESTORE: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers; `what` names what is torn down in the message.
pub fn teardown_on_signal(what: &'static str) {
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    // SIGHUP too: a dropped session must not leave clusters or settings.
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.expect("install signal handler");
    }
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: tearing {what} down");
            for f in FILES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = std::fs::remove_file(f);
            }
            for (path, value) in RESTORE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                restore(path, value);
            }
            if let Err(e) = crate::teardown_all() {
                eprintln!("teardown: {e:#}");
            }
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// Removes `file` too when a signal stops the program.
pub fn remove_when_interrupted(file: PathBuf) {
    FILES.lock().unwrap_or_else(|e| e.into_inner()).push(file);
}

/// Writes `value` back to `path` too when a signal stops the program.
pub fn restore_when_interrupted(path: PathBuf, value: String) {
    RESTORE.lock().unwrap_or_else(|e| e.into_inner()).push((path, value));
}

/// Writes `value` back to `path`, or says what to write by hand.
pub fn restore(path: &std::path::Path, value: &str) {
    if let Err(e) = std::fs::write(path, value) {
        eprintln!(
            "warning: cannot restore {} to {value}: {e} (write it back by hand)",
            path.display()
        );
    }
}

/// `path` is restored by its owner: a signal must not write it again (one
/// registration per path at a time).
pub fn forget_restore(path: &std::path::Path) {
    RESTORE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(p, _)| p != path);
}

/// Whether a signal asked the program to stop.
pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The `main` of a program that builds clusters (the benchmark, the soak):
/// handlers installed, `run` on the arguments `parse` made (`None`: help
/// was printed), every cluster torn down at the end. Exit code 0 when
/// `run` succeeds, 1 when it fails or says the run failed, 2 for bad
/// arguments (with `usage`), 130 when a signal stopped it.
pub fn program_main<O>(
    name: &str,
    usage: &str,
    what: &'static str,
    parse: impl FnOnce() -> anyhow::Result<Option<O>>,
    run: impl FnOnce(&O) -> anyhow::Result<bool>,
) -> ! {
    teardown_on_signal(what);
    let code = match parse() {
        Ok(None) => 0,
        Ok(Some(opts)) => match run(&opts) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("{name} failed: {e:#}");
                1
            }
        },
        Err(e) => {
            eprintln!("{name}: {e:#}\n\n{usage}");
            2
        }
    };
    // Everything is gone by now (Drop); make sure of it.
    if let Err(e) = crate::teardown_all() {
        eprintln!("teardown: {e:#}");
    }
    // An interrupted run fails in the main thread too (its clients get the
    // signal); let the exit code say it was interrupted.
    std::process::exit(if interrupted() { 130 } else { code });
}
