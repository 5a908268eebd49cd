//! Sockmap acceleration of the in-pod hops whose reader is the agent
//! (`agent run --sockmap`): the owner of the sk_msg program and of the
//! SM_APP, SM_AGENT, SM_HOPS, SM_READ and SM_STATS maps (see agent-ebpf);
//! with phase two (`--sockmap-to-app`, the hops whose reader is the app)
//! also of the read-count program (`mesh_app_read`, tp_btf on
//! `sock_recv_length`) and of SM_AGENT_TX, SM_TO_APP, SM_APP_READ and
//! SM_TO_APP_STATS (ARCHITECTURE.md, "Phase two").
//!
//! * The hops: app -> 127.0.0.1:15001 in the client pod, and the app's
//!   replies on the agent's connection to it in the server pod. The app's
//!   bytes are moved by `sk_msg` straight into the agent socket's receive
//!   queue instead of through TCP on the pod's `lo`.
//! * Who inserts what: sockops puts the app's end into SM_APP (and its hop
//!   state into SM_HOPS) in the established callbacks, before the app can
//!   send. The agent puts its own end into SM_AGENT with a map update
//!   ([`AgentEnds::insert`]): right after accept() on 15001, right after
//!   connect() to the app, before it writes a byte. An app that writes at
//!   once after connect() would beat the first of these, so sockops also
//!   puts the agent's accepted 15001 socket in when its handshake completes
//!   (inside the app's connect() on `lo`), where the agent's cgroup is below
//!   the one the programs are attached to (the default, the cgroup v2 root;
//!   the testbed's agents too).
//! * Never reorder, never drop: a hop's first sendmsg decides once (SM_HOPS):
//!   redirected from its first byte, or TCP for good. When the agent's end is
//!   missing the program passes (TCP), never drops. A redirected hop whose
//!   bytes pile up in the agent's socket (more than `hop::BACKLOG_BOUND`
//!   unread, by the read count the agent reports, [`AgentEnds::report_read`])
//!   goes back to TCP for good: the agent reads the redirected bytes first,
//!   so that switch keeps the order.
//! * The agent must read its ends with recvmsg, never splice: splice reads
//!   only the TCP queue and would never see redirected bytes.
//! * The program is attached to SM_APP through a pinned bpf_link
//!   (`links/sm_msg`, Linux 6.10+), so a new agent swaps its program in with
//!   the same atomic compare-and-swap as every other hook ([`links::converge`]);
//!   sockets already in SM_APP keep the program they were inserted under.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::{
    fwd, fwd_stats, hop, maps as names, programs as progs, sockmap_stats, to_app_stats, Fwd, HopKey, ToApp,
};
use aya::{
    maps::{Map, MapData, MapType, PerCpuArray, RingBuf},
    programs::{links::FdLink, BtfTracePoint, ProgramType, SkMsg, SkSkb},
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
    Btf, Ebpf,
};
use prometheus_client::metrics::counter::Counter;

use super::{bpf_err, chain, links, program, sys, to_ip6, CaptureError, Pins};

mod handback;

pub use handback::Park;
use handback::Parked;

/// Whether this kernel can run the sk_msg program: program and map types,
/// the helpers it calls. Loading it (the verifier) and attaching it as a
/// link are the last two checks, in [`Sockmap::start`].
pub fn probe() -> Result<(), String> {
    let yes = |r: Result<bool, String>, what: &str| match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("the kernel lacks {what}")),
        Err(e) => Err(format!("cannot probe for {what}: {e}")),
    };
    yes(
        is_program_supported(ProgramType::SkMsg).map_err(|e| chain(&e)),
        "BPF program type sk_msg",
    )?;
    yes(
        is_map_supported(MapType::SockHash).map_err(|e| chain(&e)),
        "BPF map type sockhash",
    )?;
    for (helper, name) in [
        (BpfHelper::BPF_FUNC_msg_redirect_hash, "bpf_msg_redirect_hash"),
        (
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie in sk_msg (Linux 5.15+)",
        ),
    ] {
        yes(
            is_helper_supported(ProgramType::SkMsg, helper).map_err(|e| chain(&e)),
            name,
        )?;
    }
    Ok(())
}

/// Which parts of the acceleration are asked for (`agent run --sockmap`,
/// `--sockmap-to-app`, `--sockmap-forward`); each needs the one before.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub on: bool,
    pub to_app: bool,
    pub forward: bool,
}

/// The agent's sockhash of its own ends of the hops (and the hops' states),
/// shared by every connection handler.
pub struct AgentEnds {
    agent: MapData,
    /// SM_READ: the bytes read per hop, updated every
    /// [`hop::READ_REPORT_STEP`] bytes.
    read: MapData,
    /// Read per connection (after its first bytes, and when a hop's read
    /// count is gone); only the programs write it.
    hops: aya::maps::HashMap<MapData, HopKey, u32>,
    fallbacks: Counter,
    /// Hops that fell back and are spliced again.
    respliced: Counter,
    /// Phase two, when `--sockmap-to-app` is on.
    to_app: Option<ToAppMaps>,
    /// The kernel path, when `--sockmap-forward` is on (with phase two).
    fwd: Option<FwdMaps>,
}

/// The kernel path's maps as the agent uses them (ARCHITECTURE.md, "The
/// kernel path").
struct FwdMaps {
    /// SM_NET: the agent's other socket of a forwarded hop, keyed by the
    /// app's hop key.
    net: MapData,
    /// SM_FWD: the hop's [`Fwd`], created first, read and removed at the end.
    fwd: MapData,
    /// SM_NET_HOP: the other socket's cookie -> the app's hop key.
    net_hop: MapData,
    /// The joined connections, woken at a hand-back (SM_FWD_EVENTS).
    parked: Arc<Parked>,
    /// The id of this agent's verdict program, and the pin of its link:
    /// a socket joins under the program the link runs at its insertion,
    /// and tells that program's agent.
    verdict: u32,
    link: PathBuf,
}

/// Phase two's maps as the agent uses them.
struct ToAppMaps {
    /// SM_AGENT_TX: the agent's own socket goes in (keyed by its cookie),
    /// so the sk_msg program runs on the agent's sends too.
    tx: MapData,
    /// SM_TO_APP: whether sockops prepared a hop's agent -> app direction;
    /// the agent decides one TCP here when its socket cannot join.
    to_app: MapData,
    /// SM_APP_READ: what each app socket has read (the kernel path waits
    /// on it before the agent writes to the app again).
    app_read: MapData,
}

impl AgentEnds {
    /// Puts the agent's socket `sock` of a hop into SM_AGENT: `app` is the
    /// app's address (the socket's peer), `agent` the socket's own, both
    /// as seen inside the pod netns `netns_cookie`. Call before the app can
    /// have sent a byte on this hop that the agent must read (an accepted
    /// socket: at once; a connection to the app: before writing to it).
    /// An accepted 15001 socket is usually there already: sockops put it in
    /// when the handshake completed. Only a live socket of this hop can
    /// hold its key (the kernel drops an entry when its socket closes), so
    /// an existing entry is this socket's. On error (the socket already
    /// closed, the map full) the hop stays on TCP, which is correct, only
    /// slower.
    pub fn insert(
        &self,
        netns_cookie: u64,
        sock: &impl AsRawFd,
        app: SocketAddr,
        agent: SocketAddr,
    ) -> std::io::Result<()> {
        let key = hop_key(netns_cookie, app, agent);
        let fd = sock.as_raw_fd() as u32;
        match sys::map_insert(self.agent.fd().as_fd(), sys::key_bytes(&key), &fd.to_ne_bytes()) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    /// Phase two (`--sockmap-to-app`): puts the agent's socket `sock` of a
    /// hop into SM_AGENT_TX, so that the sk_msg program moves what the
    /// agent writes straight into the app's socket, when sockops prepared
    /// this hop's agent -> app direction (SM_TO_APP, undecided). Call
    /// before the agent writes its first byte to the app: that send
    /// decides, and a socket put in after bytes went through TCP would
    /// reorder them. An accepted 15001 socket is usually there already
    /// (sockops put it in with its SM_AGENT entry).
    ///
    /// A direction the agent's socket cannot join is decided TCP here, so
    /// that the app's socket can leave SM_APP when its own bytes go through
    /// TCP (it waits for an undecided direction): until the agent writes,
    /// nothing else writes the state of a socket outside SM_AGENT_TX. When
    /// sockops has not prepared the direction yet (the handshake's last ACK
    /// deferred), the agent creates it decided TCP, which the app's
    /// callback then leaves as it is; the returned entry removes it when
    /// dropped (with the connection). A socket already in SM_AGENT_TX
    /// (EBUSY: sockops put an accepted 15001 socket in) is left undecided,
    /// for its first send to decide, and so is an accepted 15001 socket the
    /// kernel refuses for its state (CLOSE_WAIT, checked first: sockops may
    /// have put it in). A connection to an app refused for its state is
    /// decided TCP, like any other socket that cannot join: sockops never
    /// inserts it, so left undecided nothing would decide it, and the app's
    /// socket would stay in SM_APP until it closed.
    pub fn to_app(
        &self,
        netns_cookie: u64,
        sock: &impl AsRawFd,
        app: SocketAddr,
        agent: SocketAddr,
    ) -> Option<CreatedTcp> {
        let maps = self.to_app.as_ref()?;
        let key = hop_key(netns_cookie, agent, app);
        // Twice at most: sockops may create the entry between our lookup
        // and our own insert.
        for _ in 0..2 {
            match maps.get(&key) {
                Ok(t) if hop::state(t.value) == hop::UNDECIDED => {
                    self.join(maps, &key, t, sock, app, agent);
                    return None;
                }
                Ok(_) => return None,
                Err(_) => {}
            }
            // None yet (or none will come: the pod without phase two, the
            // app's socket not accelerated): decided TCP here, which
            // sockops's own insert (BPF_NOEXIST) then leaves as it is. An
            // SM_HOPS entry proves nothing: sockops writes it before this
            // one, in the same callback.
            let tcp = ToApp {
                value: hop::TCP,
                app_tcp: 0,
                app_cookie: 0,
            };
            match sys::map_insert(maps.to_app.fd().as_fd(), sys::key_bytes(&key), sys::key_bytes(&tcp)) {
                Ok(()) => return Some(CreatedTcp(key)),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Puts the agent's socket (its end `agent`) into SM_AGENT_TX for the
    /// undecided direction `key` (value `now`), or decides it TCP.
    fn join(
        &self,
        maps: &ToAppMaps,
        key: &HopKey,
        now: ToApp,
        sock: &impl AsRawFd,
        app: SocketAddr,
        agent: SocketAddr,
    ) {
        let inserted = sys::socket_cookie(sock.as_raw_fd()).and_then(|cookie| {
            let fd = sock.as_raw_fd() as u32;
            sys::map_insert(maps.tx.fd().as_fd(), &cookie.to_ne_bytes(), &fd.to_ne_bytes())
        });
        match inserted {
            Ok(()) => {}
            // sockops put an accepted 15001 socket in already: the kernel
            // says EBUSY (the socket has an sk_msg program, which only
            // SM_AGENT_TX gives an agent's socket) before it looks for the
            // key.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST)) => {}
            // Refused for its state (CLOSE_WAIT: the app wrote and
            // half-closed at once) before any other check. An accepted
            // 15001 socket, the one sockops inserts, is most likely in
            // already: its first send decides, redirected as sockops meant.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && agent.port() == agent_common::OUTBOUND_PORT => {}
            // Not in SM_AGENT_TX (the kernel answers EBUSY or EEXIST for a
            // socket that is), or a connection to an app refused for its
            // state, which sockops never inserts: nothing else would ever
            // decide it. The agent has not written to the socket yet, so
            // TCP decided here reorders nothing. The whole value is
            // replaced: an `app_tcp` set meanwhile is lost, which changes
            // nothing for a direction on TCP.
            Err(e) => {
                tracing::debug!(app = %app, error = %e, "cannot put the agent's socket into SM_AGENT_TX: the agent -> app direction stays on TCP");
                let tcp = ToApp { value: hop::TCP, ..now };
                let _ = sys::map_replace(maps.to_app.fd().as_fd(), sys::key_bytes(key), sys::key_bytes(&tcp));
            }
        }
    }

    /// Removes an SM_TO_APP entry the agent created ([`CreatedTcp`]).
    pub fn forget_to_app(&self, created: &CreatedTcp) {
        if let Some(maps) = &self.to_app {
            let _ = sys::map_delete(maps.to_app.fd().as_fd(), sys::key_bytes(&created.0));
        }
    }

    /// Once the agent has read the hop's first bytes (so the app's first
    /// byte has decided): when the hop stays on TCP for good, takes the
    /// agent's socket out of SM_AGENT and says so, and the agent may splice
    /// it from then on (zero-copy again). A redirected hop, or one whose
    /// state is unknown (gone with a closed app socket: redirected bytes may
    /// still be queued), stays where it is and is read with recvmsg.
    pub fn release_if_tcp(&self, netns_cookie: u64, app: SocketAddr, agent: SocketAddr) -> bool {
        let key = hop_key(netns_cookie, app, agent);
        if self.state(&key) != Some(hop::TCP) {
            return false;
        }
        sys::map_delete(self.agent.fd().as_fd(), sys::key_bytes(&key)).is_ok()
    }

    /// Tells the sk_msg program that the agent has read `read` bytes from
    /// the hop (all of them redirected: a hop is redirected from its first
    /// byte), so that it keeps what waits unread in the agent's socket
    /// under [`hop::BACKLOG_BOUND`] (beyond it the program sends the hop
    /// back to TCP, and removes the count). Once the count is gone the
    /// caller stops reporting: the hop fell back (counted, with how many
    /// bytes were redirected before), went TCP, or its app socket closed.
    pub fn report_read(&self, netns_cookie: u64, app: SocketAddr, agent: SocketAddr, read: u64) -> Reported {
        let key = hop_key(netns_cookie, app, agent);
        match sys::map_replace(self.read.fd().as_fd(), sys::key_bytes(&key), &read.to_ne_bytes()) {
            Ok(()) => Reported::Counting,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => match self.value(&key) {
                Some(v) if hop::state(v) == hop::FALLBACK => {
                    self.fallbacks.inc();
                    tracing::debug!(app = %app, read, "sockmap hop sent back to TCP: bytes piled up in the agent's socket");
                    Reported::FellBack { sent: hop::sent(v) }
                }
                _ => Reported::Gone,
            },
            Err(e) => {
                tracing::debug!(app = %app, error = %e, "cannot report a sockmap hop's read bytes; its sender falls back to TCP at the bound");
                Reported::Gone
            }
        }
    }

    /// Hops sent back to TCP, as their agent saw them (a hop whose app
    /// closed before the agent's next report is not counted), for the
    /// metrics.
    pub fn fallbacks(&self) -> &Counter {
        &self.fallbacks
    }

    /// Hops sent back to TCP whose agent read all their redirected bytes
    /// and splices the rest (zero-copy again), for the metrics.
    pub fn respliced(&self) -> &Counter {
        &self.respliced
    }

    /// Whether the kernel path is on (`--sockmap-forward`).
    pub fn forwarding(&self) -> bool {
        self.fwd.is_some()
    }

    /// The kernel path: whether the hop's agent -> app direction (the
    /// agent's socket `agent`, its peer `app`) is redirected into the app's
    /// socket, so that what arrives for the app may be moved there by the
    /// verdict program. Asked after the agent's first write to the app (it
    /// decided the direction).
    pub fn to_app_state(&self, netns_cookie: u64, app: SocketAddr, agent: SocketAddr) -> ToAppNow {
        let Some(maps) = &self.to_app else {
            return ToAppNow::Never;
        };
        match maps.get(&hop_key(netns_cookie, agent, app)) {
            Ok(t) if hop::state(t.value) == hop::REDIRECT && t.app_tcp == 0 => ToAppNow::Redirected(t.app_cookie),
            Ok(t) if hop::state(t.value) == hop::UNDECIDED => ToAppNow::Undecided,
            _ => ToAppNow::Never,
        }
    }

    /// The kernel path: the agent's other socket `net` of the hop (the app's
    /// end `app`, the agent's `agent`) joins SM_NET, so that the verdict
    /// program moves what arrives on it into the app's socket (cookie
    /// `app_cookie`), and the app's sends may go straight to its egress.
    /// The caller has stopped reading `net` and has written to the app every
    /// byte it read from it; it sets `SO_RCVLOWAT` next, so that the verdict
    /// runs over what already waits. On error nothing is left behind, and
    /// the hop goes on through the agent (a socket that is no longer
    /// established, the remote having half-closed, is refused).
    pub fn join_forward(
        &self,
        netns_cookie: u64,
        app: SocketAddr,
        agent: SocketAddr,
        net: &impl AsRawFd,
        app_cookie: u64,
    ) -> std::io::Result<Forwarded> {
        let maps = self
            .fwd
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the kernel path is off"))?;
        let key = hop_key(netns_cookie, app, agent);
        let net_cookie = sys::socket_cookie(net.as_raw_fd())?;
        let entry = Fwd {
            replies: fwd::FORWARD,
            app_cookie,
            net_cookie,
            ..Fwd::default()
        };
        // A socket already under this key is an earlier connection's on the
        // same ports (the key is a live app socket's): out first, so that
        // no send finds our entry and that socket together. Leaving SM_NET
        // takes its verdict away, so what arrives on it next wakes no one
        // that waits parked: its connection, if this agent's and its entry
        // still there, is told. (Its app closed, since the key is a live
        // app socket's: the connection stops parking then anyway.)
        let stale = fwd_entry(maps, &key);
        let _ = sys::map_delete(maps.net.fd().as_fd(), sys::key_bytes(&key));
        sys::map_update(maps.fwd.fd().as_fd(), sys::key_bytes(&key), sys::key_bytes(&entry))?;
        if let Some(stale) = stale {
            maps.parked.tell(stale.net_cookie);
        }
        let mut joined = Forwarded {
            key,
            net_cookie,
            handed_back: maps.parked.park(net_cookie),
        };
        // A later insert of the same key replaces this entry: only ours is
        // removed at the end (see forget_forward).
        self.app_still_there(&key, app_cookie)
            .and_then(|()| {
                sys::map_update(
                    maps.net_hop.fd().as_fd(),
                    &net_cookie.to_ne_bytes(),
                    sys::key_bytes(&key),
                )
            })
            .and_then(|()| {
                let fd = net.as_raw_fd() as u32;
                sys::map_update(maps.net.fd().as_fd(), sys::key_bytes(&key), &fd.to_ne_bytes())
            })
            .inspect_err(|_| {
                self.forget_forward(&joined);
            })?;
        // The link runs this agent's verdict now, so it did at the insert
        // (a link only ever swaps to a newer agent's). Else a newer agent
        // took over meanwhile, and its ring gets this socket's hand-backs:
        // the connection does not park.
        if attached_prog(&maps.link) != Some(maps.verdict) {
            maps.parked.leave(net_cookie);
            joined.handed_back = None;
        }
        Ok(joined)
    }

    /// The kernel path: whether a joined hop's verdict still forwards: its
    /// entries are there and its own, and it has handed nothing back.
    pub fn still_forwarding(&self, joined: &Forwarded) -> bool {
        let Some(maps) = &self.fwd else {
            return false;
        };
        sys::map_get::<_, HopKey>(maps.net_hop.fd().as_fd(), &joined.net_cookie).is_ok_and(|k| k == joined.key)
            && fwd_entry(maps, &joined.key)
                .is_some_and(|f| f.net_cookie == joined.net_cookie && f.replies == fwd::FORWARD)
    }

    /// After the SM_FWD entry of `key` is written: whether the app socket
    /// `app_cookie` is still open. Its close callback removes the hop's
    /// SM_TO_APP entry and then marks SM_FWD's (`app_gone`), so either this
    /// look finds the entry gone, or the callback finds ours and marks it:
    /// an entry of a closed app never stays unmarked for a later socket on
    /// the same ports.
    fn app_still_there(&self, key: &HopKey, app_cookie: u64) -> std::io::Result<()> {
        let maps = self
            .to_app
            .as_ref()
            .ok_or_else(|| std::io::Error::other("phase two is off"))?;
        match maps.get(&key.reversed()) {
            Ok(t) if t.app_cookie == app_cookie => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the app's socket closed",
            )),
        }
    }

    /// The kernel path: whether the app socket `app_cookie` has read every
    /// byte redirected into it on the hop (the app's end `app`, the agent's
    /// `agent`), so that what the agent writes next cannot overtake any. A
    /// direction whose entries are gone, or are a later socket's on the
    /// same ports, has nothing waiting for this one (its socket closed).
    pub fn app_read_all(&self, netns_cookie: u64, app: SocketAddr, agent: SocketAddr, app_cookie: u64) -> bool {
        let Some(maps) = &self.to_app else {
            return true;
        };
        let Ok(t) = maps.get(&hop_key(netns_cookie, agent, app)) else {
            return true;
        };
        if t.app_cookie != app_cookie {
            return true;
        }
        let mut read = [0u8; 8];
        if sys::map_lookup(maps.app_read.fd().as_fd(), &t.app_cookie.to_ne_bytes(), &mut read).is_err() {
            return true;
        }
        hop::read_all(hop::sent(t.value), u64::from_ne_bytes(read))
    }

    /// The kernel path: a forwarded hop's end. Returns the bytes it moved
    /// without the agent (`None` once its SM_FWD entry is gone, or is a
    /// later connection's of the same hop), and removes that entry when it
    /// is still this connection's (should a later one join between the
    /// look and the delete, its entry goes, which only sends that hop back
    /// through its agent), and its SM_NET_HOP entry (its SM_NET one leaves
    /// with the socket).
    pub fn forget_forward(&self, joined: &Forwarded) -> Option<Fwd> {
        let maps = self.fwd.as_ref()?;
        let ours = fwd_entry(maps, &joined.key).filter(|f| f.net_cookie == joined.net_cookie);
        if ours.is_some() {
            let _ = sys::map_delete(maps.fwd.fd().as_fd(), sys::key_bytes(&joined.key));
        }
        let _ = sys::map_delete(maps.net_hop.fd().as_fd(), &joined.net_cookie.to_ne_bytes());
        maps.parked.leave(joined.net_cookie);
        ours
    }

    fn state(&self, key: &HopKey) -> Option<u32> {
        self.value(key).map(hop::state)
    }

    fn value(&self, key: &HopKey) -> Option<u32> {
        self.hops.get(key, 0).ok()
    }
}

/// What [`AgentEnds::to_app_state`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToAppNow {
    /// Redirected into the app's socket (its cookie).
    Redirected(u64),
    /// Not decided yet.
    Undecided,
    /// On TCP, going there, or not a phase-two hop.
    Never,
}

/// A hop that joined the kernel path ([`AgentEnds::join_forward`]).
#[derive(Debug)]
pub struct Forwarded {
    key: HopKey,
    net_cookie: u64,
    /// `None` when the hop may not park (see [`Forwarded::handed_back`]).
    handed_back: Option<Arc<Park>>,
}

impl Forwarded {
    /// What tells the connection that the verdict passed bytes to the
    /// agent's socket; `None` when the verdict is a newer agent's (whose
    /// ring gets this socket's records) or the hand-back reader has ended:
    /// the connection must keep watching its socket for reads.
    pub fn handed_back(&self) -> Option<Arc<Park>> {
        self.handed_back.clone()
    }
}

/// SM_FWD's entry of `key`.
fn fwd_entry(maps: &FwdMaps, key: &HopKey) -> Option<Fwd> {
    sys::map_get(maps.fwd.fd().as_fd(), key).ok()
}

/// An agent -> app direction the agent created itself, decided TCP (see
/// [`AgentEnds::to_app`]); [`AgentEnds::forget_to_app`] removes it.
#[derive(Debug)]
pub struct CreatedTcp(HopKey);

impl ToAppMaps {
    /// The SM_TO_APP entry of `key`.
    fn get(&self, key: &HopKey) -> std::io::Result<ToApp> {
        sys::map_get(self.to_app.fd().as_fd(), key)
    }
}

/// What [`AgentEnds::report_read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// The program counts the hop's redirected bytes against the report.
    Counting,
    /// The hop went back to TCP after `sent` redirected bytes (modulo
    /// 2^30, `hop::sent`): once the agent has read as many, nothing more
    /// waits in the socket's sk_msg queue.
    FellBack { sent: u32 },
    /// No count any more (TCP from the first byte, or closed).
    Gone,
}

/// The key of a hop as the app's socket sees it (src = the app).
pub fn hop_key(netns_cookie: u64, app: SocketAddr, peer: SocketAddr) -> HopKey {
    HopKey {
        netns_cookie,
        src: to_ip6(app.ip().to_canonical()),
        dst: to_ip6(peer.ip().to_canonical()),
        src_port: app.port(),
        dst_port: peer.port(),
        _pad: 0,
    }
}

/// The running acceleration: the sk_msg link converged on our program.
pub struct Sockmap {
    stats: PerCpuArray<MapData, u64>,
    /// Phase two is on (asked for, and the kernel can).
    to_app: bool,
    /// Phase two's read count, when this agent attached it.
    read_count: Option<Counting>,
    /// The kernel path's send count, when this agent attached it.
    sent_count: Option<Counting>,
}

impl Sockmap {
    /// Loads the sk_msg program and makes the pinned link on SM_APP run it
    /// (attached, or swapped in place of a previous agent's). Runs before
    /// any pod is enrolled with the sockmap flag, so no app socket enters
    /// SM_APP before a program is attached (one that did would stay on TCP).
    /// `to_app` turns on phase two (agent to app) as well, with the
    /// read-count generation `ebpf` was loaded with: the read-count program
    /// is attached too (or, off, a previous agent's is detached). `forward`
    /// turns on the kernel path as well (with phase two only).
    pub fn start(
        ebpf: &mut Ebpf,
        pins: &Pins,
        to_app: Option<ReadGen>,
        forward: bool,
    ) -> Result<(Self, AgentEnds), CaptureError> {
        let app = map_data(ebpf, names::SM_APP)?;
        let agent = map_data(ebpf, names::SM_AGENT)?;
        let hops = map_data(ebpf, names::SM_HOPS)?;
        let read = map_data(ebpf, names::SM_READ)?;
        let hops = bpf!("map SM_HOPS", aya::maps::HashMap::try_from(Map::HashMap(hops)))?;
        let stats = map_data(ebpf, names::SM_STATS)?;
        let stats: PerCpuArray<MapData, u64> = bpf!("map SM_STATS", PerCpuArray::try_from(Map::PerCpuArray(stats)))?;
        let prog: &mut SkMsg = program(ebpf, progs::SK_MSG)?;
        bpf!("load sk_msg", prog.load())?;
        let fd = bpf!("sk_msg fd", prog.fd())?
            .try_clone()
            .map_err(|e| bpf_err("sk_msg fd")(e.to_string()))?;
        let outcome = attach_sk_msg(&link_pin(pins), fd.as_fd(), &app, names::SM_APP)?;
        tracing::info!(outcome = ?outcome, "sk_msg program attached to SM_APP");
        let mut read_count = None;
        // Phase two's generation and the kernel's BTF, which the kernel
        // path's send count uses too.
        let mut phase_two = None;
        let to_app = match to_app {
            // Phase two needs more of the kernel (tp_btf, Linux 6.3+):
            // without it phase one stays on.
            Some(gen) => match bpf!("read the kernel's BTF", Btf::from_sys_fs())
                .and_then(|btf| Ok((start_to_app(ebpf, pins, fd.as_fd(), gen, &btf)?, btf)))
            {
                Ok(((maps, count), btf)) => {
                    read_count = count;
                    phase_two = Some((gen, btf));
                    Some(maps)
                }
                // Pins another agent may use are left alone.
                Err(e) => {
                    tracing::warn!(reason = %e, "sockmap phase two unavailable: off; the agent's writes to the apps stay on TCP");
                    None
                }
            },
            None => {
                stop_to_app(pins);
                None
            }
        };
        let mut sent_count = None;
        let fwd = match (forward, phase_two) {
            (true, Some((gen, btf))) => match start_forward(ebpf, pins, gen, &btf) {
                Ok((maps, count)) => {
                    sent_count = count;
                    Some(maps)
                }
                Err(e) => {
                    tracing::warn!(reason = %e, "sockmap kernel path unavailable: off; forwarded bytes wake the agent");
                    None
                }
            },
            (true, None) => {
                tracing::warn!("the sockmap kernel path needs phase two, which is off: off");
                stop_forward(pins);
                None
            }
            (false, _) => {
                stop_forward(pins);
                None
            }
        };
        let stats = Self {
            stats,
            to_app: to_app.is_some(),
            read_count,
            sent_count,
        };
        let ends = AgentEnds {
            agent,
            read,
            hops,
            fallbacks: Counter::default(),
            respliced: Counter::default(),
            to_app,
            fwd,
        };
        Ok((stats, ends))
    }

    /// Whether phase two runs too.
    pub fn to_app(&self) -> bool {
        self.to_app
    }

    /// Called on each reload tick: see [`Counting::keep`] (phase two's read
    /// count and the kernel path's send count). `true`: it wrote our
    /// generation back for one of them.
    pub fn keep_counts(&self) -> bool {
        let read = self.read_count.as_ref().is_some_and(Counting::keep);
        let sent = self.sent_count.as_ref().is_some_and(Counting::keep);
        read || sent
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        read_stats(&self.stats, sockmap_stats::NAMES.as_slice())
    }
}

/// The read-count generation of one load of the kernel object (its
/// `READ_GEN` global): random, never 0 (the value of a fresh SM_READ_GEN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadGen(u64);

impl ReadGen {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        ReadGen(random.max(1))
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

impl Default for ReadGen {
    fn default() -> Self {
        Self::new()
    }
}

/// A count on a tracepoint this agent attached (phase two's read count,
/// the kernel path's send count): its program and its generation.
struct Counting {
    /// What it counts, for the logs.
    what: &'static str,
    gen: ReadGen,
    prog_id: u32,
    /// Its generation map (SM_READ_GEN, SM_SENT_GEN).
    gens: MapData,
    pin: PathBuf,
}

impl Counting {
    /// Makes our generation the one that counts: only our program, once
    /// attached, counts from then on (one that something still holds
    /// attached stops at once).
    fn count(&self) -> Result<(), CaptureError> {
        sys::map_replace(self.gens.fd().as_fd(), &0u32.to_ne_bytes(), &self.gen.0.to_ne_bytes())
            .map_err(|e| bpf_err(format!("write the generation of the {}", self.what))(e.to_string()))
    }

    /// While our program is the one on the pinned link, the generation map
    /// must hold our generation, or nothing counts. Two agents starting at
    /// once on the same pins can leave it wrong: the one whose program lost
    /// the link may write its own generation after ours. So the agent whose
    /// program runs writes its generation back (on each reload tick); an
    /// agent whose program does not run never writes. `true`: it wrote.
    fn keep(&self) -> bool {
        let Ok(link) = sys::obj_get(&self.pin) else {
            return false;
        };
        if sys::link_prog_id(link.as_fd()).ok() != Some(self.prog_id) {
            return false;
        }
        let (key, mut now) = (0u32.to_ne_bytes(), [0u8; 8]);
        if sys::map_lookup(self.gens.fd().as_fd(), &key, &mut now).is_err() || u64::from_ne_bytes(now) == self.gen.0 {
            return false;
        }
        match sys::map_replace(self.gens.fd().as_fd(), &key, &self.gen.0.to_ne_bytes()) {
            Ok(()) => {
                tracing::warn!(
                    found = u64::from_ne_bytes(now),
                    "the {}'s generation was another agent's while this agent's program counts (two agents started at once): written back; nothing was counted between",
                    self.what
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the {}'s generation back; nothing counts until it is", self.what);
                false
            }
        }
    }
}

/// Phase two: attaches the sk_msg program to SM_AGENT_TX, loads the
/// read-count program (on the `sock_recv_length` tracepoint, Linux 6.3+),
/// attaches it through a pinned link (`links/sm_app_read`) and makes its
/// generation the one that counts.
fn start_to_app(
    ebpf: &mut Ebpf,
    pins: &Pins,
    sk_msg: BorrowedFd<'_>,
    gen: ReadGen,
    btf: &Btf,
) -> Result<(ToAppMaps, Option<Counting>), CaptureError> {
    let tx = map_data(ebpf, names::SM_AGENT_TX)?;
    let outcome = attach_sk_msg(&tx_link_pin(pins), sk_msg, &tx, names::SM_AGENT_TX)?;
    tracing::info!(outcome = ?outcome, "sk_msg program attached to SM_AGENT_TX");
    let to_app = map_data(ebpf, names::SM_TO_APP)?;
    let app_read = map_data(ebpf, names::SM_APP_READ)?;
    let prog_id = load_tracing(
        ebpf,
        btf,
        progs::APP_READ,
        progs::APP_READ_TRACEPOINT,
        "; phase two needs it (Linux 6.3+) to count what apps read: run without --sockmap-to-app",
    )?;
    // A read count a previous agent attached is kept, program and
    // generation: replacing it would leave the reads in between uncounted
    // (a tracing link cannot swap its program in place), and a forwarding
    // agent waits for every read of its apps (ARCHITECTURE.md, "The kernel
    // path"). So a changed read-count program takes over only where none
    // runs (a fresh node, or after phase two was off).
    if let Some(kept) = attached_prog(&app_read_pin(pins)) {
        tracing::info!(prog_id = kept, "phase two on: the agent's writes to the apps skip TCP on lo; app reads counted by the program a previous agent attached (kept)");
        return Ok((ToAppMaps { tx, to_app, app_read }, None));
    }
    let outcome = converge_tracing(&app_read_pin(pins), program(ebpf, progs::APP_READ)?)?;
    // Our program counts from now on (the one it replaced, if something
    // still holds it attached, stops); a kept one was ours already. Two
    // agents starting at once with the same pins may leave the generation
    // of the one whose program lost the link: `Counting::keep` mends it.
    let count = if matches!(outcome, links::Converged::Attached | links::Converged::Replaced { .. }) {
        let count = Counting {
            what: "read count",
            gen,
            prog_id,
            gens: map_data(ebpf, names::SM_READ_GEN)?,
            pin: app_read_pin(pins),
        };
        count.count()?;
        Some(count)
    } else {
        None
    };
    tracing::info!(outcome = ?outcome, "phase two on: the agent's writes to the apps skip TCP on lo; app reads counted");
    Ok((ToAppMaps { tx, to_app, app_read }, count))
}

/// The id of the program the link pinned at `pin` runs, if one is pinned.
fn attached_prog(pin: &Path) -> Option<u32> {
    let link = sys::obj_get(pin).ok()?;
    sys::link_prog_id(link.as_fd()).ok()
}

/// Makes the sk_msg link pinned at `pin` on sockhash `map` run `prog`
/// (attached, or swapped in place of a previous agent's).
fn attach_sk_msg(
    pin: &Path,
    prog: BorrowedFd<'_>,
    map: &MapData,
    name: &str,
) -> Result<links::Converged, CaptureError> {
    attach_to_map(pin, prog, map, name, sys::SockmapHook::Msg)
}

/// Makes the link pinned at `pin` run `prog` at `hook` of sockhash `map`
/// (attached, or swapped in place of a previous agent's).
fn attach_to_map(
    pin: &Path,
    prog: BorrowedFd<'_>,
    map: &MapData,
    name: &str,
    hook: sys::SockmapHook,
) -> Result<links::Converged, CaptureError> {
    links::converge(pin, prog, links::Swap::InPlace, &mut || {
        sys::sockmap_link_create(prog, map.fd().as_fd(), hook).map_err(|e| {
            bpf_err(format!("attach {hook:?} to {name} as a bpf_link"))(format!("{e} (sockmap links need Linux 6.10+)"))
        })
    })
}

/// The kernel path: loads the verdict program and makes the pinned link on
/// SM_NET (`links/sm_net`) run it, and attaches the send count
/// ([`start_sent_count`]). Sockets join SM_NET only after this, one hop at
/// a time ([`AgentEnds::join_forward`]).
fn start_forward(
    ebpf: &mut Ebpf,
    pins: &Pins,
    gen: ReadGen,
    btf: &Btf,
) -> Result<(FwdMaps, Option<Counting>), CaptureError> {
    let net = map_data(ebpf, names::SM_NET)?;
    let prog: &mut SkSkb = program(ebpf, progs::SK_SKB)?;
    bpf!("load sk_skb verdict", prog.load())?;
    let fd = bpf!("sk_skb fd", prog.fd())?
        .try_clone()
        .map_err(|e| bpf_err("sk_skb fd")(e.to_string()))?;
    let outcome = attach_to_map(
        &net_link_pin(pins),
        fd.as_fd(),
        &net,
        names::SM_NET,
        sys::SockmapHook::SkbVerdict,
    )?;
    tracing::info!(outcome = ?outcome, "kernel path on: sk_skb verdict attached to SM_NET; plain hops forward in the kernel");
    // Taken after the verdict is loaded: the ring's fd must stay open
    // while a program that writes to it loads.
    let ring = map_data(ebpf, names::SM_FWD_EVENTS)?;
    let ring = bpf!("map SM_FWD_EVENTS", RingBuf::try_from(Map::RingBuf(ring)))?;
    let lost = map_data(ebpf, names::SM_FWD_LOST)?;
    let lost = bpf!("map SM_FWD_LOST", PerCpuArray::try_from(Map::PerCpuArray(lost)))?;
    let verdict = sys::prog_info(fd.as_fd())
        .map_err(|e| bpf_err("sk_skb verdict info")(e.to_string()))?
        .id;
    let parked = Parked::start(ring, lost).map_err(|e| bpf_err("the hand-back reader thread")(e.to_string()))?;
    let maps = FwdMaps {
        net,
        fwd: map_data(ebpf, names::SM_FWD)?,
        net_hop: map_data(ebpf, names::SM_NET_HOP)?,
        parked,
        verdict,
        link: net_link_pin(pins),
    };
    let count = start_sent_count(ebpf, pins, gen, btf).unwrap_or_else(|e| {
        tracing::warn!(reason = %e, "kernel path: the send count is off; the app's sends switch to the kernel once the agent has reported what it forwarded, which a busy machine may delay past the next send");
        None
    });
    Ok((maps, count))
}

/// The kernel path's send count (`mesh_fwd_sent`, on the `sock_send_length`
/// tracepoint): made the one that counts, then attached through a pinned
/// link (`links/sm_fwd_sent`), replacing a previous agent's. It counts a
/// forwarded hop's bytes inside the agent's send, where the agent's own
/// report comes after it (ARCHITECTURE.md, "The kernel path"). Unlike the
/// read count it need not be kept across restarts: a send it misses only
/// waits for the agent's report. `None`: a newer agent's program counts.
///
/// The generation is written before the attach: a replaced program stays
/// attached for a moment after its pin goes (the kernel releases a link
/// later), and a generation written between the two programs' runs for
/// one send would let both count it. Written first, the old program
/// stops before ours runs at all (a tracepoint call runs the programs
/// attached when it began). A send in between is counted by neither.
fn start_sent_count(ebpf: &mut Ebpf, pins: &Pins, gen: ReadGen, btf: &Btf) -> Result<Option<Counting>, CaptureError> {
    let gens = map_data(ebpf, names::SM_SENT_GEN)?;
    let prog_id = load_tracing(ebpf, btf, progs::FWD_SENT, progs::FWD_SENT_TRACEPOINT, "")?;
    let count = Counting {
        what: "send count",
        gen,
        prog_id,
        gens,
        pin: sent_count_pin(pins),
    };
    count.count()?;
    let outcome = converge_tracing(&sent_count_pin(pins), program(ebpf, progs::FWD_SENT)?)?;
    tracing::info!(outcome = ?outcome, "kernel path: what forwarded hops send counted in the kernel");
    // A newer agent's program stays: its next reload tick writes its
    // generation back over ours (`Counting::keep`).
    Ok(matches!(outcome, links::Converged::Attached | links::Converged::Replaced { .. }).then_some(count))
}

/// The kernel path off: detach a previous agent's verdict program and send
/// count. Hops that joined SM_NET keep the verdict until they close (the
/// kernel copies it into each socket at insertion), and their agent reads
/// them to the end.
fn stop_forward(pins: &Pins) {
    for pin in [net_link_pin(pins), sent_count_pin(pins)] {
        detach(&pin, "the sockmap kernel path");
    }
}

fn net_link_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_net")
}

fn sent_count_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_fwd_sent")
}

/// Loads the tp_btf program `name` on `tracepoint` (`needs`: what to tell
/// the operator when the kernel refuses it); its program id.
fn load_tracing(ebpf: &mut Ebpf, btf: &Btf, name: &str, tracepoint: &str, needs: &str) -> Result<u32, CaptureError> {
    let prog: &mut BtfTracePoint = program(ebpf, name)?;
    prog.load(tracepoint, btf)
        .map_err(|e| bpf_err(format!("load {name} (tp_btf/{tracepoint})"))(format!("{}{needs}", chain(&e))))?;
    let fd = bpf!("tp_btf fd", prog.fd())?;
    Ok(sys::prog_info(fd.as_fd())
        .map_err(|e| bpf_err("read the tp_btf program")(e.to_string()))?
        .id)
}

/// The pinned link at `pin` (the read count's, the send count's) runs
/// `prog`: attached where none is pinned. Should two agents starting at once both attach, a tracing link
/// cannot swap its program, so the later detaches the earlier's and
/// attaches its own ([`links::Swap::Reattach`]); reads between the two are
/// not counted, which makes the bound stricter for the hops open then,
/// holds their sockets in SM_APP until they close, and holds back a
/// forwarding agent that waits for those reads (ARCHITECTURE.md, "The
/// kernel path"). A restart keeps a running read count instead (see
/// `start_to_app`).
fn converge_tracing(pin: &Path, prog: &mut BtfTracePoint) -> Result<links::Converged, CaptureError> {
    let fd = bpf!("tp_btf fd", prog.fd())?
        .try_clone()
        .map_err(|e| bpf_err("tp_btf fd")(e.to_string()))?;
    links::converge(pin, fd.as_fd(), links::Swap::Reattach, &mut || {
        let id = bpf!("attach tp_btf", prog.attach())?;
        Ok(FdLink::from(bpf!("tp_btf link", prog.take_link(id))?))
    })
}

/// Phase two off: detach a previous agent's read-count program. Hops it
/// prepared keep their state; their agent -> app directions that were
/// redirected fall back to TCP at the bound (nothing counts reads now).
fn stop_to_app(pins: &Pins) {
    for pin in [app_read_pin(pins), tx_link_pin(pins)] {
        detach(&pin, "phase two");
    }
}

/// Removes the pinned link `pin` (of `part` of the acceleration) a previous
/// agent left: its program detaches at once (the agent holds no fd on it).
fn detach(pin: &Path, part: &str) {
    if !pin.exists() {
        return;
    }
    match std::fs::remove_file(pin) {
        Ok(()) => tracing::info!(pin = %pin.display(), "{part} off: detached a previous agent's program"),
        Err(e) => tracing::warn!(error = %e, pin = %pin.display(), "cannot detach a program of {part}"),
    }
}

fn app_read_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_app_read")
}

fn tx_link_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_msg_tx")
}

/// `--sockmap` off: detach the sk_msg program a previous agent left, so no
/// new app socket is accelerated. Sockets already accelerated keep their
/// program (the kernel copies it into each socket at insertion) and their
/// agent keeps reading them with recvmsg until they close.
pub fn stop(pins: &Pins) {
    stop_forward(pins);
    stop_to_app(pins);
    detach(&link_pin(pins), "sockmap");
}

fn link_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_msg")
}

fn map_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData, CaptureError> {
    let map = ebpf.take_map(name).ok_or_else(|| {
        bpf_err(format!("map {name}"))("missing from the object; rebuild it with `cargo xtask build-ebpf`".into())
    })?;
    match map {
        Map::SockHash(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::RingBuf(d) => Ok(d),
        other => Err(bpf_err(format!("map {name}"))(format!("unexpected type {other:?}"))),
    }
}

/// Every slot of a counters map (`names` in slot order), summed over the
/// CPUs.
pub fn read_stats(stats: &PerCpuArray<MapData, u64>, names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sum = stats.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            (*name, sum)
        })
        .collect()
}

/// The counters of the pinned SM_STATS, for `agent status` and metrics
/// (empty when no agent of a sockmap-aware release ever ran here).
pub fn pinned_stats(pins: &Pins) -> BTreeMap<&'static str, u64> {
    pinned_counters(pins, names::SM_STATS, sockmap_stats::NAMES.as_slice())
}

/// The counters of the pinned SM_TO_APP_STATS (phase two), for `agent
/// status` and metrics (empty when no agent of a release with phase two
/// ever ran here).
pub fn pinned_to_app_stats(pins: &Pins) -> BTreeMap<&'static str, u64> {
    pinned_counters(pins, names::SM_TO_APP_STATS, to_app_stats::NAMES.as_slice())
}

fn pinned_counters(pins: &Pins, map: &str, slots: &[&'static str]) -> BTreeMap<&'static str, u64> {
    MapData::from_pin(pins.maps().join(map))
        .ok()
        .and_then(|d| PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(d)).ok())
        .map(|s| read_stats(&s, slots))
        .unwrap_or_default()
}

/// The counters of the pinned SM_FWD_STATS (the kernel path), for `agent
/// status` and metrics (empty when no agent of a release with it ran here).
pub fn pinned_fwd_stats(pins: &Pins) -> BTreeMap<&'static str, u64> {
    pinned_counters(pins, names::SM_FWD_STATS, fwd_stats::NAMES.as_slice())
}

/// How many entries SM_APP, SM_AGENT, SM_HOPS, SM_READ, phase two's
/// SM_TO_APP, SM_APP_READ and SM_AGENT_TX, and the kernel path's SM_NET,
/// SM_FWD and SM_NET_HOP hold: all empty once every accelerated socket has
/// closed and its connection ended (`agent status`).
pub fn pinned_entries(pins: &Pins) -> BTreeMap<&'static str, usize> {
    let count = |name: &'static str| -> Option<(&'static str, usize)> {
        let data = MapData::from_pin(pins.maps().join(name)).ok()?;
        let info = data.info().ok()?;
        let n = sys::map_key_count(data.fd().as_fd(), info.key_size() as usize, info.max_entries() as usize).ok()?;
        Some((name, n))
    };
    [
        names::SM_APP,
        names::SM_AGENT,
        names::SM_HOPS,
        names::SM_READ,
        names::SM_TO_APP,
        names::SM_APP_READ,
        names::SM_AGENT_TX,
        names::SM_NET,
        names::SM_FWD,
        names::SM_NET_HOP,
    ]
    .into_iter()
    .filter_map(count)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_supports_sockmap_acceleration() {
        probe().unwrap();
    }

    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

    /// A prepared pin directory of the test's own (removed with the first).
    fn scratch_pins(label: &str) -> (super::super::TestPins, Pins) {
        let scratch = super::super::TestPins::new(label);
        let name = scratch.0.file_name().unwrap().to_str().unwrap().to_string();
        let pins = Pins::new(scratch.0.parent().unwrap(), &name);
        pins.prepare().unwrap();
        (scratch, pins)
    }

    /// One "agent": the object loaded against the scratch pins.
    fn load(pins: &Pins) -> Ebpf {
        load_gen(pins, ReadGen::new())
    }

    /// [`load`] with the read-count generation `gen`.
    fn load_gen(pins: &Pins, gen: ReadGen) -> Ebpf {
        aya::EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .override_global(aya_log::LEVEL, &0u8, true)
            .override_global(agent_common::globals::READ_GEN, &gen.value(), true)
            .load(OBJECT)
            .expect("run `cargo xtask build-ebpf` before the unit tests")
    }

    /// SM_READ_GEN, the pinned one.
    fn read_gens(pins: &Pins) -> aya::maps::Array<MapData, u64> {
        let data = MapData::from_pin(pins.maps().join(names::SM_READ_GEN)).unwrap();
        aya::maps::Array::try_from(Map::Array(data)).unwrap()
    }

    /// SM_READ_GEN's value.
    fn read_gen(pins: &Pins) -> u64 {
        read_gens(pins).get(&0, 0).unwrap()
    }

    fn sk_msg_fd(ebpf: &mut Ebpf) -> aya::programs::ProgramFd {
        let prog: &mut SkMsg = program(ebpf, progs::SK_MSG).unwrap();
        if prog.fd().is_err() {
            prog.load().unwrap();
        }
        prog.fd().unwrap().try_clone().unwrap()
    }

    /// The restart and handover path of the sk_msg program: a pinned link
    /// on SM_APP that outlives its agent, an identical program kept, and the
    /// kernel's compare-and-swap on sockmap links that lets a newer agent
    /// replace the program with no moment without one.
    #[test]
    fn the_sk_msg_link_is_pinned_kept_and_swapped_by_compare_and_swap() {
        let (_scratch, pins) = scratch_pins("smlink");

        let mut a = load(&pins);
        Sockmap::start(&mut a, &pins, None, false).unwrap();
        let link = sys::obj_get(&link_pin(&pins)).unwrap();
        let a_fd = sk_msg_fd(&mut a);
        let a_id = sys::prog_info(a_fd.as_fd()).unwrap().id;
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), a_id);
        drop(a);
        // The agent is gone; the pinned link keeps its program attached.
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), a_id);

        // A restarted agent with the same program keeps the link as it is.
        let mut b = load(&pins);
        Sockmap::start(&mut b, &pins, None, false).unwrap();
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), a_id);

        // Swaps are atomic and refused when the old program is stale.
        let b_fd = sk_msg_fd(&mut b);
        let mut c = load(&pins);
        let c_fd = sk_msg_fd(&mut c);
        sys::link_update(link.as_fd(), b_fd.as_fd(), a_fd.as_fd()).unwrap();
        let e = sys::link_update(link.as_fd(), c_fd.as_fd(), a_fd.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let b_id = sys::prog_info(b_fd.as_fd()).unwrap().id;
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), b_id);

        // --sockmap off detaches it.
        stop(&pins);
        assert!(!link_pin(&pins).exists());
    }

    /// Phase two's read count and the sk_msg link on the agent's sockets:
    /// attached through pinned links. A restarted agent (another load, so
    /// another read-count generation) replaces the read count and makes its
    /// own generation the one that counts, and turning phase two off
    /// removes both phase-two links (the sk_msg link on the apps' sockets
    /// stays).
    #[test]
    fn phase_two_links_are_pinned_kept_on_restart_and_removed_when_off() {
        let (_scratch, pins) = scratch_pins("smread");

        let gen_a = ReadGen::new();
        let mut a = load_gen(&pins, gen_a);
        Sockmap::start(&mut a, &pins, Some(gen_a), false).unwrap();
        assert_eq!(read_gen(&pins), gen_a.value());
        let link = sys::obj_get(&app_read_pin(&pins)).unwrap();
        let first = sys::link_prog_id(link.as_fd()).unwrap();
        // The sk_msg program runs on the agent's sends too.
        let tx = sys::obj_get(&tx_link_pin(&pins)).unwrap();
        let on_apps = sys::obj_get(&link_pin(&pins)).unwrap();
        assert_eq!(
            sys::link_prog_id(tx.as_fd()).unwrap(),
            sys::link_prog_id(on_apps.as_fd()).unwrap()
        );
        drop(a);
        // The pin keeps it attached while no agent runs.
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), first);
        drop(link);

        // A restart keeps the running read count, program and generation:
        // no read goes uncounted in between.
        let gen_b = ReadGen::new();
        let mut b = load_gen(&pins, gen_b);
        let (restarted, _ends) = Sockmap::start(&mut b, &pins, Some(gen_b), false).unwrap();
        let again = sys::obj_get(&app_read_pin(&pins)).unwrap();
        assert_eq!(sys::link_prog_id(again.as_fd()).unwrap(), first);
        assert_eq!(read_gen(&pins), gen_a.value());
        assert!(!restarted.keep_counts(), "an agent that kept another's count wrote");
        drop(again);

        let mut c = load(&pins);
        Sockmap::start(&mut c, &pins, None, false).unwrap();
        assert!(!app_read_pin(&pins).exists());
        assert!(!tx_link_pin(&pins).exists());
        assert!(link_pin(&pins).exists());
        stop(&pins);
        assert!(!link_pin(&pins).exists());
    }

    /// The kernel path's verdict program: attached to SM_NET through a
    /// pinned link (it loads: the verifier accepts it), swapped in place
    /// by the next agent's, although the code is the same: each writes the
    /// hand-back ring of its own agent (unpinned), which hands the next
    /// agent's sockets to it; removed when the kernel path is off, and
    /// never attached without phase two.
    #[test]
    fn the_kernel_path_link_is_pinned_swapped_on_restart_and_removed_when_off() {
        let (_scratch, pins) = scratch_pins("smnet");
        let gen = ReadGen::new();
        let mut a = load_gen(&pins, gen);
        let (s, ends) = Sockmap::start(&mut a, &pins, Some(gen), true).unwrap();
        assert!(ends.forwarding());
        let link = sys::obj_get(&net_link_pin(&pins)).unwrap();
        let first = sys::link_prog_id(link.as_fd()).unwrap();
        drop((a, s, ends));
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), first, "the pin keeps it");

        let gen = ReadGen::new();
        let mut b = load_gen(&pins, gen);
        let (_s, ends) = Sockmap::start(&mut b, &pins, Some(gen), true).unwrap();
        assert!(ends.forwarding());
        let second = sys::link_prog_id(link.as_fd()).unwrap();
        assert_ne!(second, first, "the first agent's verdict, and ring, kept");
        assert_eq!(
            attached_prog(&net_link_pin(&pins)),
            Some(second),
            "the same link, its program swapped"
        );

        let mut c = load(&pins);
        let (_s, ends) = Sockmap::start(&mut c, &pins, None, true).unwrap();
        assert!(!ends.forwarding(), "no kernel path without phase two");
        assert!(!net_link_pin(&pins).exists());
        assert!(!sent_count_pin(&pins).exists());
        stop(&pins);
    }

    /// A pinned map of the scratch pins, as a hash map (plain or LRU).
    fn pinned_hash<K: aya::Pod, V: aya::Pod>(pins: &Pins, name: &str) -> aya::maps::HashMap<MapData, K, V> {
        let data = MapData::from_pin(pins.maps().join(name)).unwrap();
        let map = match data.info().unwrap().map_type().unwrap() {
            aya::maps::MapType::LruHash => Map::LruHashMap(data),
            _ => Map::HashMap(data),
        };
        aya::maps::HashMap::try_from(map).unwrap()
    }

    /// SM_SENT_GEN, the pinned one.
    fn sent_gens(pins: &Pins) -> aya::maps::Array<MapData, u64> {
        let data = MapData::from_pin(pins.maps().join(names::SM_SENT_GEN)).unwrap();
        aya::maps::Array::try_from(Map::Array(data)).unwrap()
    }

    /// The value of a pinned generation map (SM_READ_GEN, SM_SENT_GEN).
    fn pinned_gen(pins: &Pins, name: &str) -> u64 {
        let data = MapData::from_pin(pins.maps().join(name)).unwrap();
        aya::maps::Array::<_, u64>::try_from(Map::Array(data))
            .unwrap()
            .get(&0, 0)
            .unwrap()
    }

    /// The kernel path's send count (on the `sock_send_length` tracepoint)
    /// adds what a joined hop's socket to the peer sends (write(2), also
    /// through a dup'ed fd as the agent's writes go) to the hop's SM_READ
    /// count, before the send returns; and nothing for what that socket
    /// reads, for a socket with no entry, for one whose SM_FWD entry is
    /// another socket's or whose app closed, or whose SM_NET_HOP entry is
    /// the verdict's netns-0 mark. A restarted agent's program takes over,
    /// and should the first one still be attached (two agents started at
    /// once), only the program of the generation in SM_SENT_GEN counts: no
    /// send is counted twice (a count ahead of the bytes on the socket
    /// would let the app's sends overtake them). Off, it is detached.
    #[test]
    fn the_send_count_adds_what_a_forwarded_socket_sends_to_its_hop_once() {
        use std::io::{Read, Write};
        let (_scratch, pins) = scratch_pins("smsent");
        let gen = ReadGen::new();
        let mut a = load_gen(&pins, gen);
        let (_s, ends) = Sockmap::start(&mut a, &pins, Some(gen), true).unwrap();
        assert!(ends.forwarding());
        assert!(sent_count_pin(&pins).exists());
        assert_eq!(pinned_gen(&pins, names::SM_SENT_GEN), gen.value());
        let mut read = pinned_hash::<HopKey, u64>(&pins, names::SM_READ);
        let mut net_hop = pinned_hash::<u64, HopKey>(&pins, names::SM_NET_HOP);
        let mut fwds = pinned_hash::<HopKey, Fwd>(&pins, names::SM_FWD);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut net = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let cookie = sys::socket_cookie(net.as_raw_fd()).unwrap();
        let key = hop_key(
            1,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        let own = Fwd {
            net_cookie: cookie,
            ..Fwd::default()
        };
        read.insert(key, 100, 0).unwrap();
        net_hop.insert(cookie, key, 0).unwrap();
        fwds.insert(key, own, 0).unwrap();
        let count = |read: &aya::maps::HashMap<MapData, HopKey, u64>| read.get(&key, 0).unwrap();

        net.write_all(&[1; 1000]).unwrap();
        assert_eq!(count(&read), 1100, "a send of the hop's socket");
        net.try_clone().unwrap().write_all(&[1; 10]).unwrap();
        assert_eq!(count(&read), 1110, "a send through a dup'ed fd");
        peer.write_all(&[2; 50]).unwrap();
        net.read_exact(&mut [0; 50]).unwrap();
        assert_eq!(count(&read), 1110, "the peer's send, or net's read, counted");

        fwds.insert(
            key,
            Fwd {
                net_cookie: cookie + 1,
                ..own
            },
            0,
        )
        .unwrap();
        net.write_all(&[1; 7]).unwrap();
        assert_eq!(count(&read), 1110, "counted for another socket's entry");
        fwds.insert(key, Fwd { app_gone: 1, ..own }, 0).unwrap();
        net.write_all(&[1; 7]).unwrap();
        assert_eq!(count(&read), 1110, "counted after the app closed");
        fwds.insert(key, own, 0).unwrap();
        net_hop.insert(cookie, HopKey::default(), 0).unwrap();
        net.write_all(&[1; 7]).unwrap();
        assert_eq!(count(&read), 1110, "counted under the netns-0 mark");
        net_hop.insert(cookie, key, 0).unwrap();
        net.write_all(&[1; 5]).unwrap();
        assert_eq!(count(&read), 1115);

        // A restarted agent's program replaces the first and counts.
        let gen_b = ReadGen::new();
        let mut b = load_gen(&pins, gen_b);
        let (sb, _ends_b) = Sockmap::start(&mut b, &pins, Some(gen_b), true).unwrap();
        assert_eq!(pinned_gen(&pins, names::SM_SENT_GEN), gen_b.value());
        assert!(!sb.keep_counts(), "wrote generations that were right");
        net.write_all(&[1; 20]).unwrap();
        assert_eq!(count(&read), 1135);
        // Both attached at once: counted once.
        let first: &mut BtfTracePoint = program(&mut a, progs::FWD_SENT).unwrap();
        first.attach().unwrap();
        net.write_all(&[1; 20]).unwrap();
        assert_eq!(count(&read), 1155, "a send counted twice");
        // Two agents started at once, the loser's generation written last:
        // the winner writes its own back on its next tick.
        sent_gens(&pins).set(0, gen.value(), 0).unwrap();
        net.write_all(&[1; 20]).unwrap();
        assert_eq!(count(&read), 1175, "neither or both counted");
        assert!(sb.keep_counts(), "the send count's generation was not written back");
        assert_eq!(pinned_gen(&pins, names::SM_SENT_GEN), gen_b.value());

        let gen_c = ReadGen::new();
        let mut c = load_gen(&pins, gen_c);
        Sockmap::start(&mut c, &pins, Some(gen_c), false).unwrap();
        assert!(!sent_count_pin(&pins).exists());
    }

    /// Hand-backs lost to a full ring: the reader reads SM_FWD_LOST after
    /// each drain of the ring, and once it grew, wakes every parked
    /// connection without telling it to read, so that each looks at its
    /// entries. A ring cannot be filled from user space: the test adds to
    /// the count by hand, then has the verdict write one record (a segment
    /// on a SM_NET socket whose hop has no entries), which wakes the reader.
    #[test]
    fn lost_hand_backs_wake_every_parked_connection_to_look_at_its_entries() {
        use std::io::Write;
        let (_scratch, pins) = scratch_pins("smlost");
        let gen = ReadGen::new();
        let mut a = load_gen(&pins, gen);
        let (_s, ends) = Sockmap::start(&mut a, &pins, Some(gen), true).unwrap();
        let maps = ends.fwd.as_ref().unwrap();
        let parks = [maps.parked.park(1).unwrap(), maps.parked.park(2).unwrap()];

        // The reader's SM_FWD_LOST (not pinned): the one the verdict uses.
        let verdict: &mut SkSkb = program(&mut a, progs::SK_SKB).unwrap();
        let lost = verdict
            .info()
            .unwrap()
            .map_ids()
            .unwrap()
            .unwrap()
            .into_iter()
            .find(|id| aya::maps::MapInfo::from_id(*id).is_ok_and(|m| m.name_as_str() == Some(names::SM_FWD_LOST)))
            .unwrap();
        let mut lost = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(MapData::from_id(lost).unwrap())).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        lost.set(0, aya::maps::PerCpuValues::try_from(vec![1u64; cpus]).unwrap(), 0)
            .unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (net, _) = listener.accept().unwrap();
        let key = hop_key(
            1,
            "127.0.0.1:40001".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        let fd = net.as_raw_fd() as u32;
        sys::map_update(maps.net.fd().as_fd(), sys::key_bytes(&key), &fd.to_ne_bytes()).unwrap();
        client.write_all(b"x").unwrap();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        for (i, p) in parks.iter().enumerate() {
            // Well within the reader's idle wake-up (10 s): the record woke it.
            rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(2), p.woken()).await })
                .unwrap_or_else(|_| panic!("parked connection {i} never woken"));
            assert!(!p.told(), "connection {i} told to read: no record named it");
        }
    }

    /// Two agents starting at once: the one whose read-count program lost
    /// the link writes its generation after the winner's. The winner's
    /// next reload tick writes its own back; the loser's never writes.
    #[test]
    fn the_read_count_generation_is_kept_by_the_agent_whose_program_counts() {
        let (_scratch, pins) = scratch_pins("smkeep");
        let gen_a = ReadGen::new();
        let mut a = load_gen(&pins, gen_a);
        let (counts, _ends_a) = Sockmap::start(&mut a, &pins, Some(gen_a), false).unwrap();
        assert_eq!(read_gen(&pins), gen_a.value());
        assert!(!counts.keep_counts(), "wrote a generation that was right");

        // Two agents starting at once: the other one, whose program lost
        // the link, wrote its generation last.
        let other = ReadGen::new();
        read_gens(&pins).set(0, other.value(), 0).unwrap();
        assert!(counts.keep_counts(), "the generation was not written back");
        assert_eq!(read_gen(&pins), gen_a.value());

        // An agent started later keeps that count and never writes.
        let gen_b = ReadGen::new();
        let mut b = load_gen(&pins, gen_b);
        let (kept, _ends_b) = Sockmap::start(&mut b, &pins, Some(gen_b), false).unwrap();
        read_gens(&pins).set(0, other.value(), 0).unwrap();
        assert!(!kept.keep_counts(), "the agent whose program does not count wrote");
        assert!(counts.keep_counts());
        assert_eq!(read_gen(&pins), gen_a.value());
    }

    /// The read count (on the `sock_recv_length` tracepoint) adds what a
    /// socket with a SM_APP_READ entry reads, through read(2) and recv(2),
    /// and nothing of what it peeks; a socket without an entry gets none;
    /// and only the program of the generation in SM_READ_GEN counts.
    #[test]
    fn the_read_count_adds_what_a_socket_reads_and_not_what_it_peeks() {
        use std::io::{Read, Write};
        let (_scratch, pins) = scratch_pins("smcount");
        let gen = ReadGen::new();
        let mut a = load_gen(&pins, gen);
        Sockmap::start(&mut a, &pins, Some(gen), false).unwrap();
        let data = MapData::from_pin(pins.maps().join(names::SM_APP_READ)).unwrap();
        let mut reads = aya::maps::HashMap::<MapData, u64, u64>::try_from(Map::HashMap(data)).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut app, _) = listener.accept().unwrap();
        let mut other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cookie = sys::socket_cookie(app.as_raw_fd()).unwrap();
        reads.insert(cookie, 0, 0).unwrap();
        let counted = pinned_entries(&pins);
        assert_eq!(counted.get(names::SM_APP_READ), Some(&1), "{counted:?}");
        assert_eq!(counted.get(names::SM_APP), Some(&0), "{counted:?}");

        client.write_all(&[7; 1000]).unwrap();
        let mut buf = [0u8; 1000];
        let peeked = app.peek(&mut buf[..400]).unwrap();
        assert!(peeked > 0);
        assert_eq!(reads.get(&cookie, 0).unwrap(), 0, "a peek was counted");
        app.read_exact(&mut buf[..400]).unwrap();
        // SAFETY: recv(2) into a buffer of the length passed.
        let n = unsafe { libc::recv(app.as_raw_fd(), buf.as_mut_ptr().cast(), 600, libc::MSG_WAITALL) };
        assert_eq!(n, 600);
        assert_eq!(reads.get(&cookie, 0).unwrap(), 1000);

        let (mut accepted, _) = listener.accept().unwrap();
        accepted.write_all(b"x").unwrap();
        other.read_exact(&mut buf[..1]).unwrap();
        let other_cookie = sys::socket_cookie(other.as_raw_fd()).unwrap();
        assert!(
            reads.get(&other_cookie, 0).is_err(),
            "a socket without an entry got one"
        );

        // Another generation counts now: this program no longer does.
        read_gens(&pins).set(0, gen.value() + 1, 0).unwrap();
        client.write_all(&[7; 100]).unwrap();
        app.read_exact(&mut buf[..100]).unwrap();
        assert_eq!(
            reads.get(&cookie, 0).unwrap(),
            1000,
            "a program of another generation counted"
        );
    }

    /// What [`AgentEnds::to_app`] leaves of an undecided direction (its
    /// `app_cookie` 7) whose agent socket is in CLOSE_WAIT. `pair` makes
    /// the agent's socket and the app's, on a thread of their own that it
    /// may move to a network namespace of its own; the app then half-closes.
    fn to_app_in_close_wait(
        label: &str,
        pair: impl FnOnce() -> (std::net::TcpStream, std::net::TcpStream) + Send,
    ) -> ToApp {
        let (_scratch, pins) = scratch_pins(label);
        let gen = ReadGen::new();
        let mut a = load_gen(&pins, gen);
        let (_sockmap, ends) = Sockmap::start(&mut a, &pins, Some(gen), false).unwrap();
        let data = MapData::from_pin(pins.maps().join(names::SM_TO_APP)).unwrap();
        let mut to_app = aya::maps::HashMap::<MapData, HopKey, ToApp>::try_from(Map::HashMap(data)).unwrap();
        std::thread::scope(|t| {
            t.spawn(|| {
                let (agent, app) = pair();
                app.shutdown(std::net::Shutdown::Write).unwrap();
                // The FIN is in once a read sees the end: the agent's
                // socket is in CLOSE_WAIT.
                assert_eq!(std::io::Read::read(&mut &agent, &mut [0u8; 1]).unwrap(), 0);
                let (ours, theirs) = (agent.local_addr().unwrap(), agent.peer_addr().unwrap());
                let key = hop_key(42, ours, theirs);
                let undecided = ToApp {
                    value: hop::UNDECIDED,
                    app_tcp: 0,
                    app_cookie: 7,
                };
                to_app.insert(key, undecided, 0).unwrap();
                assert!(ends.to_app(42, &agent, theirs, ours).is_none(), "the entry was there");
                to_app.get(&key, 0).unwrap()
            })
            .join()
            .unwrap()
        })
    }

    /// The agent's connection to an app, which the kernel will not put
    /// into SM_AGENT_TX for its state (CLOSE_WAIT: the app half-closed
    /// before the agent got to it), decides its undecided direction TCP:
    /// sockops never inserts such a socket, so nothing else would, and the
    /// app's socket would wait in SM_APP for it until it closed.
    #[test]
    fn a_connection_to_an_app_refused_for_its_state_decides_its_direction_tcp() {
        let now = to_app_in_close_wait("smclosewait", || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let agent = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (agent, listener.accept().unwrap().0)
        });
        assert_eq!(hop::state(now.value), hop::TCP, "{:#x}", now.value);
        assert_eq!(now.app_cookie, 7);
    }

    /// An accepted 15001 socket the kernel refuses for its state stays
    /// undecided: sockops most likely put it in SM_AGENT_TX at the
    /// handshake, and its first send decides. (In a network namespace of
    /// the test's own, where 127.0.0.1:15001 is free.)
    #[test]
    fn an_accepted_15001_socket_refused_for_its_state_stays_undecided() {
        let now = to_app_in_close_wait("smclosewait15001", || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
            loopback_up();
            let listener = std::net::TcpListener::bind(("127.0.0.1", agent_common::OUTBOUND_PORT)).unwrap();
            let app = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (listener.accept().unwrap().0, app)
        });
        assert_eq!(hop::state(now.value), hop::UNDECIDED, "{:#x}", now.value);
    }

    /// Brings this thread's namespace's `lo` up (a fresh one starts down).
    fn loopback_up() {
        // SAFETY: a datagram socket of our own, and an ifreq that names `lo`
        // and holds the flags the first ioctl read into it.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(s >= 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), 0);
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(s, libc::SIOCSIFFLAGS, &req), 0);
            libc::close(s);
        }
    }

    #[test]
    fn hop_keys_fold_ipv4_mapped_addresses() {
        let v4 = hop_key(
            7,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        let mapped = hop_key(
            7,
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:15001".parse().unwrap(),
        );
        assert_eq!(v4, mapped);
        let other_pod = hop_key(
            8,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        assert_ne!(v4, other_pod);
    }
}
