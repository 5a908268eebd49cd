//! Finding a pod on its node from its UID (for existing pods, when the
//! Kubernetes source enrolls them): its pod-level cgroup v2 directory and a
//! process whose network namespace is the pod's. The netns is proven by the
//! pod's IP on one of its interfaces, not taken from the first process: a
//! process may have joined the cgroup from elsewhere (`nsenter`, a debug
//! tool, a runtime helper) and sit in another pod's netns or the host's.
//!
//! Layouts handled (cgroup v2, any QoS class):
//! * cgroupfs driver: `kubepods/[burstable|besteffort/]pod<uid>/<container>/`
//! * systemd driver:  `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/
//!   {cri-containerd,crio,docker}-<id>.scope/`
//!
//! Pods on the host network share the node's netns and are never enrolled.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("no cgroup of pod {uid} under {root}: is it running on this node, and is --cgroup-root the node's cgroup v2 mount?", root = root.display())]
    NoCgroup { uid: String, root: PathBuf },
    #[error("pod {uid} has no running process in {cgroup} yet (sandbox still starting?)", cgroup = cgroup.display())]
    NoProcess { uid: String, cgroup: PathBuf },
    #[error("pod {uid} uses the host network namespace; host-network pods are never enrolled")]
    HostNetwork { uid: String },
    #[error("pod {uid}: none of the {namespaces} network namespaces of the {processes} processes inspected in {cgroup} holds the pod's IPs {ips:?} (processes joined from elsewhere?); not capturing a netns that may not be the pod's", cgroup = cgroup.display())]
    NoMatchingNetns {
        uid: String,
        cgroup: PathBuf,
        ips: Vec<IpAddr>,
        processes: usize,
        namespaces: usize,
    },
    #[error("pod {uid} has no IP yet: its network namespace cannot be verified")]
    NoIps { uid: String },
    #[error("{path}: {source}", path = path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Where a pod lives on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocation {
    /// The pod-level cgroup directory (capture applies to all its containers).
    pub cgroup: PathBuf,
    /// `<proc>/<pid>/ns/net` of one of its processes.
    pub netns: PathBuf,
    pub pid: u32,
}

/// The addresses of the network namespace at a path.
pub type NetnsAddresses = fn(&Path) -> Result<Vec<IpAddr>, String>;

/// Looks pods up under a cgroup v2 mount and a /proc (both fakeable for tests).
pub struct Discoverer {
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    /// The node's own network namespace (pods sharing it are host-network).
    pub host_netns: PathBuf,
    /// Reads a netns's addresses (entering it; a fake tree reads a file).
    pub netns_addresses: NetnsAddresses,
}

/// How deep under the cgroup root a pod directory may be (kubepods.slice/qos.slice/pod.slice).
const MAX_POD_DEPTH: usize = 4;
/// At most this many processes and cgroup directories of one pod are
/// inspected: a pod cannot make discovery walk without end.
const MAX_PROCESSES: usize = 256;
const MAX_CGROUP_DIRS: usize = 256;

impl Discoverer {
    pub fn new(cgroup_root: &Path) -> Self {
        Self {
            cgroup_root: cgroup_root.to_owned(),
            proc_root: PathBuf::from("/proc"),
            host_netns: PathBuf::from("/proc/1/ns/net"),
            netns_addresses: addresses_in,
        }
    }

    /// The pod's cgroup directory, and the netns (with a process in it) that
    /// holds one of the pod's `ips`.
    pub fn find(&self, uid: &str, ips: &[IpAddr]) -> Result<PodLocation, DiscoverError> {
        if ips.is_empty() {
            return Err(DiscoverError::NoIps { uid: uid.into() });
        }
        self.find_in(uid, ips, self.pod_cgroup(uid)?)
    }

    /// As [`Self::find`], with the pod's cgroup directory already known
    /// (from [`Self::pod_cgroups`]).
    pub fn find_in(&self, uid: &str, ips: &[IpAddr], cgroup: PathBuf) -> Result<PodLocation, DiscoverError> {
        if ips.is_empty() {
            return Err(DiscoverError::NoIps { uid: uid.into() });
        }
        let pids = processes(&cgroup)?;
        if pids.is_empty() {
            return Err(DiscoverError::NoProcess {
                uid: uid.into(),
                cgroup,
            });
        }
        let host = file_id(&self.host_netns)?;
        let (mut seen, mut host_seen) = (HashSet::new(), false);
        for &pid in &pids {
            let netns = self.proc_root.join(pid.to_string()).join("ns/net");
            // The process may have exited meanwhile.
            let Ok(id) = file_id(&netns) else { continue };
            if id == host {
                host_seen = true;
                continue;
            }
            // Each netns is entered once, however many processes share it.
            if !seen.insert(id) {
                continue;
            }
            match (self.netns_addresses)(&netns) {
                Ok(addrs) if addrs.iter().any(|a| ips.contains(a)) => return Ok(PodLocation { cgroup, netns, pid }),
                Ok(_) => {}
                Err(e) => tracing::debug!(uid, pid, error = %e, "cannot read a pod process's addresses"),
            }
        }
        if seen.is_empty() && host_seen {
            return Err(DiscoverError::HostNetwork { uid: uid.into() });
        }
        Err(DiscoverError::NoMatchingNetns {
            uid: uid.into(),
            cgroup,
            ips: ips.to_vec(),
            processes: pids.len(),
            namespaces: seen.len() + usize::from(host_seen),
        })
    }

    /// The pod-level cgroup directory of `uid` (cgroupfs or systemd naming).
    /// The kubelet's six places are tried first (a CNI ADD on a node with a
    /// thousand pods must not read a thousand directory entries); the walk
    /// finds pods under any other kubepods layout.
    pub fn pod_cgroup(&self, uid: &str) -> Result<PathBuf, DiscoverError> {
        if let Some(dir) = self.kubelet_pod_cgroup(uid) {
            return Ok(dir);
        }
        let mut found = None;
        self.walk_pods(|u, dir| {
            if u == uid {
                found = Some(dir);
            }
            found.is_none()
        })?;
        found.ok_or_else(|| DiscoverError::NoCgroup {
            uid: uid.into(),
            root: self.cgroup_root.clone(),
        })
    }

    /// The pod-level cgroup directory of `uid` if it is in one of the
    /// kubelet's six places (six stat calls, no directory read).
    pub fn kubelet_pod_cgroup(&self, uid: &str) -> Option<PathBuf> {
        kubelet_pod_dirs(uid)
            .into_iter()
            .map(|d| self.cgroup_root.join(d))
            .find(|d| d.is_dir())
    }

    /// Every pod-level cgroup directory by pod UID, in one walk of the
    /// tree: locating many pods costs one walk, not one per pod (a node
    /// with hundreds of pods would otherwise read its kubepods directory
    /// once per pod per translation).
    pub fn pod_cgroups(&self) -> Result<HashMap<String, PathBuf>, DiscoverError> {
        let mut all = HashMap::new();
        self.walk_pods(|uid, dir| {
            all.insert(uid.to_string(), dir);
            true
        })?;
        Ok(all)
    }

    /// Calls `visit(uid, dir)` for each pod directory, breadth first, until
    /// it returns false.
    fn walk_pods(&self, mut visit: impl FnMut(&str, PathBuf) -> bool) -> Result<(), DiscoverError> {
        let mut level = vec![self.cgroup_root.clone()];
        for _ in 0..MAX_POD_DEPTH {
            let mut next = Vec::new();
            for dir in &level {
                for sub in subdirs(dir)? {
                    let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                    if let Some(uid) = pod_uid(&name) {
                        if !visit(&uid, sub) {
                            return Ok(());
                        }
                        continue;
                    }
                    // Only descend into the kubepods hierarchy.
                    if name.starts_with("kubepods") || dir != &self.cgroup_root {
                        next.push(sub);
                    }
                }
            }
            level = next;
        }
        Ok(())
    }
}

/// Where the kubelet puts a pod's cgroup, relative to the cgroup root, for
/// each QoS class: cgroupfs driver, then systemd driver.
fn kubelet_pod_dirs(uid: &str) -> [String; 6] {
    let u = uid.replace('-', "_");
    [
        format!("kubepods/burstable/pod{uid}"),
        format!("kubepods/besteffort/pod{uid}"),
        format!("kubepods/pod{uid}"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
        format!("kubepods.slice/kubepods-pod{u}.slice"),
    ]
}

/// The pod UID a pod-level cgroup directory is named for: `pod<uid>`
/// (cgroupfs) or `kubepods[-<qos>]-pod<uid with underscores>.slice`
/// (systemd).
fn pod_uid(name: &str) -> Option<String> {
    let uid = match name.strip_prefix("pod") {
        Some(uid) => uid.to_string(),
        None => {
            let slice = name.strip_prefix("kubepods")?.strip_suffix(".slice")?;
            slice.rsplit_once("-pod")?.1.replace('_', "-")
        }
    };
    // A UID is hex digits and dashes: `podman` is not a pod's directory.
    let is_uid = !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    is_uid.then_some(uid)
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, DiscoverError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DiscoverError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// The pids of `dir`'s cgroup and, depth first, its children's (container
/// processes live in per-container child cgroups), at most [`MAX_PROCESSES`]
/// from at most [`MAX_CGROUP_DIRS`] directories.
fn processes(dir: &Path) -> Result<Vec<u32>, DiscoverError> {
    let (mut pids, mut stack, mut visited) = (Vec::new(), vec![dir.to_owned()], 0);
    while let Some(d) = stack.pop() {
        visited += 1;
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if pids.len() >= MAX_PROCESSES || visited >= MAX_CGROUP_DIRS {
            break;
        }
        // Reversed onto the stack: children are visited in name order.
        stack.extend(subdirs(&d)?.into_iter().rev());
    }
    pids.truncate(MAX_PROCESSES);
    Ok(pids)
}

/// (device, inode): the identity of a namespace file.
fn file_id(p: &Path) -> Result<(u64, u64), DiscoverError> {
    let m = std::fs::metadata(p).map_err(|source| DiscoverError::Io {
        path: p.to_owned(),
        source,
    })?;
    Ok((m.dev(), m.ino()))
}

/// The non-loopback addresses of the network namespace at `path`.
pub fn addresses_in(path: &Path) -> Result<Vec<IpAddr>, String> {
    let read = || -> Result<Vec<IpAddr>, String> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
        Ok(addrs
            .filter_map(|i| {
                let a = i.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .filter(|ip| !ip.is_loopback())
            .collect())
    };
    crate::netns::Netns::open(path)
        .and_then(|ns| ns.run(read))
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a9e-1b2c-4d5e-8f90-123456789abc";
    const POD_IP: &str = "10.244.1.7";

    fn pod_ips() -> Vec<IpAddr> {
        vec![POD_IP.parse().unwrap()]
    }

    /// A fake node: a cgroup tree and a /proc whose `ns/net` links point at
    /// files standing for namespaces, each holding its addresses. pid 1 is
    /// in the host netns (10.0.0.1), pid 42 in the pod's, pid 7 in another
    /// pod's (10.244.1.99).
    struct Fake {
        root: PathBuf,
    }

    fn fake_addresses(p: &Path) -> Result<Vec<IpAddr>, String> {
        let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
        Ok(text.lines().filter_map(|l| l.parse().ok()).collect())
    }

    impl Fake {
        /// `pids`: the pod's cgroup.procs, in order.
        fn new(tag: &str, pod_dir: &str, pids: &[u32]) -> Fake {
            let root = std::env::temp_dir().join(format!("discover-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let cg = root.join("cgroup");
            std::fs::create_dir_all(cg.join(pod_dir)).unwrap();
            std::fs::create_dir_all(cg.join("system.slice/containerd.service")).unwrap();
            let procs: String = pids.iter().map(|p| format!("{p}\n")).collect();
            std::fs::write(cg.join(pod_dir).join("cgroup.procs"), procs).unwrap();
            let f = Fake { root };
            f.netns("host", &["10.0.0.1"]);
            f.netns("pod", &[POD_IP, "fd00::7"]);
            f.netns("other", &["10.244.1.99"]);
            for (pid, ns) in [(1, "host"), (42, "pod"), (7, "other")] {
                f.process(pid, ns);
            }
            f
        }
        fn netns(&self, name: &str, ips: &[&str]) {
            let text: String = ips.iter().map(|i| format!("{i}\n")).collect();
            std::fs::write(self.root.join(format!("netns-{name}")), text).unwrap();
        }
        fn process(&self, pid: u32, ns: &str) {
            let dir = self.root.join(format!("proc/{pid}/ns"));
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::symlink(self.root.join(format!("netns-{ns}")), dir.join("net")).unwrap();
        }
        fn discoverer(&self) -> Discoverer {
            Discoverer {
                cgroup_root: self.root.join("cgroup"),
                proc_root: self.root.join("proc"),
                host_netns: self.root.join("proc/1/ns/net"),
                netns_addresses: fake_addresses,
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn containerd_with_systemd_driver() {
        let u = UID.replace('-', "_");
        let pod = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
        let f = Fake::new("systemd", &format!("{pod}/cri-containerd-0123abcd.scope"), &[42]);
        let loc = f.discoverer().find(UID, &pod_ips()).unwrap();
        assert_eq!(loc.cgroup, f.root.join("cgroup").join(&pod));
        assert_eq!((loc.pid, loc.netns.clone()), (42, f.root.join("proc/42/ns/net")));
    }

    #[test]
    fn crio_with_cgroupfs_driver_and_each_qos_class() {
        for qos in ["", "burstable/", "besteffort/"] {
            let pod = format!("kubepods/{qos}pod{UID}");
            let f = Fake::new(
                &format!("cgroupfs{}", qos.len()),
                &format!("{pod}/crio-feedbeef"),
                &[42],
            );
            assert_eq!(
                f.discoverer().find(UID, &pod_ips()).unwrap().cgroup,
                f.root.join("cgroup").join(&pod)
            );
        }
        let guaranteed = format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        let f = Fake::new("guaranteed", &format!("{guaranteed}/crio-1.scope"), &[42]);
        assert_eq!(
            f.discoverer().find(UID, &pod_ips()).unwrap().cgroup,
            f.root.join("cgroup").join(&guaranteed)
        );
    }

    #[test]
    fn a_pod_outside_the_kubelets_six_places_is_found_by_the_walk() {
        let pod = format!("kubepods/custom-class/pod{UID}");
        let f = Fake::new("walk", &format!("{pod}/c1"), &[42]);
        let cg = f.root.join("cgroup");
        assert!(kubelet_pod_dirs(UID).iter().all(|d| !cg.join(d).exists()));
        assert_eq!(f.discoverer().pod_cgroup(UID).unwrap(), cg.join(&pod));
        let e = f
            .discoverer()
            .pod_cgroup("0badcafe-0000-4000-8000-00000000000f")
            .unwrap_err();
        assert!(e.to_string().contains("0badcafe"), "{e}");
    }

    #[test]
    fn one_walk_indexes_every_pod_of_both_layouts() {
        let systemd = format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            UID.replace('-', "_")
        );
        let f = Fake::new("index", &format!("{systemd}/cri-containerd-1.scope"), &[42]);
        let cg = f.root.join("cgroup");
        let other = "0badcafe-0000-4000-8000-000000000001";
        for dir in [format!("kubepods/burstable/pod{other}/c1"), "kubepods/podman/x".into()] {
            std::fs::create_dir_all(cg.join(dir)).unwrap();
        }
        let d = f.discoverer();
        let all = d.pod_cgroups().unwrap();
        let want = HashMap::from([
            (UID.to_string(), cg.join(&systemd)),
            (other.to_string(), cg.join(format!("kubepods/burstable/pod{other}"))),
        ]);
        assert_eq!(all, want, "podman is not a pod; containers are not walked into");
        let loc = d.find_in(UID, &pod_ips(), all[UID].clone()).unwrap();
        assert_eq!(loc, d.find(UID, &pod_ips()).unwrap());
    }

    #[test]
    fn host_network_pods_and_missing_pods_say_so() {
        let f = Fake::new("hostnet", &format!("kubepods/pod{UID}/c1"), &[1]);
        let e = f.discoverer().find(UID, &pod_ips()).unwrap_err().to_string();
        assert!(e.contains("host network"), "{e}");
        let e = f
            .discoverer()
            .find("00000000-0000-0000-0000-000000000000", &pod_ips())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no cgroup of pod") && e.contains("--cgroup-root"), "{e}");
        let e = f.discoverer().find(UID, &[]).unwrap_err().to_string();
        assert!(e.contains("no IP yet"), "{e}");
    }

    #[test]
    fn processes_joined_from_another_netns_are_skipped() {
        // First in the cgroup: a process of another pod's netns, then one of
        // the host's (an nsenter'd tool), then the pod's own.
        let f = Fake::new("joined", &format!("kubepods/pod{UID}/c1"), &[7, 1, 42]);
        let loc = f.discoverer().find(UID, &pod_ips()).unwrap();
        assert_eq!((loc.pid, loc.netns), (42, f.root.join("proc/42/ns/net")));
        // Matched by any of the pod's IPs (an IPv6-first pod).
        let loc = f.discoverer().find(UID, &["fd00::7".parse().unwrap()]).unwrap();
        assert_eq!(loc.pid, 42);
    }

    #[test]
    fn no_netns_holding_the_pod_ip_says_which_were_inspected() {
        let f = Fake::new("nomatch", &format!("kubepods/pod{UID}/c1"), &[7, 1, 4242]);
        let e = f.discoverer().find(UID, &pod_ips()).unwrap_err().to_string();
        assert!(
            e.contains("none of the 2 network namespaces of the 3 processes") && e.contains(POD_IP),
            "{e}"
        );
    }

    #[test]
    fn inspection_is_bounded() {
        // More processes than inspected, all in another netns, the pod's last.
        let mut pids: Vec<u32> = (1000..1000 + MAX_PROCESSES as u32).collect();
        pids.push(42);
        let f = Fake::new("bounded", &format!("kubepods/pod{UID}/c1"), &pids);
        for &pid in &pids[..MAX_PROCESSES] {
            f.process(pid, "other");
        }
        let e = f.discoverer().find(UID, &pod_ips()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("of the {MAX_PROCESSES} processes inspected")),
            "{e}"
        );
    }
}
