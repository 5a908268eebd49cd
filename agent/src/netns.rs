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
    os::fd::{AsFd, AsRawFd, RawFd},
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

/// Where [`NetSysctls`] looks sysctls up.
#[derive(Debug)]
enum SysctlRoot {
    /// A procfs instance of our own, mounted nowhere (`fsopen` + `fsmount`,
    /// Linux 5.2+; its own dentry tree, freed when it is closed, since 5.8,
    /// when procfs got one superblock per mount).
    Private(std::os::fd::OwnedFd),
    /// The host's `/proc` (where a private instance cannot be made).
    Shared,
}

/// The `net.*` sysctls of the network namespace current at each
/// [`NetSysctls::write`]: a sysctl belongs to the namespace current when it
/// is looked up. Use it inside [`Netns::run`] only.
///
/// Why not `/proc/sys/net/...`: procfs keeps one `net/ipv4` (and
/// `net/ipv6`) directory entry per network namespace that ever looked it
/// up, all in one hash chain (same parent, same name), and a look-up walks
/// that chain, under RCU and again with locks. Each pod's sandbox netns adds
/// one (the CNI plugins' own sysctls do too), so writing a pod's sysctls
/// through the host's `/proc` cost O(pods of the node) per CNI ADD: about
/// 0.6 ms of kernel time with 1,200 pods enrolled, most of an ADD. A fresh
/// private instance has only this namespace's entries. And container
/// runtimes mount a container's `/proc/sys` read-only unless it is
/// privileged (the OCI default `readonlyPaths`), which a fresh instance is
/// not under.
#[derive(Debug)]
pub struct NetSysctls(SysctlRoot);

impl NetSysctls {
    /// A private procfs instance, or the host's `/proc` (logged once) where
    /// the kernel refuses one.
    pub fn open() -> Self {
        match private_proc() {
            Ok(fd) => Self(SysctlRoot::Private(fd)),
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(error = %e, "cannot make a private procfs instance (fsopen/fsmount refused); pod sysctls are written through /proc instead, which fails where /proc/sys is read-only, as container runtimes mount it (pods are then enrolled without transparent forwarding and listener migration, each with a warning), and costs O(pods of the node) per pod");
                });
                Self(SysctlRoot::Shared)
            }
        }
    }

    /// Whether sysctls are looked up in a private procfs instance.
    pub fn private(&self) -> bool {
        matches!(self.0, SysctlRoot::Private(_))
    }

    /// Writes `value` to `net/<path>` (e.g. `ipv4/tcp_migrate_req`).
    pub fn write(&self, path: &str, value: &str) -> std::io::Result<()> {
        use nix::{fcntl::OFlag, sys::stat::Mode};
        let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let mut full = format!("/proc/sys/net/{path}");
        let opened = match &self.0 {
            SysctlRoot::Private(root) => {
                let opened = nix::fcntl::openat(root, format!("sys/net/{path}").as_str(), flags, Mode::empty());
                full.push_str(" (private procfs)");
                opened
            }
            SysctlRoot::Shared => nix::fcntl::open(full.as_str(), flags, Mode::empty()),
        };
        let with_path = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{full}: {e}"));
        let fd = opened.map_err(|e| with_path(e.into()))?;
        std::io::Write::write_all(&mut File::from(fd), value.as_bytes()).map_err(with_path)
    }
}

/// A procfs instance mounted nowhere: the fd of its root.
fn private_proc() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // Passed as c_long: the variadic syscall() takes whole registers (the
    // kernel casts each to its declared type).
    const FSOPEN_CLOEXEC: libc::c_long = 1;
    const FSCONFIG_CMD_CREATE: libc::c_long = 6;
    const FSMOUNT_CLOEXEC: libc::c_long = 1;
    let fd = |rc: libc::c_long| -> std::io::Result<OwnedFd> {
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd the kernel just returned, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
    };
    // SAFETY: a NUL-terminated name and a flag; the kernel reads nothing else.
    let context = fd(unsafe { libc::syscall(libc::SYS_fsopen, c"proc".as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: a valid fs context fd; CMD_CREATE takes no key, value or aux.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd() as libc::c_long,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0 as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a valid, created fs context fd; no mount attributes.
    fd(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd() as libc::c_long,
            FSMOUNT_CLOEXEC,
            0 as libc::c_long,
        )
    })
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
    fn sysctls_are_written_in_the_namespace_they_were_opened_in() {
        let path = "/proc/sys/net/ipv4/tcp_migrate_req";
        let host = std::fs::read_to_string(path).unwrap();
        let (_keep, ns_path) = scratch_netns();
        let ns = Netns::open(&ns_path).unwrap();
        let read = |p: &'static str| move || std::fs::read_to_string(p).unwrap().trim().to_string();
        assert_eq!(
            ns.run(read(path)).unwrap(),
            "0",
            "a fresh namespace starts at the default"
        );
        ns.run(|| {
            let sysctls = NetSysctls::open();
            // Root here, so the kernel makes one: the fallback would pass
            // the rest of this test too, at O(pods of the node) per pod.
            assert!(sysctls.private(), "{sysctls:?}");
            sysctls.write("ipv4/tcp_migrate_req", "1").unwrap();
            sysctls.write("ipv6/fwmark_reflect", "1").unwrap();
            let err = sysctls.write("ipv4/no_such_sysctl", "1").unwrap_err();
            assert!(err.to_string().contains("/proc/sys/net/ipv4/no_such_sysctl"), "{err}");
            // The fallback writes the same namespace's.
            NetSysctls(SysctlRoot::Shared)
                .write("ipv4/fwmark_reflect", "1")
                .unwrap();
        })
        .unwrap();
        assert_eq!(ns.run(read(path)).unwrap(), "1");
        assert_eq!(ns.run(read("/proc/sys/net/ipv6/fwmark_reflect")).unwrap(), "1");
        assert_eq!(ns.run(read("/proc/sys/net/ipv4/fwmark_reflect")).unwrap(), "1");
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            host,
            "the host's own value is untouched"
        );
    }

    /// Container runtimes mount `/proc/sys` read-only in every container
    /// that is not privileged (the OCI default `readonlyPaths`), the
    /// agent's DaemonSet included: through it no pod sysctl could be set.
    #[test]
    fn sysctls_are_written_where_proc_sys_is_read_only() {
        use nix::mount::{mount, MsFlags};
        let (_keep, ns_path) = scratch_netns();
        std::thread::spawn(move || {
            // This thread alone gets a mount namespace of its own.
            nix::sched::unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            mount(
                Some("/proc/sys"),
                "/proc/sys",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
            let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, "/proc/sys", None::<&str>, ro, None::<&str>).unwrap();
            let ns = Netns::open(&ns_path).unwrap();
            ns.run(|| {
                let err = NetSysctls(SysctlRoot::Shared)
                    .write("ipv4/tcp_migrate_req", "1")
                    .unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::ReadOnlyFilesystem, "{err}");
                NetSysctls::open().write("ipv4/tcp_migrate_req", "1").unwrap();
                let now = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap();
                assert_eq!(now.trim(), "1");
            })
            .unwrap();
        })
        .join()
        .unwrap();
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
