//! Which agents of one pin directory are alive on the node: each binds an
//! abstract Unix socket named after the pins and a random token before its
//! programs take the hooks. An agent a successor superseded (see
//! [`super::Capture::superseded`]) stops changing the maps; if the
//! successor then dies or is rolled back, its programs stay pinned and
//! nobody would enrol pods: the superseded agent sees the successor's
//! beacon go and steps down, so it is restarted and takes the capture back.
//!
//! Abstract names live in a network namespace: the beacon is bound and
//! looked for in one every agent of the node shares, the host's (named by
//! the Kubernetes source's `--host-netns`: agent pods have network
//! namespaces of their own), else the agent's own (with `--netns`, the
//! node's). Any process there can see them and bind one: a fake beacon
//! only keeps a superseded agent waiting for its SIGTERM, as a live
//! successor would.
use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
    path::PathBuf,
};

use crate::netns::Netns;

pub struct Beacon {
    /// Bound, never read: datagrams sent to it wait in its bounded queue.
    _socket: UnixDatagram,
    /// The network namespace it lives in (`None`: the thread's own).
    netns: Option<PathBuf>,
    prefix: String,
    own: String,
}

impl Beacon {
    pub fn bind(pin_name: &str, netns: Option<PathBuf>) -> io::Result<Self> {
        let prefix = format!("mesh-agent/{pin_name}/");
        // Random, not the pid: each agent pod has a pid namespace of its own.
        let own = format!("{prefix}{:016x}", rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(own.as_bytes())?;
        let socket = in_netns(&netns, || UnixDatagram::bind_addr(&addr))?;
        Ok(Self {
            _socket: socket,
            netns,
            prefix,
            own,
        })
    }

    /// Whether another agent of the same pins has its beacon bound.
    pub fn others(&self) -> io::Result<bool> {
        let table = in_netns(&self.netns, || std::fs::read_to_string("/proc/thread-self/net/unix"))?;
        Ok(others_in(&table, &self.prefix, &self.own))
    }
}

/// Runs `f` in the network namespace at `netns` (else where we are).
fn in_netns<T>(netns: &Option<PathBuf>, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    match netns {
        None => f(),
        Some(path) => Netns::open(path).and_then(|n| n.run(f)).map_err(io::Error::other)?,
    }
}

/// Whether `table` (`/proc/net/unix`) lists a socket named `@<prefix>...`
/// other than `own`.
fn others_in(table: &str, prefix: &str, own: &str) -> bool {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7)?.strip_prefix('@'))
        .any(|name| name.starts_with(prefix) && name != own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_beacon_of_the_same_pins_is_seen_and_its_end_too() {
        let pins = format!("beacon-test-{}", rand::random::<u32>());
        let a = Beacon::bind(&pins, None).unwrap();
        assert!(!a.others().unwrap(), "alone");
        let other_pins = Beacon::bind(&format!("{pins}x"), None).unwrap();
        assert!(!a.others().unwrap(), "another pin directory's agent counts");
        // Bound from another thread through the namespace we are in.
        let b = Beacon::bind(&pins, Some("/proc/thread-self/ns/net".into())).unwrap();
        assert!(a.others().unwrap() && b.others().unwrap());
        drop(b);
        assert!(!a.others().unwrap(), "a closed beacon still counts");
        drop(other_pins);
    }
}
