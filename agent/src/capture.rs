//! Owner of the capture eBPF programs and maps (see agent-ebpf).
//!
//! Pinned layout, all under one bpffs directory:
//! ```text
//! <bpffs>/<pin-name>/v<PIN_LAYOUT_VERSION>/maps/<MAP>          every map
//! <bpffs>/<pin-name>/v<PIN_LAYOUT_VERSION>/links/cg_<program>  cgroup attachments
//! <bpffs>/<pin-name>/v<PIN_LAYOUT_VERSION>/links/sklookup_<netns cookie>
//! ```
//! Links are pinned and the agent keeps no fd to them, so capture (and its
//! fail-closed behaviour) outlives the agent, and removing a pin detaches at
//! once. A restarted agent reuses maps and links it finds.
pub mod probe;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use agent_common::{
    maps as names, programs as progs, stats, ConnKey, Ip6, OrigDst, PodEntry, SockKey, PIN_LAYOUT_VERSION,
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
    #[error("pins of an incompatible layout ({found}) exist under {root}; this agent uses v{PIN_LAYOUT_VERSION}: stop the other agent and run `agent cleanup` first", root = root.display())]
    Layout { root: PathBuf, found: String },
    #[error("no capture pins under {0}: is an agent with this --bpffs/--pin-name running or has it run on this node?")]
    NoPins(String),
    #[error("eBPF {what}: {message}")]
    Bpf { what: String, message: String },
    #[error("pod {pod}: {message}")]
    Pod { pod: String, message: String },
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
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

macro_rules! bpf {
    ($what:expr, $e:expr) => {
        $e.map_err(|e| bpf_err($what)(chain(&e)))
    };
}

/// The pin directory of one agent instance.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(bpffs: &Path, pin_name: &str) -> Self {
        let root = bpffs.join(pin_name);
        let dir = root.join(format!("v{PIN_LAYOUT_VERSION}"));
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

    /// Creates the layout, refusing to mix with another layout version.
    fn prepare(&self) -> Result<(), CaptureError> {
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            let ours = format!("v{PIN_LAYOUT_VERSION}");
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

/// The maps the proxy uses per connection: CONN_ORIG (read) and LOCAL_FWD.
pub struct ProxyMaps(
    HashMap<MapData, ConnKey, OrigDst>,
    std::sync::Mutex<HashMap<MapData, SockKey, u32>>,
);

impl ProxyMaps {
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
    /// Opens every map through `open` (from a loaded object or from pins).
    fn open(mut open: impl FnMut(&str) -> Result<Map, CaptureError>) -> Result<(Self, ProxyMaps), CaptureError> {
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
        Ok((
            maps,
            ProxyMaps(
                typed!(names::CONN_ORIG),
                std::sync::Mutex::new(typed!(names::LOCAL_FWD)),
            ),
        ))
    }

    /// Opens the maps an agent pinned, without loading any program.
    pub fn from_pins(pins: &Pins) -> Result<(Self, ProxyMaps), CaptureError> {
        if !pins.maps().is_dir() {
            return Err(CaptureError::NoPins(pins.dir.display().to_string()));
        }
        Self::open(|name| {
            let data = bpf!(format!("pinned map {name}"), MapData::from_pin(pins.maps().join(name)))?;
            bpf!(format!("pinned map {name}"), Map::from_map_data(data))
        })
    }

    fn enroll(
        &mut self,
        pod_id: u32,
        netns_cookie: u64,
        ips: &[IpAddr],
        inbound: &impl AsRawFd,
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
            self.enrolled.insert(netns_cookie, PodEntry { pod_id, flags: 0 }, 0)
        )
    }

    /// Stops capturing a pod: outbound first, then inbound.
    fn unenroll(&mut self, netns_cookie: u64, ips: &[IpAddr]) {
        let _ = self.enrolled.remove(&netns_cookie);
        for ip in ips {
            let key = to_ip6(*ip);
            let _ = self.pod_ips.remove(&key);
            let _ = self.inbound.remove(&key);
        }
    }

    /// Makes the settings maps equal to `s`.
    fn apply_settings(&mut self, s: &CaptureSettings) -> Result<(), CaptureError> {
        let ports: HashSet<u16> = s.exclude_ports.iter().copied().collect();
        prune(&mut self.excl_ports, |p| ports.contains(p));
        for p in &ports {
            bpf!("EXCL_PORTS insert", self.excl_ports.insert(p, 1, 0))?;
        }

        let addrs: HashSet<Ip6> = s.node_addresses.iter().map(|a| to_ip6(*a)).collect();
        prune(&mut self.node_addrs, |a| addrs.contains(a));
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
    fn retain(&mut self, cookies: &HashSet<u64>, ips: &HashSet<Ip6>) {
        prune(&mut self.enrolled, |c| cookies.contains(c));
        for ip in prune(&mut self.pod_ips, |i| ips.contains(i)) {
            let _ = self.inbound.remove(&ip);
        }
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        (0..stats::COUNT)
            .map(|i| {
                let sum = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (stats::NAMES[i as usize], sum)
            })
            .collect()
    }
}

/// Removes every key `keep` rejects; returns the removed keys.
fn prune<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, keep: impl Fn(&K) -> bool) -> Vec<K> {
    let stale: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| !keep(k)).collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    stale
}

/// The loaded and attached capture programs of one agent.
pub struct Capture {
    ebpf: Ebpf,
    pins: Pins,
    maps: Maps,
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
    pub stats: BTreeMap<&'static str, u64>,
}

impl Capture {
    /// Probes the kernel, loads the programs (reusing pinned maps) and
    /// attaches the cgroup programs at `cgroup_parent` unless a previous
    /// agent's pinned links already do.
    pub fn start(
        object: &[u8],
        bpffs: &Path,
        pin_name: &str,
        cgroup_parent: &Path,
    ) -> Result<(Self, ProxyMaps), CaptureError> {
        probe::ensure_bpffs(bpffs)?;
        probe::check_cgroup2(cgroup_parent)?;
        probe::check_program_types()?;
        if object.is_empty() {
            return Err(CaptureError::NoObject);
        }
        let pins = Pins::new(bpffs, pin_name);
        pins.prepare()?;
        let mut ebpf = bpf!(
            "load",
            EbpfLoader::new().default_map_pin_directory(pins.maps()).load(object)
        )?;
        let cgroup = std::fs::File::open(cgroup_parent).map_err(|source| CaptureError::Io {
            what: "cannot open cgroup",
            path: cgroup_parent.to_owned(),
            source,
        })?;
        for name in CGROUP_SOCK_ADDR {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            bpf!(format!("load {name}"), prog.load())?;
            let pin = pins.links().join(format!("cg_{name}"));
            if !link_alive(&pin) {
                let id = bpf!(format!("attach {name}"), prog.attach(&cgroup, LINK_MODE))?;
                pin_link(bpf!(name, prog.take_link(id))?, &pin)?;
            }
        }
        let prog: &mut SockOps = program(&mut ebpf, progs::SOCKOPS)?;
        bpf!("load sockops", prog.load())?;
        let pin = pins.links().join(format!("cg_{}", progs::SOCKOPS));
        if !link_alive(&pin) {
            let id = bpf!("attach sockops", prog.attach(&cgroup, LINK_MODE))?;
            pin_link(bpf!("sockops", prog.take_link(id))?, &pin)?;
        }
        let prog: &mut SkLookup = program(&mut ebpf, progs::SK_LOOKUP)?;
        bpf!("load sk_lookup", prog.load())?;

        let (maps, orig) = Maps::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| bpf_err(format!("map {name}"))("missing from object".into()))
        })?;
        Ok((Self { ebpf, pins, maps }, orig))
    }

    /// Captures a pod: its inbound listener goes into INBOUND for each IP,
    /// sk_lookup is attached to its netns (once; the link is pinned), and its
    /// netns is marked enrolled for the outbound hooks.
    pub fn enroll(
        &mut self,
        pod_id: u32,
        netns: &Netns,
        netns_cookie: u64,
        ips: &[IpAddr],
        inbound: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let pin = self.pins.sk_lookup_link(netns_cookie);
        if !link_alive(&pin) {
            let prog: &mut SkLookup = program(&mut self.ebpf, progs::SK_LOOKUP)?;
            let id = bpf!("attach sk_lookup", prog.attach(netns.file()))?;
            pin_link(bpf!("sk_lookup", prog.take_link(id))?, &pin)?;
        }
        self.maps.enroll(pod_id, netns_cookie, ips, inbound)
    }

    /// Stops capturing a pod; its traffic goes direct again at once.
    pub fn unenroll(&mut self, netns_cookie: u64, ips: &[IpAddr]) {
        unenroll_pinned(&self.pins, &mut self.maps, netns_cookie, ips)
    }

    pub fn apply_settings(&mut self, s: &CaptureSettings) -> Result<(), CaptureError> {
        self.maps.apply_settings(s)
    }

    /// Removes every enrolment (maps and sk_lookup links) not in the desired sets.
    pub fn retain(&mut self, cookies: &HashSet<u64>, ips: &[IpAddr]) {
        let ips: HashSet<Ip6> = ips.iter().map(|i| to_ip6(*i)).collect();
        self.maps.retain(cookies, &ips);
        for (cookie, path) in sk_lookup_links(&self.pins) {
            if !cookies.contains(&cookie) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
        self.maps.stats()
    }
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

fn link_alive(pin: &Path) -> bool {
    match aya::programs::links::PinnedLink::from_pin(pin) {
        Ok(_) => true,
        Err(_) => {
            let _ = std::fs::remove_file(pin);
            false
        }
    }
}

fn pin_link<L>(link: L, pin: &Path) -> Result<(), CaptureError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::error::Error,
{
    let fd_link = bpf!("link", FdLink::try_from(link))?;
    // Dropping the pinned handle closes our fd: the pin alone keeps the link.
    bpf!(format!("pin {}", pin.display()), fd_link.pin(pin))?;
    Ok(())
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

fn unenroll_pinned(pins: &Pins, maps: &mut Maps, netns_cookie: u64, ips: &[IpAddr]) {
    maps.unenroll(netns_cookie, ips);
    let _ = std::fs::remove_file(pins.sk_lookup_link(netns_cookie));
}

/// `agent unenroll`: stop capturing one pod using only the pins (works with
/// or without a running agent).
pub fn unenroll_with_pins(bpffs: &Path, pin_name: &str, netns: &Netns, ips: &[IpAddr]) -> Result<(), CaptureError> {
    let pins = Pins::new(bpffs, pin_name);
    let (mut maps, _) = Maps::from_pins(&pins)?;
    unenroll_pinned(&pins, &mut maps, netns.cookie()?, ips);
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
    let (maps, _) = Maps::from_pins(&pins)?;
    let mut links: Vec<String> = std::fs::read_dir(pins.links())
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    links.sort();
    Ok(Status {
        pin_dir: pins.dir.clone(),
        enrolled_netns: maps.enrolled.keys().filter_map(Result::ok).collect(),
        pod_ips: maps.pod_ips.keys().filter_map(Result::ok).map(from_ip6).collect(),
        inbound_listeners: maps.inbound.keys().filter_map(Result::ok).map(from_ip6).collect(),
        node_addresses: maps.node_addrs.keys().filter_map(Result::ok).map(from_ip6).collect(),
        exclude_ports: maps.excl_ports.keys().filter_map(Result::ok).collect(),
        links,
        stats: maps.stats(),
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
    fn other_layout_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("pins-layout-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("agent/v0")).unwrap();
        let err = Pins::new(&dir, "agent").prepare().unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("v0") && err.contains("agent cleanup"), "{err}");
    }
}
