//! The guest's idle settings, which decide what a wake-up costs.
//!
//! On the development VMs (Firecracker, `cpuidle_haltpoll.force=1
//! haltpoll.guest_halt_poll_ns=0` on the kernel command line) an idle vCPU
//! halts at once, and waking it costs a trip through the host (measured in
//! README, "Idle vCPUs"). Every hop of the mesh adds such wake-ups, so a
//! benchmark records the setting it ran under, and `mesh-bench
//! --halt-poll-ns` can set it for one run (restored afterwards, also when
//! the run is interrupted).
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// The haltpoll driver's polling time, where the guest kernel has it.
pub const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
/// The cpuidle driver in use (`haltpoll`, `intel_idle`, `acpi_idle`, ...).
pub const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";

/// What the machine's idle settings were during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idle {
    /// `None`: no cpuidle driver (or sysfs not readable).
    pub driver: Option<String>,
    /// `None`: the kernel has no guest halt polling.
    pub halt_poll_ns: Option<u64>,
    /// The benchmark set `halt_poll_ns` for this run (`--halt-poll-ns`).
    pub set_for_run: bool,
}

impl Idle {
    /// The settings now.
    pub fn read(set_for_run: bool) -> Self {
        Self::read_from(Path::new(CPUIDLE_DRIVER), Path::new(HALT_POLL_NS), set_for_run)
    }

    fn read_from(driver: &Path, halt_poll: &Path, set_for_run: bool) -> Self {
        let text = |p: &Path| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        Self {
            driver: text(driver).filter(|d| !d.is_empty() && d != "none"),
            halt_poll_ns: text(halt_poll).and_then(|s| s.parse().ok()),
            set_for_run,
        }
    }

    /// For a report's header: "idle: haltpoll, guest halt polling 0 ns (as found)".
    pub fn describe(&self) -> String {
        let driver = self.driver.as_deref().unwrap_or("no cpuidle driver");
        match self.halt_poll_ns {
            Some(ns) => format!(
                "idle: {driver}, guest halt polling {ns} ns ({})",
                if self.set_for_run {
                    "set for this run"
                } else {
                    "as found"
                }
            ),
            None => format!("idle: {driver}"),
        }
    }

    /// The `--halt-poll-ns` of a run's "Reproduce" line.
    pub fn halt_poll_arg(&self) -> String {
        match (self.set_for_run, self.halt_poll_ns) {
            (true, Some(ns)) => format!(" --halt-poll-ns {ns}"),
            _ => String::new(),
        }
    }

    /// For a report's header, read again at its end: says so if the
    /// setting changed during the run.
    pub fn describe_run(&self) -> String {
        let now = Self::read(self.set_for_run);
        match now == *self {
            true => self.describe(),
            false => format!("{} (changed during the run: {})", self.describe(), now.describe()),
        }
    }

    /// For a run's raw numbers.
    pub fn to_json(&self) -> Value {
        json!({
            "cpuidle_driver": self.driver,
            "guest_halt_poll_ns": self.halt_poll_ns,
            "set_for_run": self.set_for_run,
        })
    }
}

/// Guest halt polling set for a run; the value found is written back when
/// this is dropped, or by the signal watcher if the run is interrupted
/// ([`crate::signals::restore_when_interrupted`]: SIGINT, SIGTERM,
/// SIGHUP). A run killed with SIGKILL leaves it set: the next run's header
/// shows the value it found. One guard per path at a time.
pub struct HaltPoll {
    path: PathBuf,
    previous: String,
}

impl HaltPoll {
    /// Sets [`HALT_POLL_NS`] to `ns` for as long as the guard lives.
    pub fn set(ns: u64) -> Result<Self> {
        Self::set_at(Path::new(CPUIDLE_DRIVER), Path::new(HALT_POLL_NS), ns)
    }

    fn set_at(driver: &Path, path: &Path, ns: u64) -> Result<Self> {
        // The parameter exists wherever the module is built in, but only
        // the haltpoll driver polls.
        let found = fs::read_to_string(driver).unwrap_or_default();
        anyhow::ensure!(
            found.trim() == "haltpoll",
            "--halt-poll-ns needs the haltpoll cpuidle driver, and this machine's is {:?} ({}): run without the option",
            found.trim(),
            driver.display()
        );
        let previous = fs::read_to_string(path)
            .with_context(|| {
                format!(
                    "--halt-poll-ns needs the guest haltpoll driver ({} is not readable): \
                     this kernel has no guest halt polling, run without the option",
                    path.display()
                )
            })?
            .trim()
            .to_string();
        // Registered first: a signal between the two still restores it.
        crate::signals::restore_when_interrupted(path.to_path_buf(), previous.clone());
        if let Err(e) = fs::write(path, ns.to_string()) {
            crate::signals::forget_restore(path);
            return Err(e).with_context(|| format!("cannot set {} to {ns} (run as root)", path.display()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            previous,
        })
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        crate::signals::forget_restore(&self.path);
        crate::signals::restore(&self.path, &self.previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of the test's own, removed even when it fails.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("idle-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn halt_polling_is_set_for_the_guards_life_and_restored_after() {
        let dir = Scratch::new("set");
        let (driver, poll) = (dir.0.join("current_driver"), dir.0.join("guest_halt_poll_ns"));
        fs::write(&driver, "haltpoll\n").unwrap();
        fs::write(&poll, "0\n").unwrap();
        assert_eq!(
            Idle::read_from(&driver, &poll, false).describe(),
            "idle: haltpoll, guest halt polling 0 ns (as found)"
        );
        {
            let _guard = HaltPoll::set_at(&driver, &poll, 200_000).unwrap();
            let set = Idle::read_from(&driver, &poll, true);
            assert_eq!(set.halt_poll_ns, Some(200_000));
            assert_eq!(set.to_json()["guest_halt_poll_ns"], 200_000);
        }
        assert_eq!(fs::read_to_string(&poll).unwrap(), "0", "not restored");
    }

    #[test]
    fn a_kernel_without_halt_polling_is_said_so() {
        let dir = Scratch::new("missing");
        let missing = dir.0.join("guest_halt_poll_ns");
        let idle = Idle::read_from(&dir.0.join("current_driver"), &missing, false);
        assert_eq!(idle.describe(), "idle: no cpuidle driver");
        let e = HaltPoll::set_at(&dir.0.join("current_driver"), &missing, 1)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("run without the option"), "{e:#}");
        // The parameter is there, the driver is another: nothing would poll.
        fs::write(&missing, "0\n").unwrap();
        let other = dir.0.join("other_driver");
        fs::write(&other, "acpi_idle\n").unwrap();
        let e = HaltPoll::set_at(&other, &missing, 1).err().unwrap();
        assert!(format!("{e:#}").contains("acpi_idle"), "{e:#}");
        assert_eq!(fs::read_to_string(&missing).unwrap(), "0\n", "written anyway");
    }
}
