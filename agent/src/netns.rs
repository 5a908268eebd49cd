//! Network namespaces: the agent stays in the host mount namespace and only
//! switches the *calling thread's* network namespace for as long as it takes
//! to create a socket there (a socket keeps the namespace it was made in).
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

    /// Runs `f` with the calling thread inside this namespace, then switches back.
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
            setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: self.path.clone(),
                source,
            })?;
            let out = f();
            let home = home.as_ref().expect("set above");
            setns(home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetnsError::Return)?;
            Ok(out)
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

    #[test]
    fn missing_namespace_says_so() {
        let e = Netns::open(Path::new("/run/netns/does-not-exist-here")).unwrap_err();
        assert!(e.to_string().contains("does the pod still exist"), "{e}");
    }
}
