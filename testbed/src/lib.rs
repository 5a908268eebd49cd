//! Throwaway local "clusters" built from real kernel objects: network
//! namespaces, veth pairs, bridges and cgroup v2 directories.
//!
//! Topology of a cluster with prefix `P` (all addresses exist only inside
//! the cluster's own namespaces):
//!
//! ```text
//!  netns P-wire:   br0 ── n1 ─┐   ── n2 ─┐ ...
//!                             │          │      (veth pairs)
//!  netns P-node1:  eth0 10.99.0.1/24 fd00:99::1/64
//!                  br0  10.1.1.1/24  fd00:1:1::1/64 ── v1, v2, ...
//!                                                       │ (veth pairs)
//!  netns P-pod-a:  eth0 10.1.1.11/24 fd00:1:1::11/64, default via 10.1.1.1 / fd00:1:1::1
//! ```
//!
//! cgroups: `<cg2>/P/` (cluster), `<cg2>/P/<node>/` (pod parent, where the
//! mesh agent attaches its cgroup programs), `<cg2>/P/<node>/<pod>/` and
//! `<cg2>/P/<node>/agent/`.
//!
//! Everything is removed by [`Cluster::teardown`] / `Drop` (also on panic),
//! by [`teardown_all`] (for signal handlers of demos), and leftovers of killed
//! processes by [`sweep_stale`].

pub mod apiserver;
pub mod args;
pub mod connload;
pub mod echo;
pub mod idle;
pub mod kube;
pub mod mesh;
mod names;
pub mod procfs;
pub mod signals;
pub mod soakload;
pub mod sockperf;
mod sys;
pub mod waypoint;
pub mod wire;

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use names::{MAX_PREFIX_LEN, PREFIX_MARKER};
pub use sys::{cgroup2_mount, in_netns, NETNS_RUN_DIR};

/// Name of the bridge in the wire netns and in every node netns.
pub const BRIDGE: &str = "br0";
/// Name of the namespace-side interface of nodes and pods.
pub const ETH: &str = "eth0";
/// Name of the agent cgroup below each node's pod parent.
pub const AGENT_CGROUP: &str = "agent";
/// How long `create` waits for IPv6 addresses to leave the tentative state.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
}

/// One node and the names of its pods (node and pod names must be unique
/// across the whole cluster; `wire` and `agent` are reserved).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub pods: Vec<String>,
}

impl ClusterSpec {
    pub fn new(nodes: Vec<NodeSpec>) -> Self {
        Self { nodes }
    }
}

impl NodeSpec {
    pub fn new(name: &str, pods: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            pods: pods.iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// A node of a created cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// 1-based position in the spec.
    pub index: u8,
    pub netns: String,
    pub netns_path: PathBuf,
    /// The pod parent cgroup (`<cg2>/<prefix>/<node>`).
    pub cgroup: PathBuf,
    /// `<cg2>/<prefix>/<node>/agent`, where [`Node::command`] puts processes.
    pub agent_cgroup: PathBuf,
    /// Address on the node's `eth0` (the link between nodes): 10.99.0.<i>.
    pub link_ip4: Ipv4Addr,
    /// fd00:99::<i>. In IPv6 addresses the numbers are written with the
    /// same decimal digits as in IPv4 (node 12 is fd00:99::12, pod 11 is ::11).
    pub link_ip6: Ipv6Addr,
    /// Address of the node's `br0`, the pods' gateway: 10.1.<i>.1.
    pub gw_ip4: Ipv4Addr,
    /// fd00:1:<i>::1.
    pub gw_ip6: Ipv6Addr,
    /// Name of the veth peer of this node's `eth0` inside the wire netns.
    pub wire_veth: String,
}

/// A pod of a created cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// Name of the node the pod runs on.
    pub node: String,
    /// 1-based position among the pods of its node.
    pub index: u8,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    /// 10.1.<node>.<10+index>.
    pub ip4: Ipv4Addr,
    /// fd00:1:<node>::<10+index>, digits as in IPv4 (10.1.1.11 ↔ fd00:1:1::11).
    pub ip6: Ipv6Addr,
    /// Name of the pod's veth peer inside the node netns (attached to `br0`).
    pub host_veth: String,
}

// About the commands of `Node` and `Pod`: the netns file and the cgroup's
// `cgroup.procs` are opened when the `Command` is built (before fork); in the
// child, `pre_exec` only writes "0" to cgroup.procs (moving itself) and calls
// setns(CLONE_NEWNET). The mount namespace stays the host's, so bpffs and the
// cgroup2 hierarchy are visible (unlike with `ip netns exec`). The `Command`
// holds the two descriptors until it is dropped (which keeps the netns
// alive meanwhile); spawned programs do not inherit them (O_CLOEXEC). For
// tokio use `tokio::process::Command::from(cmd)`.

impl Node {
    /// Command that runs in this node's netns, host mount namespace, inside
    /// `agent_cgroup`. If the netns or cgroup cannot be opened, `spawn` fails
    /// (use [`Node::try_command`] to get the error with its path).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(program.as_ref(), &self.netns_path, &self.agent_cgroup)
    }

    /// Like [`Node::command`], but reports a missing netns/cgroup right away.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        try_command_in(program.as_ref(), &self.netns_path, &self.agent_cgroup)
    }

    /// A cgroup beside this node's pod parent (`<cluster>/<node>-outside`),
    /// removed with the cluster's: an agent there is not seen by the cgroup
    /// programs it attaches to the pod parent.
    pub fn outside_cgroup(&self) -> PathBuf {
        let name = format!(
            "{}-outside",
            self.cgroup.file_name().unwrap_or_default().to_string_lossy()
        );
        self.cgroup.with_file_name(name)
    }

    /// Like [`Node::try_command`], in another cgroup (created if missing).
    pub fn try_command_in(&self, program: impl AsRef<OsStr>, cgroup: &Path) -> Result<Command> {
        try_command_created(program.as_ref(), &self.netns_path, cgroup)
    }
}

impl Pod {
    /// Command that runs in the pod's netns (setns in pre_exec), host mount
    /// namespace, inside the pod's cgroup. If the netns or cgroup cannot be
    /// opened, `spawn` fails (use [`Pod::try_command`] to get the error with
    /// its path).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(program.as_ref(), &self.netns_path, &self.cgroup)
    }

    /// Like [`Pod::command`], but reports a missing netns/cgroup right away.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        try_command_in(program.as_ref(), &self.netns_path, &self.cgroup)
    }

    /// Like [`Pod::try_command`], in another cgroup (created if missing):
    /// a pod laid out as a kubelet would ([`kube::container_cgroup`]).
    pub fn try_command_in(&self, program: impl AsRef<OsStr>, cgroup: &Path) -> Result<Command> {
        try_command_created(program.as_ref(), &self.netns_path, cgroup)
    }
}

/// [`try_command_in`], creating `cgroup` first if it is missing.
fn try_command_created(program: &OsStr, netns_path: &Path, cgroup: &Path) -> Result<Command> {
    fs::create_dir_all(cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    try_command_in(program, netns_path, cgroup)
}

fn try_command_in(program: &OsStr, netns_path: &Path, cgroup: &Path) -> Result<Command> {
    // Both files are opened here, before fork; the child only writes/setns.
    // They are O_CLOEXEC (std default), so the exec'd program does not keep them.
    let netns = File::open(netns_path).with_context(|| format!("opening netns {}", netns_path.display()))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {} for writing", procs_path.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure only calls async-signal-safe functions (write, setns)
    // on descriptors opened before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process (the child) into the cgroup.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn command_in(program: &OsStr, netns_path: &Path, cgroup: &Path) -> Command {
    match try_command_in(program, netns_path, cgroup) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("testbed: {e:#}; spawning {} will fail", program.to_string_lossy());
            let errno = e
                .chain()
                .find_map(|c| c.downcast_ref::<std::io::Error>())
                .and_then(|io| io.raw_os_error())
                .unwrap_or(libc::ENOENT);
            let mut cmd = Command::new(program);
            // SAFETY: builds an io::Error from a raw errno; no allocation.
            unsafe {
                cmd.pre_exec(move || Err(std::io::Error::from_raw_os_error(errno)));
            }
            cmd
        }
    }
}

/// Kernel objects owned by one cluster; shared with the process-wide registry.
#[derive(Debug, Default)]
struct Resources {
    prefix: String,
    /// `<cg2>/<prefix>` once claimed.
    cgroup_root: Option<PathBuf>,
    /// Netns names in creation order.
    netns: Vec<String>,
    bpffs: Vec<PathBuf>,
    /// `<tmp>/<prefix>`: logs and configs of the cluster's users.
    scratch: Option<PathBuf>,
    /// Set by teardown: creation steps that run afterwards fail.
    closed: bool,
}

type Shared = Arc<Mutex<Resources>>;

static REGISTRY: Mutex<Vec<Shared>> = Mutex::new(Vec::new());
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(r: &Shared) {
    lock(&REGISTRY).push(r.clone());
}

fn unregister(r: &Shared) {
    lock(&REGISTRY).retain(|x| !Arc::ptr_eq(x, r));
}

/// Tear down everything recorded in `res`; idempotent, keeps going after
/// errors, and keeps whatever could not be removed for a later retry.
fn teardown_resources(res: &mut Resources) -> Result<()> {
    res.closed = true;
    let mut errors = Vec::new();
    // 1. cgroups: kill processes, wait, rmdir (deepest first).
    if let Some(root) = res.cgroup_root.clone() {
        match sys::remove_cgroup_tree(&root) {
            Ok(()) => res.cgroup_root = None,
            Err(e) => errors.push(format!("cgroups: {e:#}")),
        }
    }
    // 2. netns (veths go with them), newest first.
    let mut kept = Vec::new();
    for ns in res.netns.drain(..).rev() {
        if let Err(e) = sys::netns_del(&ns) {
            errors.push(format!("{e:#}"));
            kept.push(ns);
        }
    }
    kept.reverse();
    res.netns = kept;
    // 3. scratch files (kept for debugging with MESH_KEEP_LOGS=1).
    if let Some(dir) = res.scratch.take() {
        if std::env::var_os("MESH_KEEP_LOGS").is_some() {
            eprintln!("testbed: MESH_KEEP_LOGS is set: keeping {}", dir.display());
        } else if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("removing {}: {e}", dir.display()));
                res.scratch = Some(dir);
            }
        }
    }
    // 4. bpffs pins.
    res.bpffs.retain(|p| match sys::remove_bpffs_path(p) {
        Ok(()) => false,
        Err(e) => {
            errors.push(format!("{e:#}"));
            true
        }
    });
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown of cluster {} failed: {}", res.prefix, errors.join("; "))
    }
}

fn scratch_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(prefix)
}

/// Tear down every live cluster of this process (e.g. from a Ctrl-C/SIGTERM
/// handler thread of a demo; do not call it from an async-signal handler).
/// Clusters stay usable as values but their kernel objects are gone; their
/// later `Drop` is a no-op.
pub fn teardown_all() -> Result<()> {
    let all: Vec<Shared> = lock(&REGISTRY).clone();
    let mut errors = Vec::new();
    for r in all {
        let result = teardown_resources(&mut lock(&r));
        match result {
            Ok(()) => unregister(&r),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("\n"))
    }
}

/// Remove leftovers of earlier runs that were killed: cgroups, netns and
/// top-level bpffs entries whose name carries our marker and the pid of a
/// process that is no longer alive. Safe to call at any time (objects of
/// live processes, including this one, are never touched).
///
/// To avoid touching foreign objects that merely look like ours, the cgroups
/// and netns of a prefix are only removed if the prefix's cluster cgroup
/// (`<cg2>/<prefix>`) or wire netns (`<prefix>-wire`) still exists: the
/// cluster cgroup is made before anything else, and the wire netns is the
/// last netns a teardown removes, so one of them outlives any half-made or
/// half-removed cluster (registered bpffs paths aside, see below).
pub fn sweep_stale() -> Result<()> {
    let mut errors = Vec::new();
    let cg2 = cgroup2_mount()?;
    let netns = sys::list_netns()?;
    let dead_prefix = |name: &str| -> Option<String> {
        let (pid, prefix) = names::parse_prefix(name)?;
        (!sys::pid_alive(pid)).then(|| prefix.to_string())
    };
    let is_ours = |prefix: &str| cg2.join(prefix).is_dir() || netns.iter().any(|n| *n == format!("{prefix}-wire"));
    // cgroups first so that processes die before their netns goes.
    let mut stale: Vec<String> = Vec::new();
    let rd = fs::read_dir(&cg2).with_context(|| format!("listing {}", cg2.display()))?;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if dead_prefix(&name).is_some_and(|p| p == name) && ent.file_type().is_ok_and(|t| t.is_dir()) {
            stale.push(name);
        }
    }
    for name in &netns {
        if let Some(p) = dead_prefix(name) {
            if !stale.contains(&p) && is_ours(&p) {
                stale.push(p);
            }
        }
    }
    for prefix in &stale {
        let _ = fs::remove_dir_all(scratch_path(prefix));
        let root = cg2.join(prefix);
        if sys::exists(&root) {
            tracing::info!(target: "testbed", "sweeping stale cgroup {}", root.display());
            if let Err(e) = sys::remove_cgroup_tree(&root) {
                errors.push(format!("{e:#}"));
            }
        }
    }
    // Netns: pods and nodes before the wire (the wire is the evidence).
    let dashes: Vec<String> = stale.iter().map(|p| format!("{p}-")).collect();
    let mut doomed: Vec<&String> = netns
        .iter()
        .filter(|n| dashes.iter().any(|d| n.starts_with(d)))
        .collect();
    doomed.sort_by_key(|n| n.ends_with("-wire"));
    for name in doomed {
        tracing::info!(target: "testbed", "sweeping stale netns {name}");
        if let Err(e) = sys::netns_del(name) {
            errors.push(format!("{e:#}"));
        }
    }
    // bpffs: entries are created by callers (own_bpffs_path) and removed after
    // the netns, so only the name `<prefix>-...` (and being on bpffs) is left
    // to go by.
    match sys::bpffs_mounts() {
        Ok(mounts) => {
            for m in mounts {
                let Ok(rd) = fs::read_dir(&m) else { continue };
                for ent in rd.flatten() {
                    let name = ent.file_name().to_string_lossy().into_owned();
                    if dead_prefix(&name).is_some_and(|p| name.len() > p.len()) {
                        tracing::info!(target: "testbed", "sweeping stale bpffs entry {}", ent.path().display());
                        if let Err(e) = sys::remove_bpffs_path(&ent.path()) {
                            errors.push(format!("{e:#}"));
                        }
                    }
                }
            }
        }
        Err(e) => errors.push(format!("{e:#}")),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("sweep_stale: {}", errors.join("; "))
    }
}

/// A running throwaway cluster; dropped = torn down.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    wire_netns: String,
    cgroup_root: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    res: Shared,
}

impl Cluster {
    /// Build a cluster. `label` is a short human tag (e.g. test name); the
    /// prefix is made unique from it + pid + a counter, and is at most
    /// [`MAX_PREFIX_LEN`] characters. On error everything made so far is
    /// torn down before returning.
    pub fn create(label: &str, spec: &ClusterSpec) -> Result<Cluster> {
        names::validate_spec(spec)?;
        let cg2 = cgroup2_mount()?;
        let res: Shared = Arc::new(Mutex::new(Resources::default()));
        register(&res);
        let built = build(&cg2, label, spec, &res);
        match built {
            Ok(c) => Ok(c),
            Err(e) => {
                let mut guard = lock(&res);
                let prefix = guard.prefix.clone();
                let td = teardown_resources(&mut guard);
                drop(guard);
                let what = if prefix.is_empty() {
                    format!("creating cluster {label:?}")
                } else {
                    format!("creating cluster {prefix} ({label:?})")
                };
                match td {
                    Ok(()) => {
                        unregister(&res);
                        Err(e.context(what))
                    }
                    Err(te) => Err(e.context(format!("{what}; cleanup after the failure also failed: {te:#}"))),
                }
            }
        }
    }

    /// Unique prefix of every object name of this cluster.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`; panics if there is none.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| {
            panic!(
                "testbed cluster {}: no node named {name:?} (nodes: {:?})",
                self.prefix,
                self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>()
            )
        })
    }

    /// All pods, in spec order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter()
    }

    /// Pods of one node, in spec order.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// The pod called `name`; panics if there is none.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| {
            panic!(
                "testbed cluster {}: no pod named {name:?} (pods: {:?})",
                self.prefix,
                self.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
            )
        })
    }

    /// Netns name of the wire (its `br0` connects all nodes; tcpdump there).
    pub fn wire_netns(&self) -> &str {
        &self.wire_netns
    }

    /// The control plane's address on the wire (reachable from every node
    /// and pod): 10.99.0.254. Added to the wire's bridge on first use, with
    /// routes back to each node's pods (a waypoint pod watches the API).
    pub fn control_plane_ip(&self) -> Result<Ipv4Addr> {
        let ip = Ipv4Addr::new(10, 99, 0, 254);
        let shown = sys::ip(&["-n", &self.wire_netns, "-4", "addr", "show", "dev", BRIDGE])?;
        if !shown.contains(&format!("{ip}/")) {
            sys::ip(&[
                "-n",
                &self.wire_netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                BRIDGE,
            ])?;
            for n in &self.nodes {
                let pods = format!("10.1.{}.0/24", n.index);
                sys::ip(&[
                    "-n",
                    &self.wire_netns,
                    "route",
                    "replace",
                    &pods,
                    "via",
                    &n.link_ip4.to_string(),
                ])?;
            }
        }
        Ok(ip)
    }

    /// `<cg2>/<prefix>`.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Register a path under bpffs (e.g. /sys/fs/bpf/<prefix>-node1) to be
    /// removed recursively on teardown. Teardown refuses (with an error) to
    /// remove a path that is not on a bpf file system.
    pub fn own_bpffs_path(&self, p: PathBuf) {
        let mut r = lock(&self.res);
        if !r.bpffs.contains(&p) {
            r.bpffs.push(p);
        }
    }

    /// A directory for this cluster's logs and configuration files
    /// (`<tmp>/<prefix>`), created on first use and removed on teardown
    /// (and by `sweep_stale` after a crash); kept when MESH_KEEP_LOGS is set.
    pub fn scratch_dir(&self) -> Result<PathBuf> {
        let dir = scratch_path(&self.prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        lock(&self.res).scratch = Some(dir.clone());
        Ok(dir)
    }

    /// A network namespace with only `lo` (up), `<prefix>-<name>`, torn
    /// down with the cluster: for benchmarks that need many pods'
    /// namespaces but not their network (more than a node's 244 pods).
    pub fn add_bare_netns(&self, name: &str) -> Result<PathBuf> {
        names::validate_name("netns", name)?;
        add_netns(&self.res, &format!("{}-{name}", self.prefix))
    }

    /// Explicit teardown returning errors; `Drop` calls it and logs errors to
    /// stderr. Idempotent: a second call only retries what failed.
    pub fn teardown(&mut self) -> Result<()> {
        let result = teardown_resources(&mut lock(&self.res));
        if result.is_ok() {
            unregister(&self.res);
        }
        result
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("testbed: {e:#}");
        }
    }
}

/// Record a netns as owned before it is created, then create it.
fn add_netns(res: &Shared, name: &str) -> Result<PathBuf> {
    {
        let mut r = lock(res);
        if r.closed {
            bail!("cluster {} was torn down while being created", r.prefix);
        }
        r.netns.push(name.to_string());
    }
    sys::netns_add(name)?;
    let path = sys::netns_path(name);
    // Basics for every namespace: lo up, no IPv6 DAD (also for link-locals).
    sys::sysctls_in(
        &path,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ],
    )?;
    sys::ip_n(name, &["link", "set", "lo", "up"])?;
    Ok(path)
}

fn mkdir_cgroup(path: &Path) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("mkdir {}", path.display()))
}

fn add_bridge(ns: &str) -> Result<()> {
    sys::ip_n(
        ns,
        &[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ],
    )?;
    sys::ip_n(ns, &["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Claim a unique prefix by creating `<cg2>/<prefix>` (mkdir is atomic).
fn claim_prefix(cg2: &Path, label: &str, res: &Shared) -> Result<(String, PathBuf)> {
    let pid = std::process::id();
    let existing_netns = sys::list_netns()?;
    for _ in 0..names::COUNTER_SPACE {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = names::make_prefix(pid, n, label);
        let dash = format!("{prefix}-");
        if existing_netns.iter().any(|ns| ns.starts_with(&dash)) {
            continue; // leftover of a dead process that had our pid
        }
        let root = cg2.join(&prefix);
        match fs::create_dir(&root) {
            Ok(()) => {
                let mut r = lock(res);
                r.prefix = prefix.clone();
                r.cgroup_root = Some(root.clone());
                return Ok((prefix, root));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("mkdir {}", root.display())),
        }
    }
    Err(anyhow!("no free cluster prefix for pid {pid} and label {label:?}"))
}

#[cfg(test)]
thread_local! {
    /// Test hook: make `build` fail at the named step on this thread.
    static FAIL_AT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
    /// Test hook: prefix of the last cluster `build` started on this thread.
    static LAST_PREFIX: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

#[inline]
fn fail_point(_step: &'static str) -> Result<()> {
    #[cfg(test)]
    if FAIL_AT.with(|f| f.get()) == Some(_step) {
        bail!("injected failure at {_step}");
    }
    Ok(())
}

/// IPv6 groups carry the same decimal digits as the IPv4 octets, so that
/// 10.1.2.11 pairs with fd00:1:2::11 (0x11, not 0xb) and node 12 is fd00:99::12.
fn hexdec(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

fn build(cg2: &Path, label: &str, spec: &ClusterSpec, res: &Shared) -> Result<Cluster> {
    let started = Instant::now();
    let (prefix, cgroup_root) = claim_prefix(cg2, label, res)?;
    #[cfg(test)]
    LAST_PREFIX.with(|p| *p.borrow_mut() = prefix.clone());

    // Wire.
    let wire = format!("{prefix}-wire");
    add_netns(res, &wire)?;
    add_bridge(&wire)?;
    fail_point("wire")?;

    // Nodes.
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for (i0, nspec) in spec.nodes.iter().enumerate() {
        let i = u8::try_from(i0 + 1).expect("validated");
        let ns = format!("{prefix}-{}", nspec.name);
        let ns_path = add_netns(res, &ns)?;
        sys::sysctls_in(
            &ns_path,
            &[("net/ipv4/ip_forward", "1"), ("net/ipv6/conf/all/forwarding", "1")],
        )?;
        let wire_veth = format!("n{i}");
        sys::ip_n(
            &ns,
            &[
                "link", "add", ETH, "type", "veth", "peer", "name", &wire_veth, "netns", &wire,
            ],
        )?;
        sys::ip_n(&wire, &["link", "set", &wire_veth, "master", BRIDGE, "up"])?;
        sys::ip_n(&ns, &["link", "set", ETH, "up"])?;
        let link_ip4 = Ipv4Addr::new(10, 99, 0, i);
        let link_ip6 = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, hexdec(i));
        sys::ip_n(&ns, &["addr", "add", &format!("{link_ip4}/24"), "dev", ETH])?;
        sys::ip_n(
            &ns,
            &["-6", "addr", "add", &format!("{link_ip6}/64"), "dev", ETH, "nodad"],
        )?;
        add_bridge(&ns)?;
        let gw_ip4 = Ipv4Addr::new(10, 1, i, 1);
        let gw_ip6 = Ipv6Addr::new(0xfd00, 1, hexdec(i), 0, 0, 0, 0, 1);
        sys::ip_n(&ns, &["addr", "add", &format!("{gw_ip4}/24"), "dev", BRIDGE])?;
        sys::ip_n(
            &ns,
            &["-6", "addr", "add", &format!("{gw_ip6}/64"), "dev", BRIDGE, "nodad"],
        )?;

        let node_cg = cgroup_root.join(&nspec.name);
        mkdir_cgroup(&node_cg)?;
        let agent_cg = node_cg.join(AGENT_CGROUP);
        mkdir_cgroup(&agent_cg)?;

        // Pods of this node.
        for (j0, pod_name) in nspec.pods.iter().enumerate() {
            let j = u8::try_from(j0 + 1).expect("validated");
            let pns = format!("{prefix}-{pod_name}");
            let pns_path = add_netns(res, &pns)?;
            let host_veth = format!("v{j}");
            sys::ip_n(
                &ns,
                &[
                    "link", "add", &host_veth, "type", "veth", "peer", "name", ETH, "netns", &pns,
                ],
            )?;
            sys::ip_n(&ns, &["link", "set", &host_veth, "master", BRIDGE, "up"])?;
            sys::ip_n(&pns, &["link", "set", ETH, "up"])?;
            let ip4 = Ipv4Addr::new(10, 1, i, 10 + j);
            let ip6 = Ipv6Addr::new(0xfd00, 1, hexdec(i), 0, 0, 0, 0, hexdec(10 + j));
            sys::ip_n(&pns, &["addr", "add", &format!("{ip4}/24"), "dev", ETH])?;
            sys::ip_n(&pns, &["-6", "addr", "add", &format!("{ip6}/64"), "dev", ETH, "nodad"])?;
            sys::ip_n(&pns, &["route", "add", "default", "via", &gw_ip4.to_string()])?;
            sys::ip_n(&pns, &["-6", "route", "add", "default", "via", &gw_ip6.to_string()])?;
            let pod_cg = node_cg.join(pod_name);
            mkdir_cgroup(&pod_cg)?;
            pods.push(Pod {
                name: pod_name.clone(),
                node: nspec.name.clone(),
                index: j,
                netns: pns,
                netns_path: pns_path,
                cgroup: pod_cg,
                ip4,
                ip6,
                host_veth,
            });
        }
        fail_point("node")?;

        nodes.push(Node {
            name: nspec.name.clone(),
            index: i,
            netns: ns,
            netns_path: ns_path,
            cgroup: node_cg,
            agent_cgroup: agent_cg,
            link_ip4,
            link_ip6,
            gw_ip4,
            gw_ip6,
            wire_veth,
        });
    }

    // Routes between nodes: pod subnets of node k via node k's link address.
    for n in &nodes {
        for k in nodes.iter().filter(|k| k.index != n.index) {
            sys::ip_n(
                &n.netns,
                &[
                    "route",
                    "add",
                    &format!("10.1.{}.0/24", k.index),
                    "via",
                    &k.link_ip4.to_string(),
                ],
            )?;
            sys::ip_n(
                &n.netns,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:1:{}::/64", k.index),
                    "via",
                    &k.link_ip6.to_string(),
                ],
            )?;
        }
    }
    fail_point("routes")?;

    // Readiness: no tentative IPv6 address anywhere.
    let all_ns: Vec<String> = lock(res).netns.clone();
    wait_no_tentative(&all_ns)?;

    tracing::debug!(target: "testbed", "cluster {prefix} ready in {:?}", started.elapsed());
    Ok(Cluster {
        prefix,
        wire_netns: wire,
        cgroup_root,
        nodes,
        pods,
        res: res.clone(),
    })
}

fn wait_no_tentative(netns: &[String]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<&String> = netns.iter().collect();
    loop {
        let mut still = Vec::new();
        let mut details = Vec::new();
        for ns in pending {
            let failed = sys::ip_n(ns, &["-6", "-o", "addr", "show", "dadfailed"])?;
            if !failed.trim().is_empty() {
                bail!(
                    "IPv6 duplicate address detection failed in netns {ns}: {}",
                    failed.trim()
                );
            }
            let out = sys::ip_n(ns, &["-6", "-o", "addr", "show", "tentative"])?;
            if !out.trim().is_empty() {
                details.push(format!("{ns}: {}", out.trim()));
                still.push(ns);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "IPv6 addresses still tentative after {READY_TIMEOUT:?}: {}",
                details.join("; ")
            );
        }
        pending = still;
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests;
