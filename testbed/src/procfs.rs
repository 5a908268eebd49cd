//! What the benchmarks read of a process from /proc: memory and CPU time.
use anyhow::{bail, ensure, Context, Result};

/// A `kB` line of /proc/<pid>/status (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// VmRSS once it has stopped moving: three reads 100 ms apart within 64 kB
/// of each other, or the last read after 5 s. An agent that just became
/// ready is still handing its start-up burst back (mimalloc's collect), so
/// one read right then measured anything between 19 and 32 MB.
pub fn settled_rss_kb(pid: u32) -> Result<u64> {
    let mut reads = vec![status_kb(pid, "VmRSS")?];
    for _ in 0..50 {
        if let [.., a, b, c] = reads[..] {
            if a.max(b).max(c) - a.min(b).min(c) <= 64 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        reads.push(status_kb(pid, "VmRSS")?);
    }
    Ok(*reads.last().expect("one read at least"))
}

/// Clock ticks per second (the unit of [`cpu_ticks`]).
pub fn clock_ticks() -> Result<f64> {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(t > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(t as f64)
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let (user, system) = user_system_ticks(pid)?;
    Ok(user + system)
}

/// utime and stime of a process (all its threads), in clock ticks. User
/// time is the process's own code alone; system time also holds kernel
/// work it happened to run for others (a send on a veth delivers the
/// segment to the receiver in the sender's system call), so it moves with
/// the scheduler more than with the program.
pub fn user_system_ticks(pid: u32) -> Result<(u64, u64)> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// utime and stime from the `stat` file at `path` (a process's or a thread's).
fn stat_ticks(path: &str) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}: gone?"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "short {path}");
    ensure!(f[0] != "Z", "{path}: a zombie");
    Ok((f[11].parse::<u64>()?, f[12].parse::<u64>()?))
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / clock_ticks()?)
}

/// utime + stime, in seconds, of the thread of process `pid` named `name`
/// (its `comm`; the first one found if several share it).
pub fn thread_cpu_seconds(pid: u32, name: &str) -> Result<f64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("process {pid} is gone"))? {
        let dir = task?.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let (user, system) = stat_ticks(&dir.join("stat").to_string_lossy())?;
            return Ok((user + system) as f64 / clock_ticks()?);
        }
    }
    bail!("process {pid} has no thread named {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(status_kb(me, "VmRSS").unwrap() > 0);
        assert!(status_kb(me, "NoSuchField").is_err());
        assert!(settled_rss_kb(me).unwrap() > 0);
        // Burn a little CPU so the count is not zero.
        let mut x = 0u64;
        while cpu_ticks(me).unwrap() == 0 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(cpu_seconds(me).unwrap() > 0.0, "{x}");
        // That loop runs in user space: its ticks are user time.
        while user_system_ticks(me).unwrap().0 == 0 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let (user, system) = user_system_ticks(me).unwrap();
        assert!(user > 0 && user + system <= cpu_ticks(me).unwrap(), "{x}");
    }

    #[test]
    fn reads_one_thread_by_name() {
        let me = std::process::id();
        let (ready, stop) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let busy = std::thread::Builder::new()
            .name("procfs-busy".into())
            .spawn(move || {
                // Spins until it has a tick of CPU, then waits to be read.
                while thread_cpu_seconds(me, "procfs-busy").unwrap() == 0.0 {
                    std::hint::black_box(0u64);
                }
                ready.0.send(()).unwrap();
                stop.1.recv().unwrap();
            })
            .unwrap();
        ready.1.recv().unwrap();
        let busy_s = thread_cpu_seconds(me, "procfs-busy").unwrap();
        assert!(busy_s > 0.0 && busy_s <= cpu_seconds(me).unwrap(), "{busy_s}");
        assert!(thread_cpu_seconds(me, "no-such-thread").is_err());
        stop.0.send(()).unwrap();
        busy.join().unwrap();
    }
}
