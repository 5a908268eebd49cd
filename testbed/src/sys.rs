//! Thin helpers around `ip`, /proc/self/mountinfo, cgroup v2 files and setns.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How long teardown waits for a cgroup to empty / be removable.
pub(crate) const CGROUP_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// `ip netns add` turns /run/netns into a shared bind mount the first time it
/// runs; two concurrent first runs can stack two bind mounts and hide one
/// netns file. Serialise netns add/del inside this process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn lock_netns() -> std::sync::MutexGuard<'static, ()> {
    NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `ip <args>`; on failure the error names the command and carries its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    let line = args.join(" ");
    tracing::debug!(target: "testbed", "ip {line}");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `ip {line}`"))?;
    if !out.status.success() {
        bail!(
            "`ip {line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run `ip -n <netns> <args>`.
pub(crate) fn ip_n(netns: &str, args: &[&str]) -> Result<String> {
    let mut v = Vec::with_capacity(args.len() + 2);
    v.extend_from_slice(&["-n", netns]);
    v.extend_from_slice(args);
    ip(&v)
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _g = lock_netns();
    ip(&["netns", "add", name]).map(drop)
}

/// Delete a named netns; absent is fine (idempotent).
pub(crate) fn netns_del(name: &str) -> Result<()> {
    let path = netns_path(name);
    if !exists(&path) {
        return Ok(());
    }
    let _g = lock_netns();
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !exists(&path) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(crate) fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Names of all entries of /run/netns (empty if the directory does not exist).
pub(crate) fn list_netns() -> Result<Vec<String>> {
    let rd = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {NETNS_RUN_DIR}")),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.with_context(|| format!("reading {NETNS_RUN_DIR}"))?;
        if let Some(s) = ent.file_name().to_str() {
            out.push(s.to_string());
        }
    }
    Ok(out)
}

/// Run `f` on a short-lived thread that has joined the network namespace at
/// `netns_path` (only that thread switches; the mount namespace, cgroup and
/// everything else stay the caller's). Handy for /proc/sys/net writes and
/// for quick socket checks from inside a namespace. Sockets created inside
/// `f` belong to that namespace even after the thread ends.
pub fn in_netns<T, F>(netns_path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let file = File::open(netns_path).with_context(|| format!("opening netns {}", netns_path.display()))?;
    thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({}, CLONE_NEWNET)", netns_path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside netns {} panicked", netns_path.display()))?
    })
}

/// Write sysctls (`("net/ipv6/conf/all/accept_dad", "0")`, paths relative to
/// /proc/sys) inside the given netns.
pub(crate) fn sysctls_in(netns_path: &Path, kv: &[(&str, &str)]) -> Result<()> {
    in_netns(netns_path, || {
        for (k, v) in kv {
            let p = Path::new("/proc/sys").join(k);
            fs::write(&p, v)
                .with_context(|| format!("writing {v:?} to {} in netns {}", p.display(), netns_path.display()))?;
        }
        Ok(())
    })
}

/// One line of /proc/self/mountinfo: (mount point, fs type, root).
fn mounts() -> Result<Vec<(PathBuf, String, String)>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.is_empty() {
            continue;
        }
        out.push((
            PathBuf::from(unescape_mountinfo(l[4])),
            r[0].to_string(),
            unescape_mountinfo(l[3]),
        ));
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Discover the cgroup v2 mount point from /proc/self/mountinfo.
///
/// Prefers a mount of the hierarchy's root (`/`) if several exist.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let ms = mounts()?;
    let all: Vec<_> = ms.iter().filter(|(_, fs, _)| fs == "cgroup2").collect();
    all.iter()
        .find(|(_, _, root)| root == "/")
        .or_else(|| all.first())
        .map(|(p, _, _)| p.clone())
        .ok_or_else(|| anyhow!("no cgroup2 file system found in /proc/self/mountinfo"))
}

/// All bpffs mount points (may be empty).
pub(crate) fn bpffs_mounts() -> Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .filter(|(_, fs, _)| fs == "bpf")
        .map(|(p, _, _)| p)
        .collect())
}

/// Remove a path that must live on bpffs (a pin or a directory of pins).
/// Absent is fine. Refuses to touch anything that is not on bpffs.
pub(crate) fn remove_bpffs_path(p: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", p.display())),
    };
    let st = nix::sys::statfs::statfs(p).with_context(|| format!("statfs {}", p.display()))?;
    if st.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        bail!("refusing to remove {}: not on a bpf file system", p.display());
    }
    let r = if meta.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// PIDs listed in `<dir>/cgroup.procs`.
pub(crate) fn cgroup_procs(dir: &Path) -> std::io::Result<Vec<i32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Kill every process in the cgroup subtree at `dir` (cgroup.kill, or SIGKILL
/// to each listed pid on kernels without it). Absent cgroup is fine.
pub(crate) fn cgroup_kill(dir: &Path) -> Result<()> {
    let kill_file = dir.join("cgroup.kill");
    match fs::write(&kill_file, "1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound && !exists(dir) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Kernel < 5.14: no cgroup.kill.
            match cgroup_procs(dir) {
                Ok(pids) => {
                    for pid in pids {
                        let _ =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    }
                    Ok(())
                }
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("reading {}/cgroup.procs", dir.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("writing \"1\" to {}", kill_file.display())),
    }
}

/// Every directory of the subtree at `root` (including `root`) with its depth.
fn cgroup_dirs(root: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for ent in rd {
            let ent = ent.with_context(|| format!("listing {}", dir.display()))?;
            if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((ent.path(), depth + 1));
            }
        }
        out.push((dir, depth));
    }
    Ok(out)
}

/// Kill everything in the cgroup subtree at `root` and remove all its
/// directories, deepest first. Absent is fine. Keeps going after errors and
/// reports all of them.
pub(crate) fn remove_cgroup_tree(root: &Path) -> Result<()> {
    if !exists(root) {
        return Ok(());
    }
    // One kill at the top takes the whole subtree down at once; per-directory
    // kills below catch anything that moved in meanwhile.
    let mut errors: Vec<String> = Vec::new();
    if let Err(e) = cgroup_kill(root) {
        errors.push(format!("{e:#}"));
    }
    let mut dirs = cgroup_dirs(root)?;
    dirs.sort_by_key(|d| std::cmp::Reverse(d.1));
    for (dir, _) in dirs {
        if let Err(e) = remove_one_cgroup(&dir) {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

fn remove_one_cgroup(dir: &Path) -> Result<()> {
    cgroup_kill(dir)?;
    let deadline = Instant::now() + CGROUP_WAIT;
    let mut last_kill = Instant::now();
    loop {
        match cgroup_procs(dir) {
            Ok(pids) if pids.is_empty() => break,
            Ok(pids) => {
                if Instant::now() >= deadline {
                    bail!(
                        "processes {pids:?} still in {}/cgroup.procs {:?} after cgroup.kill",
                        dir.display(),
                        CGROUP_WAIT
                    );
                }
                if last_kill.elapsed() >= Duration::from_millis(500) {
                    cgroup_kill(dir)?;
                    last_kill = Instant::now();
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}/cgroup.procs", dir.display())),
        }
        thread::sleep(POLL);
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(POLL);
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", dir.display())),
        }
    }
}

/// Is a process with this pid alive (in our pid namespace)?
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(_) => true, // EPERM etc.: exists
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/a\134b"), r"/a\b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trail\04"), r"/trail\04");
    }

    #[test]
    fn finds_cgroup2() {
        let p = cgroup2_mount().unwrap();
        assert!(p.join("cgroup.procs").exists(), "{}", p.display());
    }
}
