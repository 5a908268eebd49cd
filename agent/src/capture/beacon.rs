//! Which agents of one pin directory are alive on the node: each binds an
//! abstract Unix socket named after the pins and a random token before its
//! programs take the hooks. An agent a successor superseded (see
//! [`super::Capture::superseded`]) stops changing the maps; if the
//! successor then dies or is rolled back, its programs stay pinned and
//! nobody would enrol pods: the superseded agent sees the successor's
//! beacon go and steps down, so it is restarted and takes the capture back.
//!
//! Abstract names live in the network namespace, which every agent of a
//! node shares (the host's, or the test node's). Any process there can see
//! them and bind one: a fake beacon only keeps a superseded agent waiting
//! for its SIGTERM, as a live successor would.
use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
};

pub struct Beacon {
    /// Bound, never read: datagrams sent to it wait in its bounded queue.
    _socket: UnixDatagram,
    prefix: String,
    own: String,
}

impl Beacon {
    pub fn bind(pin_name: &str) -> io::Result<Self> {
        let prefix = format!("mesh-agent/{pin_name}/");
        // Random, not the pid: each agent pod has a pid namespace of its own.
        let own = format!("{prefix}{:016x}", rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(own.as_bytes())?;
        let socket = UnixDatagram::bind_addr(&addr)?;
        Ok(Self {
            _socket: socket,
            prefix,
            own,
        })
    }

    /// Whether another agent of the same pins has its beacon bound.
    pub fn others(&self) -> io::Result<bool> {
        let table = std::fs::read_to_string("/proc/thread-self/net/unix")?;
        Ok(others_in(&table, &self.prefix, &self.own))
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
        let a = Beacon::bind(&pins).unwrap();
        assert!(!a.others().unwrap(), "alone");
        let other_pins = Beacon::bind(&format!("{pins}x")).unwrap();
        assert!(!a.others().unwrap(), "another pin directory's agent counts");
        let b = Beacon::bind(&pins).unwrap();
        assert!(a.others().unwrap() && b.others().unwrap());
        drop(b);
        assert!(!a.others().unwrap(), "a closed beacon still counts");
        drop(other_pins);
    }
}
