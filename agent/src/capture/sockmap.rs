//! Sockmap acceleration of the in-pod hops whose reader is the agent
//! (`agent run --sockmap`): the owner of the sk_msg program and of the
//! SM_APP, SM_AGENT, SM_HOPS, SM_READ and SM_STATS maps (see agent-ebpf).
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
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use agent_common::{hop, maps as names, programs as progs, sockmap_stats, HopKey};
use aya::{
    maps::{Map, MapData, MapType, PerCpuArray},
    programs::{ProgramType, SkMsg},
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
    Ebpf,
};
use prometheus_client::metrics::counter::Counter;

use super::{bpf_err, chain, links, program, sys, to_ip6, CaptureError, Pins};

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

    fn state(&self, key: &HopKey) -> Option<u32> {
        self.value(key).map(hop::state)
    }

    fn value(&self, key: &HopKey) -> Option<u32> {
        self.hops.get(key, 0).ok()
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
}

impl Sockmap {
    /// Loads the sk_msg program and makes the pinned link on SM_APP run it
    /// (attached, or swapped in place of a previous agent's). Runs before
    /// any pod is enrolled with the sockmap flag, so no app socket enters
    /// SM_APP before a program is attached (one that did would stay on TCP).
    pub fn start(ebpf: &mut Ebpf, pins: &Pins) -> Result<(Self, AgentEnds), CaptureError> {
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
        let pin = link_pin(pins);
        let outcome = links::converge(&pin, fd.as_fd(), &mut || {
            sys::sk_msg_link_create(fd.as_fd(), app.fd().as_fd()).map_err(|e| {
                bpf_err("attach sk_msg to SM_APP as a bpf_link")(format!("{e} (sockmap links need Linux 6.10+)"))
            })
        })?;
        tracing::info!(outcome = ?outcome, "sk_msg program attached to SM_APP");
        let ends = AgentEnds {
            agent,
            read,
            hops,
            fallbacks: Counter::default(),
            respliced: Counter::default(),
        };
        Ok((Self { stats }, ends))
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        read_stats(&self.stats)
    }
}

/// `--sockmap` off: detach the sk_msg program a previous agent left, so no
/// new app socket is accelerated. Sockets already accelerated keep their
/// program (the kernel copies it into each socket at insertion) and their
/// agent keeps reading them with recvmsg until they close.
pub fn stop(pins: &Pins) {
    let pin = link_pin(pins);
    if pin.exists() {
        match std::fs::remove_file(&pin) {
            Ok(()) => tracing::info!("sockmap off: detached a previous agent's sk_msg program"),
            Err(e) => tracing::warn!(error = %e, pin = %pin.display(), "cannot detach the sk_msg program"),
        }
    }
}

fn link_pin(pins: &Pins) -> PathBuf {
    pins.links().join("sm_msg")
}

fn map_data(ebpf: &mut Ebpf, name: &str) -> Result<MapData, CaptureError> {
    let map = ebpf.take_map(name).ok_or_else(|| {
        bpf_err(format!("map {name}"))("missing from the object; rebuild it with `cargo xtask build-ebpf`".into())
    })?;
    match map {
        Map::SockHash(d) | Map::PerCpuArray(d) | Map::HashMap(d) => Ok(d),
        other => Err(bpf_err(format!("map {name}"))(format!("unexpected type {other:?}"))),
    }
}

/// Every SM_STATS slot, summed over the CPUs.
pub fn read_stats(stats: &PerCpuArray<MapData, u64>) -> BTreeMap<&'static str, u64> {
    sockmap_stats::NAMES
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
    let path = pins.maps().join(names::SM_STATS);
    MapData::from_pin(path)
        .ok()
        .and_then(|d| PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(d)).ok())
        .map(|s| read_stats(&s))
        .unwrap_or_default()
}

/// How many entries SM_APP, SM_AGENT, SM_HOPS and SM_READ hold: all empty
/// once every accelerated socket has closed (`agent status`).
pub fn pinned_entries(pins: &Pins) -> BTreeMap<&'static str, usize> {
    let count = |name: &'static str| -> Option<(&'static str, usize)> {
        let data = MapData::from_pin(pins.maps().join(name)).ok()?;
        let n = match name {
            names::SM_APP => aya::maps::SockHash::<MapData, u64>::try_from(Map::SockHash(data))
                .ok()?
                .keys()
                .count(),
            names::SM_AGENT => aya::maps::SockHash::<MapData, HopKey>::try_from(Map::SockHash(data))
                .ok()?
                .keys()
                .count(),
            names::SM_READ => aya::maps::HashMap::<MapData, HopKey, u64>::try_from(Map::HashMap(data))
                .ok()?
                .keys()
                .count(),
            _ => aya::maps::HashMap::<MapData, HopKey, u32>::try_from(Map::HashMap(data))
                .ok()?
                .keys()
                .count(),
        };
        Some((name, n))
    };
    [names::SM_APP, names::SM_AGENT, names::SM_HOPS, names::SM_READ]
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

    /// One "agent": the object loaded against the scratch pins.
    fn load(pins: &Pins) -> Ebpf {
        aya::EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .override_global(aya_log::LEVEL, &0u8, true)
            .load(OBJECT)
            .expect("run `cargo xtask build-ebpf` before the unit tests")
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
        let scratch = super::super::TestPins::new("smlink");
        let name = scratch.0.file_name().unwrap().to_str().unwrap();
        let pins = Pins::new(scratch.0.parent().unwrap(), name);
        pins.prepare().unwrap();

        let mut a = load(&pins);
        Sockmap::start(&mut a, &pins).unwrap();
        let link = sys::obj_get(&link_pin(&pins)).unwrap();
        let a_fd = sk_msg_fd(&mut a);
        let a_id = sys::prog_info(a_fd.as_fd()).unwrap().id;
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), a_id);
        drop(a);
        // The agent is gone; the pinned link keeps its program attached.
        assert_eq!(sys::link_prog_id(link.as_fd()).unwrap(), a_id);

        // A restarted agent with the same program keeps the link as it is.
        let mut b = load(&pins);
        Sockmap::start(&mut b, &pins).unwrap();
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
