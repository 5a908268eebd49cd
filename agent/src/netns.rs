//! Network namespaces: the agent stays in the host mount namespace and only
//! switches the *calling thread's* network namespace for as long as it takes
//! to create a socket there (a socket keeps the namespace it was made in).
//!
//! A thread that stayed in a pod's namespace would make every later socket
//! of the agent there (a runtime thread listening in the wrong pod, or
//! forwarding another pod's traffic with its address): if switching back
//! fails, the process aborts with a message rather than run on like that.
use std::{
    cell::RefCell,
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (does the pod still exist?)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot return to the agent's own network namespace: {0}")]
    Return(nix::Error),
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: std::io::Error },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

thread_local! {
    /// The namespace this thread returns to after `Netns::run`.
    static HOME: RefCell<Option<File>> = const { RefCell::new(None) };
}

impl Netns {
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Moves the whole (still single-threaded) process into this namespace.
    /// Call before any thread is spawned.
    pub fn enter_for_good(&self) -> Result<(), NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` with the calling thread inside this namespace, then switches
    /// back (also when `f` panics). Aborts the process if it cannot switch
    /// back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        HOME.with(|home| {
            let mut home = home.borrow_mut();
            if home.is_none() {
                let own = File::open("/proc/thread-self/ns/net").map_err(|source| NetnsError::Open {
                    path: "/proc/thread-self/ns/net".into(),
                    source,
                })?;
                *home = Some(own);
            }
            let home = home.as_ref().expect("set above");
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: self.path.clone(),
                source,
            })?;
            let _back = Return { home, from: &self.path };
            Ok(f())
        })
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let err = |source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        };
        let sock = self
            .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))?
            .map_err(err)?;
        socket_netns_cookie(&sock).map_err(err)
    }
}

/// Switches the thread back to its home namespace when dropped.
struct Return<'a> {
    home: &'a File,
    from: &'a Path,
}

impl Drop for Return<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            stranded(self.from, &NetnsError::Return(e));
        }
    }
}

/// The thread is stuck in another namespace: nothing it does from now on
/// can be trusted, so stop the whole process (a supervisor restarts it;
/// capture stays in force and fails closed meanwhile).
fn stranded(ns: &Path, e: &NetnsError) -> ! {
    let msg = format!(
        "fatal: {e}; this thread is stranded in network namespace {} and the agent must not run on: aborting",
        ns.display()
    );
    tracing::error!("{msg}");
    eprintln!("{msg}");
    std::process::abort()
}

/// SO_NETNS_COOKIE (Linux 5.14+).
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_cookie_is_stable() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let a = ns.cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, ns.cookie().unwrap());
    }

    /// A fresh network namespace, kept alive by the returned file.
    fn scratch_netns() -> (File, PathBuf) {
        let file = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run the tests as root");
            File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    }

    fn own_ino() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[test]
    fn a_panic_inside_still_returns_home() {
        let (_keep, path) = scratch_netns();
        let ns = Netns::open(&path).unwrap();
        let home = own_ino();
        let inside = ns.run(own_ino).unwrap();
        assert_ne!(inside, home, "run() enters the namespace");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.run(|| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(own_ino(), home, "the thread is back home after a panic");
    }

    /// Run as a child process by `a_stranded_thread_aborts_the_process`.
    #[test]
    #[ignore = "child of a_stranded_thread_aborts_the_process"]
    fn stranded_child() {
        if std::env::var_os("NETNS_STRANDED_CHILD").is_none() {
            return;
        }
        let (_keep, path) = scratch_netns();
        let ns = Netns::open(&path).unwrap();
        ns.run(|| ()).unwrap();
        let home = HOME.with(|h| h.borrow().as_ref().map(AsRawFd::as_raw_fd)).unwrap();
        // Make the way back impossible: the home namespace's fd is gone.
        let _ = ns.run(|| unsafe { libc::close(home) });
        unreachable!("the process must have aborted");
    }

    #[test]
    fn a_stranded_thread_aborts_the_process() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "netns::tests::stranded_child", "--ignored", "--nocapture"])
            .env("NETNS_STRANDED_CHILD", "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}\n{stderr}", out.status);
        assert!(
            stderr.contains("stranded in network namespace") && stderr.contains("aborting"),
            "{stderr}"
        );
    }

    #[test]
    fn missing_namespace_says_so() {
        let e = Netns::open(Path::new("/run/netns/does-not-exist-here")).unwrap_err();
        assert!(e.to_string().contains("does the pod still exist"), "{e}");
    }
}
