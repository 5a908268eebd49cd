//! Owner of the capture eBPF programs and maps (see agent-ebpf).
//!
//! Pinned state, all under one bpffs directory:
//! ```text
//! <bpffs>/<pin-name>/v1/maps/<MAP>               every map, by its versioned name
//! <bpffs>/<pin-name>/v1/links/cg_<program>       one link per cgroup hook
//! <bpffs>/<pin-name>/v1/links/sklookup_<netns cookie>
//! ```
//! Links are pinned and the agent keeps no fd to them, so capture (and its
//! fail-closed behaviour) outlives the agent, and removing a pin detaches at
//! once.
//!
//! Upgrades and downgrades (see ARCHITECTURE.md, "Pinned state"): a map's
//! name is its shape version (`agent_common::maps`), so agents of two
//! releases share every map that did not change (the per-connection state
//! included) and keep side by side the ones that did. A starting agent loads
//! its programs against those maps, fills its new maps by enrolling every
//! pod, and only then swaps its programs into the pinned links
//! ([`links::converge`]: atomic, compare-and-swap). Maps no attached program
//! uses any more are unpinned then (counters are carried over first).
mod beacon;
pub mod bpflog;
pub mod links;
pub mod probe;
mod sys;

/// poll(2) on one fd (the proxy's kernel path asks a parked socket).
pub use sys::poll;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use agent_common::{
    maps as names, pod_flags, programs as progs, stats, ConnKey, Ip6, OrigDst, PodEntry, SockKey, PIN_SCHEME_VERSION,
};
use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, PerCpuArray, SockHash},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use serde::Serialize;

use crate::{config::CaptureSettings, netns::Netns};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs at {path} is unusable: {reason}; mount one with `mount -t bpf bpf {path}` or pass --bpffs <a bpffs directory>", path = path.display())]
    Bpffs { path: PathBuf, reason: String },
    #[error("cgroup parent {path} is not cgroup v2: {reason}; capture needs a cgroup v2 directory (cgroup2 is mounted at {mount}): pass --cgroup-parent <a directory below it>", path = path.display())]
    Cgroup2 {
        path: PathBuf,
        reason: String,
        mount: String,
    },
    #[error("this kernel lacks the BPF program type {name} (Linux {since}+ with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF); upgrade the node's kernel")]
    MissingProgramType { name: &'static str, since: &'static str },
    #[error("{0}")]
    Kernel(String),
    #[error("no eBPF object is built into this agent: run `cargo xtask build-ebpf` and rebuild, or pass --bpf-object <path to agent-ebpf>")]
    NoObject,
    #[error("cannot read eBPF object {path}: {source}; build it with `cargo xtask build-ebpf`", path = path.display())]
    ReadObject { path: PathBuf, source: std::io::Error },
    #[error("pins of an incompatible naming scheme ({found}) exist under {root}; this agent uses v{PIN_SCHEME_VERSION}: stop the other agent and run `agent cleanup` first", root = root.display())]
    Layout { root: PathBuf, found: String },
    #[error("pinned map {name} has {pinned} but this agent's {name} has {ours}: a map whose shape changes needs a new name (agent_common::maps); to start over, stop the agents and run `agent cleanup`")]
    MapShape { name: String, pinned: String, ours: String },
    #[error("no capture pins under {0}: is an agent with this --bpffs/--pin-name running or has it run on this node?")]
    NoPins(String),
    #[error("eBPF {what}: {message}")]
    Bpf { what: String, message: String },
    #[error("pod {pod}: {message}")]
    Pod { pod: String, message: String },
    #[error("a newer agent runs the capture on this node and enrols its pods now")]
    Superseded,
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("{what} {path}: {source}", path = path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn bpf_err(what: impl Into<String>) -> impl FnOnce(String) -> CaptureError {
    let what = what.into();
    move |message: String| CaptureError::Bpf { what, message }
}

/// An error and all its sources, so the kernel's errno reaches the operator.
fn chain(e: &dyn std::error::Error) -> String {
    format!("{e}{}", mesh::causes(e))
}

macro_rules! bpf {
    ($what:expr, $e:expr) => {
        $e.map_err(|e| bpf_err($what)(chain(&e)))
    };
}

pub mod sockmap;

/// The pin directory of one agent instance.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(bpffs: &Path, pin_name: &str) -> Self {
        let root = bpffs.join(pin_name);
        let dir = root.join(format!("v{PIN_SCHEME_VERSION}"));
        Self { root, dir }
    }
    fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }
    fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
    fn sk_lookup_link(&self, netns_cookie: u64) -> PathBuf {
        self.links().join(format!("sklookup_{netns_cookie}"))
    }

    /// The pinned maps of `family` (`STATS`, `STATS_V2`, ...).
    fn family(&self, family: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.maps()) else {
            return vec![];
        };
        let mut v: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| in_family(&e.file_name().to_string_lossy(), family))
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    /// Creates the directories, refusing to mix with another naming scheme.
    fn prepare(&self) -> Result<(), CaptureError> {
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            let ours = format!("v{PIN_SCHEME_VERSION}");
            let other: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| *n != ours)
                .collect();
            if !other.is_empty() {
                return Err(CaptureError::Layout {
                    root: self.root.clone(),
                    found: other.join(", "),
                });
            }
        }
        for d in [self.maps(), self.links()] {
            std::fs::create_dir_all(&d).map_err(|source| CaptureError::Io {
                what: "cannot create pin directory",
                path: d,
                source,
            })?;
        }
        Ok(())
    }
}

/// `name` is `family` or a later version of it (`family_V<n>`).
fn in_family(name: &str, family: &str) -> bool {
    name == family
        || name
            .strip_prefix(family)
            .and_then(|r| r.strip_prefix("_V"))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// Typed handles on the pinned maps.
pub struct Maps {
    enrolled: HashMap<MapData, u64, PodEntry>,
    pod_ips: HashMap<MapData, Ip6, u32>,
    inbound: SockHash<MapData, Ip6>,
    node_addrs: HashMap<MapData, Ip6, u32>,
    excl_ports: HashMap<MapData, u16, u32>,
    excl_cidrs: LpmTrie<MapData, Ip6, u32>,
    stats: PerCpuArray<MapData, u64>,
}

/// The maps the proxy uses per connection: CONN_ORIG (read) and LOCAL_FWD;
/// SM_AGENT when sockmap acceleration is on.
pub struct ProxyMaps(
    HashMap<MapData, ConnKey, OrigDst>,
    std::sync::Mutex<HashMap<MapData, SockKey, u32>>,
    Option<sockmap::AgentEnds>,
);

impl ProxyMaps {
    /// The agent's ends of the in-pod hops, when sockmap acceleration is on.
    /// Every socket inserted there must be read with recvmsg, never splice.
    pub fn sockmap(&self) -> Option<&sockmap::AgentEnds> {
        self.2.as_ref()
    }

    /// Lets the agent's connection from `src` (the client's address) past
    /// sk_lookup; call before connecting, then [`ProxyMaps::forget_forward`].
    pub fn allow_forward(&self, src: std::net::SocketAddr) -> Result<(), CaptureError> {
        let key = SockKey {
            addr: to_ip6(src.ip()),
            port: src.port(),
            _pad: [0; 6],
        };
        bpf!(
            "LOCAL_FWD insert",
            self.1.lock().unwrap_or_else(|e| e.into_inner()).insert(key, 1, 0)
        )
    }

    pub fn forget_forward(&self, src: std::net::SocketAddr) {
        let key = SockKey {
            addr: to_ip6(src.ip()),
            port: src.port(),
            _pad: [0; 6],
        };
        let _ = self.1.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }

    /// Where the application behind the accepted connection from `peer` (in
    /// the pod netns with `netns_cookie`) wanted to go.
    pub fn lookup(&self, netns_cookie: u64, peer: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            addr: to_ip6(peer.ip()),
            port: peer.port(),
            _pad: [0; 6],
        };
        let orig = self.0.get(&key, 0).ok()?;
        Some(std::net::SocketAddr::new(from_ip6(orig.addr), orig.port))
    }
}

impl Maps {
    /// Opens the maps through `open` (from a loaded object or from pins);
    /// the proxy's maps too when `proxy` (a running agent).
    fn open(
        mut open: impl FnMut(&str) -> Result<Map, CaptureError>,
        proxy: bool,
    ) -> Result<(Self, Option<ProxyMaps>), CaptureError> {
        macro_rules! typed {
            ($name:expr) => {
                bpf!(
                    format!("map {}", $name),
                    open($name)?.try_into().map_err(|e: aya::maps::MapError| e)
                )?
            };
        }
        let maps = Maps {
            enrolled: typed!(names::ENROLLED_NETNS),
            pod_ips: typed!(names::POD_IPS),
            inbound: typed!(names::INBOUND),
            node_addrs: typed!(names::NODE_ADDRS),
            excl_ports: typed!(names::EXCL_PORTS),
            excl_cidrs: typed!(names::EXCL_CIDRS),
            stats: typed!(names::STATS),
        };
        let proxy = match proxy {
            true => Some(ProxyMaps(
                typed!(names::CONN_ORIG),
                std::sync::Mutex::new(typed!(names::LOCAL_FWD)),
                None,
            )),
            false => None,
        };
        Ok((maps, proxy))
    }

    /// Opens the maps an agent pinned, without loading any program. The
    /// counters are those the attached programs use, whichever release
    /// pinned them (see [`stats_pin`]).
    pub fn from_pins(pins: &Pins) -> Result<Self, CaptureError> {
        if !pins.maps().is_dir() {
            return Err(CaptureError::NoPins(pins.dir.display().to_string()));
        }
        let stats = stats_pin(pins);
        Self::open(
            |name| {
                let path = match (name, &stats) {
                    (names::STATS, Some(p)) => p.clone(),
                    _ => pins.maps().join(name),
                };
                let data = bpf!(format!("pinned map {name}"), MapData::from_pin(path))?;
                bpf!(format!("pinned map {name}"), Map::from_map_data(data))
            },
            false,
        )
        .map(|(maps, _)| maps)
    }

    fn enroll(
        &mut self,
        pod_id: u32,
        netns_cookie: u64,
        ips: &[IpAddr],
        inbound: &impl AsRawFd,
        flags: u32,
    ) -> Result<(), CaptureError> {
        for ip in ips {
            let key = to_ip6(*ip);
            // Listener first, then the IP: sk_lookup never sees an enrolled IP without a listener
            // while we enroll (it would refuse the connection).
            bpf!("INBOUND insert", self.inbound.insert(key, inbound.as_raw_fd(), 0))?;
            bpf!("POD_IPS insert", self.pod_ips.insert(key, pod_id, 0))?;
        }
        // Outbound redirect starts last, once the inbound side is in place.
        bpf!(
            "ENROLLED_NETNS insert",
            self.enrolled.insert(netns_cookie, PodEntry { pod_id, flags }, 0)
        )
    }

    /// Stops capturing pod `pod_id`: outbound first, then inbound. Only
    /// entries still its own go: a pod of the node that took one of its
    /// IPs (or its netns) meanwhile overwrote them, and deleting them would
    /// let that pod's inbound bypass the mesh until it is enrolled again.
    /// `false`: the netns is another pod's now (its sk_lookup link too).
    fn unenroll(&mut self, pod_id: u32, netns_cookie: u64, ips: &[IpAddr]) -> bool {
        let netns_ours = match self.enrolled.get(&netns_cookie, 0) {
            Ok(e) if e.pod_id != pod_id => {
                tracing::info!(
                    netns_cookie,
                    owner = e.pod_id,
                    "netns captured for another pod now: left to it"
                );
                false
            }
            _ => {
                let _ = self.enrolled.remove(&netns_cookie);
                true
            }
        };
        for ip in ips {
            let key = to_ip6(*ip);
            match self.pod_ips.get(&key, 0) {
                Ok(owner) if owner != pod_id => {
                    tracing::info!(%ip, owner, "IP captured for another pod now: left to it");
                }
                _ => {
                    let _ = self.pod_ips.remove(&key);
                    let _ = self.inbound.remove(&key);
                }
            }
        }
        netns_ours
    }

    /// Makes the settings maps equal to `s`.
    fn apply_settings(&mut self, s: &CaptureSettings) -> Result<(), CaptureError> {
        let ports: HashSet<u16> = s.exclude_ports.iter().copied().collect();
        prune(&mut self.excl_ports, |p, _| ports.contains(p));
        for p in &ports {
            bpf!("EXCL_PORTS insert", self.excl_ports.insert(p, 1, 0))?;
        }

        let addrs: HashSet<Ip6> = s.node_addresses.iter().map(|a| to_ip6(*a)).collect();
        prune(&mut self.node_addrs, |a, _| addrs.contains(a));
        for a in &addrs {
            bpf!("NODE_ADDRS insert", self.node_addrs.insert(a, 1, 0))?;
        }

        // IPv4 prefixes live in the ::ffff:0:0/96 part of the trie.
        let cidrs: Vec<(u32, Ip6)> = s
            .exclude_cidrs
            .iter()
            .map(|c| {
                (
                    u32::from(c.prefix) + if c.addr.is_ipv4() { 96 } else { 0 },
                    to_ip6(c.addr),
                )
            })
            .collect();
        let have: Vec<Key<Ip6>> = self.excl_cidrs.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !cidrs.contains(&(k.prefix_len(), k.data()))) {
            let _ = self.excl_cidrs.remove(k);
        }
        for (len, data) in cidrs {
            bpf!("EXCL_CIDRS insert", self.excl_cidrs.insert(&Key::new(len, data), 1, 0))?;
        }
        Ok(())
    }

    /// Drops enrolment of every netns and IP not in the desired sets.
    /// Removes the entries not in the wanted sets; with `ours`, only those
    /// of pods it says this agent enrolled.
    fn retain(&mut self, cookies: &HashSet<u64>, ips: &HashSet<Ip6>, ours: Option<&dyn Fn(u32) -> bool>) {
        let mine = |id: u32| ours.is_none_or(|f| f(id));
        prune(&mut self.enrolled, |c, e| cookies.contains(c) || !mine(e.pod_id));
        for ip in prune(&mut self.pod_ips, |i, id| ips.contains(i) || !mine(*id)) {
            let _ = self.inbound.remove(&ip);
        }
    }

    /// Every counter slot of the counters map (which may be another
    /// release's: slots this release does not know are `slot_<i>`).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        (0..self.stats.len())
            .map(|i| {
                let sum = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                let name = stats::NAMES
                    .get(i as usize)
                    .map_or_else(|| format!("slot_{i}"), |n| n.to_string());
                (name, sum)
            })
            .collect()
    }

    /// Adds the counters of `old` (another release's counters map, no
    /// longer used by any program) to ours, slot by slot and CPU by CPU.
    fn absorb_stats(&mut self, old: &PerCpuArray<MapData, u64>) {
        for i in 0..self.stats.len().min(old.len()) {
            let (Ok(ours), Ok(theirs)) = (self.stats.get(&i, 0), old.get(&i, 0)) else {
                continue;
            };
            let sum: Vec<u64> = ours.iter().zip(theirs.iter()).map(|(a, b)| a + b).collect();
            if let Ok(values) = aya::maps::PerCpuValues::try_from(sum) {
                let _ = self.stats.set(i, values, 0);
            }
        }
    }
}

/// Removes every entry `keep` rejects; returns the removed keys.
fn prune<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, keep: impl Fn(&K, &V) -> bool) -> Vec<K> {
    let stale: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    stale
}

/// The loaded capture programs of one agent, and the links they run in.
pub struct Capture {
    ebpf: Ebpf,
    pins: Pins,
    maps: Maps,
    /// The cgroup the cgroup programs attach to (kept open for [`Capture::activate`]).
    cgroup: std::fs::File,
    /// Our programs run in the cgroup links (done once, after the first
    /// complete enrolment).
    active: bool,
    /// Another release's maps may be left to unpin (once, one pass after
    /// activation: the programs swapped out have finished their last runs
    /// by then, so their counters are final).
    unpin_pending: bool,
    /// Last activation error, logged once per change.
    active_error: Option<String>,
    /// The settings last written to the maps in full (each write is a
    /// sweep of three maps: skipped while they stay the same).
    settings: Option<CaptureSettings>,
    /// Sockmap acceleration, when on and supported.
    sockmap: Option<sockmap::Sockmap>,
    /// The program our sockops link ran when we activated (its id), to see
    /// a successor take the hooks over ([`Capture::superseded`]).
    own_sockops: Option<u32>,
    superseded: bool,
    /// Bound before our programs take the hooks (see [`beacon`]).
    beacon: Option<beacon::Beacon>,
    /// A successor's beacon was seen since we were superseded.
    successor_seen: bool,
    /// Where the beacons live (see [`beacon`]); `None`: our own netns.
    beacon_netns: Option<PathBuf>,
    beacon_warned: bool,
}

/// What `agent status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub enrolled_netns: Vec<u64>,
    pub pod_ips: Vec<IpAddr>,
    pub inbound_listeners: Vec<IpAddr>,
    pub node_addresses: Vec<IpAddr>,
    pub exclude_ports: Vec<u16>,
    pub links: Vec<String>,
    /// The program each link runs and the maps it uses: the layout in force.
    pub programs: Vec<links::LinkStatus>,
    /// Every pinned map, by name.
    pub maps: Vec<String>,
    pub stats: BTreeMap<String, u64>,
    /// SM_STATS counters (empty when no sockmap-aware agent ran here).
    pub sockmap: BTreeMap<&'static str, u64>,
    /// SM_TO_APP_STATS counters (phase two; zeros when it never ran here,
    /// empty where no release with phase two ran).
    pub sockmap_to_app: BTreeMap<&'static str, u64>,
    /// SM_FWD_STATS counters (the kernel path; empty where no release with
    /// it ran).
    pub sockmap_forward: BTreeMap<&'static str, u64>,
    /// Entries of the SM_* maps of sockets (0 once the sockets closed).
    pub sockmap_entries: BTreeMap<&'static str, usize>,
}

impl Capture {
    /// Probes the kernel and loads the programs against the pinned maps
    /// (creating the maps this release adds or changes). Nothing is attached
    /// yet: the cgroup programs take over in [`Capture::activate`], once
    /// every pod is enrolled, so a previous agent's programs keep capturing
    /// until ours have filled their maps. `bpf_log` turns on the programs'
    /// aya-log records (see [`bpflog`]). `sockmap` asks for sockmap
    /// acceleration: probed, and off (logged with the reason) when the
    /// kernel cannot do it; its phase two and kernel path as well
    /// (likewise).
    pub fn start(
        object: &[u8],
        bpffs: &Path,
        pin_name: &str,
        cgroup_parent: &Path,
        bpf_log: bool,
        sockmap: sockmap::Phases,
    ) -> Result<(Self, ProxyMaps), CaptureError> {
        probe::ensure_bpffs(bpffs)?;
        probe::check_cgroup2(cgroup_parent)?;
        probe::check_program_types()?;
        if object.is_empty() {
            return Err(CaptureError::NoObject);
        }
        let pins = Pins::new(bpffs, pin_name);
        pins.prepare()?;
        check_map_shapes(object, &pins)?;
        let level = if bpf_log { bpflog::DEBUG } else { bpflog::OFF };
        let read_gen = sockmap::ReadGen::new();
        let mut ebpf = bpf!(
            "load",
            EbpfLoader::new()
                .default_map_pin_directory(pins.maps())
                .override_global(aya_log::LEVEL, &level, true)
                .override_global(agent_common::globals::READ_GEN, &read_gen.value(), true)
                .load(object)
        )?;
        let cgroup = std::fs::File::open(cgroup_parent).map_err(|source| CaptureError::Io {
            what: "cannot open cgroup",
            path: cgroup_parent.to_owned(),
            source,
        })?;
        for name in CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            bpf!(format!("load {name}"), prog.load())?;
        }
        let prog: &mut SockOps = program(&mut ebpf, progs::SOCKOPS)?;
        bpf!("load sockops", prog.load())?;
        let prog: &mut SkLookup = program(&mut ebpf, progs::SK_LOOKUP)?;
        bpf!("load sk_lookup", prog.load())?;
        // After every load: the log ring's fd must stay valid through them.
        if bpf_log {
            bpflog::start(&mut ebpf)?;
        }

        let (maps, orig) = Maps::open(
            |name| {
                ebpf.take_map(name)
                    .ok_or_else(|| bpf_err(format!("map {name}"))("missing from object".into()))
            },
            true,
        )?;
        let mut orig = orig.expect("asked for the proxy maps");
        let sockmap = match sockmap.on {
            false => {
                tracing::info!("sockmap acceleration off (--sockmap not given)");
                sockmap::stop(&pins);
                None
            }
            true => match sockmap::probe().and_then(|()| {
                let to_app = sockmap.to_app.then_some(read_gen);
                sockmap::Sockmap::start(&mut ebpf, &pins, to_app, sockmap.forward).map_err(|e| e.to_string())
            }) {
                Ok((s, ends)) => {
                    tracing::info!("sockmap acceleration on: the in-pod hops to the agent skip TCP on lo");
                    orig.2 = Some(ends);
                    Some(s)
                }
                Err(reason) => {
                    tracing::warn!(%reason, "sockmap acceleration unavailable on this kernel: off; every hop stays on TCP");
                    sockmap::stop(&pins);
                    None
                }
            },
        };
        let capture = Self {
            ebpf,
            pins,
            maps,
            cgroup,
            active: false,
            unpin_pending: false,
            settings: None,
            active_error: None,
            own_sockops: None,
            superseded: false,
            beacon: None,
            successor_seen: false,
            beacon_netns: None,
            beacon_warned: false,
            sockmap,
        };
        Ok((capture, orig))
    }

    /// Captures a pod: its inbound listener goes into INBOUND for each IP,
    /// its netns is marked enrolled for the outbound hooks, then our
    /// sk_lookup program runs in its netns (attached, or swapped into the
    /// pinned link a previous agent made: maps first, so the swap finds
    /// them filled).
    pub fn enroll(
        &mut self,
        pod_id: u32,
        netns: &Netns,
        netns_cookie: u64,
        ips: &[IpAddr],
        inbound: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let flags = match &self.sockmap {
            Some(s) if s.to_app() => pod_flags::SOCKMAP | pod_flags::SOCKMAP_TO_APP,
            Some(_) => pod_flags::SOCKMAP,
            None => 0,
        };
        self.maps.enroll(pod_id, netns_cookie, ips, inbound, flags)?;
        let pin = self.pins.sk_lookup_link(netns_cookie);
        let prog: &mut SkLookup = program(&mut self.ebpf, progs::SK_LOOKUP)?;
        let fd = bpf!("sk_lookup fd", prog.fd())?
            .try_clone()
            .map_err(|e| CaptureError::Bpf {
                what: "sk_lookup fd".into(),
                message: e.to_string(),
            })?;
        let outcome = links::converge(&pin, fd.as_fd(), links::Swap::InPlace, &mut || {
            let id = bpf!("attach sk_lookup", prog.attach(netns.file()))?;
            Ok(FdLink::from(bpf!("sk_lookup", prog.take_link(id))?))
        })?;
        if outcome != links::Converged::Attached {
            tracing::info!(netns_cookie, outcome = ?outcome, "sk_lookup link of a previous agent");
        }
        Ok(())
    }

    /// Stops capturing pod `pod_id` (as given to [`Self::enroll`]); its
    /// traffic goes direct again at once.
    pub fn unenroll(&mut self, pod_id: u32, netns_cookie: u64, ips: &[IpAddr]) {
        if self.maps.unenroll(pod_id, netns_cookie, ips) {
            let _ = std::fs::remove_file(self.pins.sk_lookup_link(netns_cookie));
        }
    }

    pub fn apply_settings(&mut self, s: &CaptureSettings) -> Result<(), CaptureError> {
        if self.settings.as_ref() == Some(s) {
            return Ok(());
        }
        self.settings = None;
        self.maps.apply_settings(s)?;
        self.settings = Some(s.clone());
        Ok(())
    }

    /// Whether [`Self::retain`] has work beyond removing stale entries: the
    /// cgroup programs are not attached yet, or maps left unused by the
    /// attach are still pinned.
    pub fn needs_sweep(&self) -> bool {
        !self.active || self.unpin_pending
    }

    /// Removes every enrolment (maps and sk_lookup links) not in the desired
    /// sets. Called at the end of a complete enrolment pass that may have
    /// left some (see [`Self::needs_sweep`]): the first one also activates
    /// our cgroup programs, and removes what a previous agent left. Later
    /// ones remove only entries of pods `ours` says this agent enrolled
    /// (and links whose netns entry is gone): while a successor starts
    /// beside us (a rolling update with surge) both sweep the same maps,
    /// and ours must not take its new pods out of the capture.
    pub fn retain(&mut self, cookies: &HashSet<u64>, ips: &[IpAddr], ours: impl Fn(u32) -> bool) {
        let ips: HashSet<Ip6> = ips.iter().map(|i| to_ip6(*i)).collect();
        let ours: Option<&dyn Fn(u32) -> bool> = self.active.then_some(&ours);
        self.retain_entries(cookies, &ips, ours);
        if self.unpin_pending {
            self.unpin_pending = false;
            self.unpin_unused_maps();
        }
        if !self.active {
            match self.activate() {
                Ok(()) => (self.active, self.unpin_pending) = (true, true),
                Err(e) => {
                    let msg = e.to_string();
                    if self.active_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, "cannot attach the capture programs; a previous agent's programs (if any) stay in force; will retry");
                        self.active_error = Some(msg);
                    }
                }
            }
        }
    }

    /// The entries and links part of [`Self::retain`]; `ours`: only those
    /// of pods it says this agent enrolled (and links whose netns entry is
    /// gone), else every one not wanted.
    fn retain_entries(&mut self, cookies: &HashSet<u64>, ips: &HashSet<Ip6>, ours: Option<&dyn Fn(u32) -> bool>) {
        self.maps.retain(cookies, ips, ours);
        for (cookie, path) in sk_lookup_links(&self.pins) {
            let owned_elsewhere = ours.is_some() && self.maps.enrolled.get(&cookie, 0).is_ok();
            if !cookies.contains(&cookie) && !owned_elsewhere {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Makes every cgroup link run our programs (see [`links::converge`]).
    fn activate(&mut self) -> Result<(), CaptureError> {
        // Before the hooks: an agent we supersede must see us alive as soon
        // as it sees our programs.
        if self.beacon.is_none() {
            let pin_name = self.pins.root.file_name().unwrap_or_default().to_string_lossy();
            match beacon::Beacon::bind(&pin_name, self.beacon_netns.clone()) {
                Ok(b) => self.beacon = Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot bind the agent's beacon: an agent this one supersedes cannot tell if it dies")
                }
            }
        }
        let mut outcomes = BTreeMap::new();
        for name in CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let outcome = converge_cgroup(&self.pins, name, prog, &self.cgroup)?;
            outcomes.insert(name, outcome);
        }
        let prog: &mut SockOps = program(&mut self.ebpf, progs::SOCKOPS)?;
        outcomes.insert(
            progs::SOCKOPS,
            converge_cgroup(&self.pins, progs::SOCKOPS, prog, &self.cgroup)?,
        );
        if outcomes.values().any(|o| matches!(o, links::Converged::Newer { .. })) {
            // A successor activated first (our first pass came late).
            self.mark_superseded();
        } else {
            self.own_sockops = self.sockops_link_prog();
        }
        tracing::info!(programs = ?outcomes, "capture programs attached");
        Ok(())
    }

    /// The network namespace every agent of the node shares (the host's,
    /// when agent pods have their own), for the beacons: set before the
    /// first [`Self::retain`].
    pub fn set_beacon_netns(&mut self, netns: PathBuf) {
        self.beacon_netns = Some(netns);
    }

    /// We were superseded, and the successor is gone: its beacon was seen
    /// and is no more (its programs stay pinned and nobody enrols pods). A
    /// successor never seen is never taken for gone: a release without
    /// beacons (a downgrade) must not make us step down and come back.
    pub fn successor_gone(&mut self) -> bool {
        let superseded = self.superseded();
        let Some(beacon) = self.beacon.as_ref().filter(|_| superseded) else {
            return false;
        };
        match beacon.others() {
            Ok(true) => {
                if !self.successor_seen {
                    tracing::info!("the successor's beacon is up: this agent steps down if it goes");
                }
                self.successor_seen = true;
                false
            }
            Ok(false) => self.successor_seen,
            Err(e) => {
                if !std::mem::replace(&mut self.beacon_warned, true) {
                    tracing::warn!(error = %e, "cannot look for the successor's beacon: this agent cannot tell if it dies");
                }
                false
            }
        }
    }

    /// The program the pinned sockops link runs now.
    fn sockops_link_prog(&self) -> Option<u32> {
        links::prog_of(&self.pins.links().join(format!("cg_{}", progs::SOCKOPS)))
    }

    /// From now on a successor's maps (see [`Self::superseded`]); logged
    /// once.
    fn mark_superseded(&mut self) {
        if !std::mem::replace(&mut self.superseded, true) {
            tracing::info!("a newer agent runs the capture programs: this agent no longer changes the capture maps");
        }
    }

    /// The last [`Self::superseded`], without looking again.
    pub fn is_superseded(&self) -> bool {
        self.superseded
    }

    /// Whether a successor's programs took the cgroup hooks over since we
    /// activated ours (a rolling update starts the new agent beside this
    /// one): from then on the shared maps are the successor's, and this
    /// agent must not change them (its enrolments would overwrite the
    /// successor's listeners with ours, which close when we exit, and its
    /// sweeps would take the successor's new pods out). Once seen, for
    /// good: a successor never hands back.
    pub fn superseded(&mut self) -> bool {
        if !self.superseded && self.own_sockops.is_some() {
            let now = self.sockops_link_prog();
            if now.is_some() && now != self.own_sockops {
                self.mark_superseded();
            }
        }
        self.superseded
    }

    /// Removes the pins of maps that are neither this release's nor used by
    /// any attached program: another release's, left after a handover.
    fn unpin_unused_maps(&mut self) {
        let in_use = links::maps_in_use(&self.pins.links());
        let Ok(entries) = std::fs::read_dir(self.pins.maps()) else {
            return;
        };
        let ours: HashSet<String> = self
            .ebpf
            .maps()
            .map(|(n, _)| n.to_string())
            .chain(MAP_NAMES.map(String::from))
            .collect();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours.contains(&name) {
                continue;
            }
            let Ok(data) = MapData::from_pin(e.path()) else {
                continue;
            };
            let Ok(info) = data.info() else { continue };
            if in_use.contains(&info.id()) {
                continue;
            }
            if in_family(&name, names::STATS_FAMILY) {
                if let Ok(old) = PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(data)) {
                    self.maps.absorb_stats(&old);
                }
            }
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!(map = %name, "unpinned a map no attached program uses (another release's)"),
                Err(err) => tracing::warn!(map = %name, error = %err, "cannot unpin an unused map"),
            }
        }
    }

    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.maps.stats()
    }

    /// The sockmap counters, when acceleration is on.
    pub fn sockmap_stats(&self) -> Option<BTreeMap<&'static str, u64>> {
        self.sockmap.as_ref().map(sockmap::Sockmap::stats)
    }

    /// Phase two's read count and the kernel path's send count keep
    /// counting (`sockmap::Sockmap::keep_counts`).
    pub fn keep_counts(&self) {
        if let Some(s) = &self.sockmap {
            s.keep_counts();
        }
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }
}

/// The maps this release pins, by the names its programs use.
const MAP_NAMES: [&str; 25] = [
    names::ENROLLED_NETNS,
    names::ORIG_DST,
    names::CONN_ORIG,
    names::POD_IPS,
    names::INBOUND,
    names::NODE_ADDRS,
    names::EXCL_PORTS,
    names::EXCL_CIDRS,
    names::STATS,
    names::LOCAL_FWD,
    names::SM_APP,
    names::SM_AGENT,
    names::SM_HOPS,
    names::SM_STATS,
    names::SM_READ,
    names::SM_TO_APP,
    names::SM_APP_READ,
    names::SM_AGENT_TX,
    names::SM_TO_APP_STATS,
    names::SM_READ_GEN,
    names::SM_NET,
    names::SM_FWD,
    names::SM_NET_HOP,
    names::SM_FWD_STATS,
    names::SM_SENT_GEN,
];

/// Converges the cgroup link of `name` on `prog` (attaching it at `cgroup`
/// when no link is pinned).
fn converge_cgroup<P>(
    pins: &Pins,
    name: &str,
    prog: &mut P,
    cgroup: &std::fs::File,
) -> Result<links::Converged, CaptureError>
where
    P: CgroupProgram,
{
    let pin = pins.links().join(format!("cg_{name}"));
    let fd = prog.prog_fd()?;
    links::converge(&pin, fd.as_fd(), links::Swap::InPlace, &mut || prog.attach_link(cgroup))
}

/// The two kinds of cgroup programs, as [`converge_cgroup`] needs them.
trait CgroupProgram {
    fn prog_fd(&self) -> Result<aya::programs::ProgramFd, CaptureError>;
    fn attach_link(&mut self, cgroup: &std::fs::File) -> Result<FdLink, CaptureError>;
}

macro_rules! cgroup_program {
    ($ty:ty) => {
        impl CgroupProgram for $ty {
            fn prog_fd(&self) -> Result<aya::programs::ProgramFd, CaptureError> {
                bpf!("program fd", self.fd())?
                    .try_clone()
                    .map_err(|e| CaptureError::Bpf {
                        what: "program fd".into(),
                        message: e.to_string(),
                    })
            }
            fn attach_link(&mut self, cgroup: &std::fs::File) -> Result<FdLink, CaptureError> {
                let id = bpf!("attach", self.attach(cgroup, LINK_MODE))?;
                bpf!("link", FdLink::try_from(bpf!("link", self.take_link(id))?))
            }
        }
    };
}
cgroup_program!(CgroupSockAddr);
cgroup_program!(SockOps);

/// Refuses to load against a pinned map of the same name but another shape:
/// aya would reuse it silently and the programs would misread it.
fn check_map_shapes(object: &[u8], pins: &Pins) -> Result<(), CaptureError> {
    let obj = bpf!("parse the eBPF object", aya_obj::Object::parse(object))?;
    for (name, m) in &obj.maps {
        let pin = pins.maps().join(name);
        if !pin.exists() {
            continue;
        }
        let info = bpf!(format!("pinned map {name}"), aya::maps::MapInfo::from_pin(&pin))?;
        let shape = |t: u32, k: u32, v: u32, n: u32| format!("type {t}, key {k} B, value {v} B, {n} entries");
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let pinned = shape(pinned_type, info.key_size(), info.value_size(), info.max_entries());
        let ours = shape(m.map_type(), m.key_size(), m.value_size(), m.max_entries());
        if pinned != ours {
            return Err(CaptureError::MapShape {
                name: name.clone(),
                pinned,
                ours,
            });
        }
    }
    Ok(())
}

/// The counters map the attached programs use (else the newest pinned).
fn stats_pin(pins: &Pins) -> Option<PathBuf> {
    let in_use = links::maps_in_use(&pins.links());
    let family = pins.family(names::STATS_FAMILY);
    family
        .iter()
        .find(|p| {
            aya::maps::MapInfo::from_pin(p)
                .map(|i| in_use.contains(&i.id()))
                .unwrap_or(false)
        })
        .or(family.last())
        .cloned()
}

/// bpf_link cgroup attachments take no flags: the kernel always attaches
/// links as multi-programs, so other software's programs keep running too.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The cgroup sock_addr programs, all attached at the cgroup parent.
const CGROUP_SOCK_ADDR: [&str; 4] = [
    progs::CONNECT4,
    progs::CONNECT6,
    progs::GETPEERNAME4,
    progs::GETPEERNAME6,
];

/// A program of the loaded object, typed.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| bpf_err(name)("missing from the object; rebuild it with `cargo xtask build-ebpf`".into()))?;
    p.try_into()
        .map_err(|e: aya::programs::ProgramError| bpf_err(name)(chain(&e)))
}

fn sk_lookup_links(pins: &Pins) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(pins.links()) else {
        return vec![];
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let cookie = e.file_name().to_str()?.strip_prefix("sklookup_")?.parse().ok()?;
            Some((cookie, e.path()))
        })
        .collect()
}

/// Deletes `key` from every pinned map of `family`, whatever release pinned
/// it (keys never change within a family; values may).
fn delete_everywhere<K: aya::Pod>(pins: &Pins, family: &str, key: &K) {
    for path in pins.family(family) {
        let deleted = sys::obj_get(&path).and_then(|fd| sys::map_delete(fd.as_fd(), sys::key_bytes(key)));
        if let Err(e) = deleted {
            tracing::warn!(map = %path.display(), error = %e, "cannot delete a key");
        }
    }
}

/// `agent unenroll`: stop capturing one pod using only the pins (works with
/// or without a running agent, and with the pins of any release).
pub fn unenroll_with_pins(bpffs: &Path, pin_name: &str, netns: &Netns, ips: &[IpAddr]) -> Result<(), CaptureError> {
    let pins = Pins::new(bpffs, pin_name);
    if !pins.maps().is_dir() {
        return Err(CaptureError::NoPins(pins.dir.display().to_string()));
    }
    let cookie = netns.cookie()?;
    // The same order as a running agent: outbound first, then inbound.
    delete_everywhere(&pins, names::ENROLLED_NETNS, &cookie);
    for ip in ips {
        let key = to_ip6(*ip);
        delete_everywhere(&pins, names::POD_IPS, &key);
        delete_everywhere(&pins, names::INBOUND, &key);
    }
    let _ = std::fs::remove_file(pins.sk_lookup_link(cookie));
    Ok(())
}

/// `agent cleanup`: remove every pin of this agent instance, which detaches
/// all its programs from cgroups and network namespaces at once.
pub fn cleanup(bpffs: &Path, pin_name: &str) -> Result<bool, CaptureError> {
    let pins = Pins::new(bpffs, pin_name);
    if !pins.root.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&pins.root).map_err(|source| CaptureError::Io {
        what: "cannot remove pins",
        path: pins.root.clone(),
        source,
    })?;
    Ok(true)
}

/// `agent status`: what the pins say, without a running agent.
pub fn status(bpffs: &Path, pin_name: &str) -> Result<Status, CaptureError> {
    let pins = Pins::new(bpffs, pin_name);
    let maps = Maps::from_pins(&pins)?;
    let list = |dir: PathBuf| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    let links = list(pins.links());
    let programs = links
        .iter()
        .filter_map(|l| links::status(&pins.links().join(l)))
        .collect();
    Ok(Status {
        pin_dir: pins.dir.clone(),
        enrolled_netns: maps.enrolled.keys().filter_map(Result::ok).collect(),
        pod_ips: maps.pod_ips.keys().filter_map(Result::ok).map(from_ip6).collect(),
        inbound_listeners: maps.inbound.keys().filter_map(Result::ok).map(from_ip6).collect(),
        node_addresses: maps.node_addrs.keys().filter_map(Result::ok).map(from_ip6).collect(),
        exclude_ports: maps.excl_ports.keys().filter_map(Result::ok).collect(),
        links,
        programs,
        maps: list(pins.maps()),
        stats: maps.stats(),
        sockmap: sockmap::pinned_stats(&pins),
        sockmap_to_app: sockmap::pinned_to_app_stats(&pins),
        sockmap_forward: sockmap::pinned_fwd_stats(&pins),
        sockmap_entries: sockmap::pinned_entries(&pins),
    })
}

pub fn to_ip6(ip: IpAddr) -> Ip6 {
    match ip {
        IpAddr::V4(v4) => Ip6::from_v4_raw(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => Ip6::from_octets(v6.octets()),
    }
}

pub fn from_ip6(ip: Ip6) -> IpAddr {
    Ipv6Addr::from(ip.octets()).to_canonical()
}

/// A pin directory of a unit test's own under the real bpffs, removed
/// however the test ends (a failed assertion included).
#[cfg(test)]
pub(crate) struct TestPins(pub PathBuf);

#[cfg(test)]
impl TestPins {
    pub fn new(tag: &str) -> TestPins {
        let bpffs = Path::new("/sys/fs/bpf");
        probe::ensure_bpffs(bpffs).unwrap();
        let dir = bpffs.join(format!("mesh-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestPins(dir)
    }
}

#[cfg(test)]
impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_conversions_round_trip() {
        for s in ["10.1.1.11", "fd00:1:1::11", "::1", "127.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(from_ip6(to_ip6(ip)), ip);
        }
        assert!(to_ip6("10.1.1.11".parse().unwrap()).is_v4_mapped());
    }

    #[test]
    fn a_pinned_map_of_another_shape_under_the_same_name_is_refused() {
        static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));
        let scratch = TestPins::new("shape");
        let name = scratch.0.file_name().unwrap().to_str().unwrap();
        let pins = Pins::new(scratch.0.parent().unwrap(), name);
        pins.prepare().unwrap();
        check_map_shapes(OBJECT, &pins).unwrap();
        // A STATS with one slot more than this release's: what a release
        // that forgot to rename a changed map would leave.
        let stats = pins.maps().join(names::STATS);
        let slots = (stats::COUNT + 1).to_string();
        let out = std::process::Command::new("bpftool")
            .args(["map", "create", stats.to_str().unwrap(), "type", "percpu_array"])
            .args(["key", "4", "value", "8", "entries", &slots, "name", names::STATS])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let err = check_map_shapes(OBJECT, &pins).unwrap_err().to_string();
        assert!(
            err.contains("pinned map STATS") && err.contains(&format!("{slots} entries")) && err.contains("new name"),
            "{err}"
        );
    }

    /// A pod of the node that took a leaving pod's IP (or netns) while it
    /// was still captured keeps its entries and its sk_lookup link when the
    /// leaving one goes: else its inbound would bypass the mesh until
    /// enrolled again. Likewise a sweep, once this agent's programs are
    /// active, leaves the entries of pods another agent (a successor
    /// starting beside it) enrolled.
    #[test]
    fn a_pod_leaving_removes_only_the_entries_still_its_own() {
        static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));
        let scratch = TestPins::new("owner");
        let name = scratch.0.file_name().unwrap().to_str().unwrap();
        let cgroup = probe::cgroup2_mount().expect("cgroup v2");
        let (mut capture, _orig) = Capture::start(
            OBJECT,
            scratch.0.parent().unwrap(),
            name,
            &cgroup,
            false,
            Default::default(),
        )
        .unwrap();
        let (ip, other): (IpAddr, IpAddr) = ("10.77.0.9".parse().unwrap(), "fd00:77::9".parse().unwrap());
        let (key, other_key) = (to_ip6(ip), to_ip6(other));
        let listener = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (old, new) = (listener(), listener());
        let inbound_has = |m: &Maps, k: Ip6| m.inbound.keys().any(|x| x.is_ok_and(|x| x == k));
        // A pinned map stands in for the netns's sk_lookup link.
        let link = |c: &Capture, cookie: u64| {
            let pin = c.pins.sk_lookup_link(cookie);
            let out = std::process::Command::new("bpftool")
                .args(["map", "create", pin.to_str().unwrap(), "type", "array"])
                .args(["key", "4", "value", "4", "entries", "1", "name", "stand_in"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            pin
        };

        capture.maps.enroll(7, 1001, &[ip, other], &old, 0).unwrap();
        // The new pod takes `ip` (not `other`) and, say, the same netns.
        capture.maps.enroll(8, 1001, &[ip], &new, 0).unwrap();
        let pin = link(&capture, 1001);
        capture.unenroll(7, 1001, &[ip, other]);
        let maps = &capture.maps;
        assert_eq!(maps.pod_ips.get(&key, 0).unwrap(), 8, "the new pod's IP entry went");
        assert!(inbound_has(maps, key), "the new pod's listener went");
        assert_eq!(
            maps.enrolled.get(&1001, 0).unwrap().pod_id,
            8,
            "the new pod's netns entry went"
        );
        assert!(pin.exists(), "the new pod's sk_lookup link went");
        // What was still the old pod's is gone.
        assert!(maps.pod_ips.get(&other_key, 0).is_err() && !inbound_has(maps, other_key));
        capture.unenroll(8, 1001, &[ip]);
        let maps = &capture.maps;
        assert!(maps.pod_ips.get(&key, 0).is_err() && !inbound_has(maps, key));
        assert!(maps.enrolled.get(&1001, 0).is_err() && !pin.exists());

        // Sweeps: pod 9 is ours, pod 10 another agent's; neither is wanted.
        // Once our programs are active, only ours go.
        let ours = |id: u32| id == 9;
        let (none, no_ips) = (HashSet::new(), HashSet::new());
        capture.maps.enroll(9, 1009, &[ip], &old, 0).unwrap();
        capture.maps.enroll(10, 1010, &[other], &new, 0).unwrap();
        let (ours_pin, theirs_pin) = (link(&capture, 1009), link(&capture, 1010));
        capture.retain_entries(&none, &no_ips, Some(&ours));
        let maps = &capture.maps;
        assert!(maps.pod_ips.get(&key, 0).is_err() && !inbound_has(maps, key) && !ours_pin.exists());
        assert!(maps.enrolled.get(&1009, 0).is_err());
        assert_eq!(
            maps.pod_ips.get(&other_key, 0).unwrap(),
            10,
            "another agent's pod was swept"
        );
        assert!(inbound_has(maps, other_key) && theirs_pin.exists());
        assert_eq!(maps.enrolled.get(&1010, 0).unwrap().pod_id, 10);
        // Before (the first complete pass), what a previous agent left goes
        // too.
        capture.retain_entries(&none, &no_ips, None);
        let maps = &capture.maps;
        assert!(maps.pod_ips.get(&other_key, 0).is_err() && !inbound_has(maps, other_key));
        assert!(maps.enrolled.get(&1010, 0).is_err() && !theirs_pin.exists());
    }

    #[test]
    fn map_families_are_the_name_and_its_versions() {
        assert!(in_family("STATS", "STATS") && in_family("STATS_V2", "STATS") && in_family("STATS_V10", "STATS"));
        assert!(!in_family("STATS_V", "STATS") && !in_family("STATSX", "STATS") && !in_family("STATS_Vx", "STATS"));
    }

    #[test]
    fn other_layout_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("pins-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("agent/v0")).unwrap();
        let err = Pins::new(&dir, "agent").prepare().unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("v0") && err.contains("agent cleanup"), "{err}");
    }
}
