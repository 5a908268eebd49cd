//! Open inbound connections and what they were authorized as, so a policy
//! change can close those it no longer allows (Istio re-checks open
//! connections too). Closing is a shutdown(2) of the connection's sockets:
//! both copy directions then end on their own.
use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use crate::{rbac, state::Snapshot};

struct Entry {
    pod: String,
    dst_ip: IpAddr,
    conn: rbac::Conn,
    /// Duplicates of the connection's sockets (shut down to close it).
    sockets: Vec<OwnedFd>,
}

#[derive(Default)]
pub struct OpenConns {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// Keeps a connection in the registry until dropped.
pub struct Registration(Arc<OpenConns>, u64);

impl OpenConns {
    pub fn register(
        self: &Arc<Self>,
        pod: &str,
        dst_ip: IpAddr,
        conn: rbac::Conn,
        sockets: &[&impl std::os::fd::AsFd],
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let sockets = sockets
            .iter()
            .filter_map(|s| s.as_fd().try_clone_to_owned().ok())
            .collect();
        let entry = Entry {
            pod: pod.to_string(),
            dst_ip,
            conn,
            sockets,
        };
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, entry);
        Registration(self.clone(), id)
    }

    /// Closes every open connection `snap` no longer allows; returns how many.
    pub fn recheck(&self, snap: &Snapshot) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for e in conns.values() {
            // A binding made since it opened counts like a policy.
            let allowed = snap
                .check_waypoint(e.dst_ip, e.conn.principal.as_ref())
                .map_err(|b| b.to_string())
                .and_then(|()| snap.authorize(e.dst_ip, &e.conn).map_err(|d| d.0));
            if let Err(denied) = allowed {
                tracing::info!(
                    pod = %e.pod, src = %e.conn.src_ip, dst_port = e.conn.dst_port,
                    principal = e.conn.principal.as_ref().map(ToString::to_string).unwrap_or_default(),
                    reason = %denied,
                    "closing an open connection that policy no longer allows"
                );
                for s in &e.sockets {
                    // SAFETY: shutdown(2) on a descriptor we own.
                    unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
                }
                closed += 1;
            }
        }
        closed
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}
