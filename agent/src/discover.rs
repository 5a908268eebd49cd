//! Finding a pod on its node from its UID (for existing pods, when the
//! Kubernetes source enrolls them): its pod-level cgroup v2 directory and a
//! process whose network namespace is the pod's.
//!
//! Layouts handled (cgroup v2, any QoS class):
//! * cgroupfs driver: `kubepods/[burstable|besteffort/]pod<uid>/<container>/`
//! * systemd driver:  `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/
//!   {cri-containerd,crio,docker}-<id>.scope/`
//!
//! Pods on the host network share the node's netns and are never enrolled.
use std::{
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

/// Looks pods up under a cgroup v2 mount and a /proc (both fakeable for tests).
pub struct Discoverer {
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    /// The node's own network namespace (pods sharing it are host-network).
    pub host_netns: PathBuf,
}

/// How deep under the cgroup root a pod directory may be (kubepods.slice/qos.slice/pod.slice).
const MAX_POD_DEPTH: usize = 4;

impl Discoverer {
    pub fn new(cgroup_root: &Path) -> Self {
        Self {
            cgroup_root: cgroup_root.to_owned(),
            proc_root: PathBuf::from("/proc"),
            host_netns: PathBuf::from("/proc/1/ns/net"),
        }
    }

    /// The pod's cgroup directory, its netns and a process in it.
    pub fn find(&self, uid: &str) -> Result<PodLocation, DiscoverError> {
        let cgroup = self.pod_cgroup(uid)?;
        let pid = first_process(&cgroup)?.ok_or_else(|| DiscoverError::NoProcess {
            uid: uid.into(),
            cgroup: cgroup.clone(),
        })?;
        let netns = self.proc_root.join(pid.to_string()).join("ns/net");
        if same_file(&netns, &self.host_netns)? {
            return Err(DiscoverError::HostNetwork { uid: uid.into() });
        }
        Ok(PodLocation { cgroup, netns, pid })
    }

    /// The pod-level cgroup directory of `uid` (cgroupfs or systemd naming).
    pub fn pod_cgroup(&self, uid: &str) -> Result<PathBuf, DiscoverError> {
        let cgroupfs = format!("pod{uid}");
        let systemd = format!("pod{}.slice", uid.replace('-', "_"));
        let matches = |name: &str| name == cgroupfs || (name.starts_with("kubepods") && name.ends_with(&systemd));
        let mut level = vec![self.cgroup_root.clone()];
        for _ in 0..MAX_POD_DEPTH {
            let mut next = Vec::new();
            for dir in &level {
                for sub in subdirs(dir)? {
                    let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                    if matches(&name) {
                        return Ok(sub);
                    }
                    // Only descend into the kubepods hierarchy.
                    if name.starts_with("kubepods") || dir != &self.cgroup_root {
                        next.push(sub);
                    }
                }
            }
            level = next;
        }
        Err(DiscoverError::NoCgroup {
            uid: uid.into(),
            root: self.cgroup_root.clone(),
        })
    }
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

/// The first pid in `dir`'s cgroup.procs or, depth first, in its children's
/// (container processes live in per-container child cgroups).
fn first_process(dir: &Path) -> Result<Option<u32>, DiscoverError> {
    let procs = dir.join("cgroup.procs");
    if let Ok(text) = std::fs::read_to_string(&procs) {
        if let Some(pid) = text.lines().find_map(|l| l.trim().parse().ok()) {
            return Ok(Some(pid));
        }
    }
    for sub in subdirs(dir)? {
        if let Some(pid) = first_process(&sub)? {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

fn same_file(a: &Path, b: &Path) -> Result<bool, DiscoverError> {
    let meta = |p: &Path| {
        std::fs::metadata(p).map_err(|source| DiscoverError::Io {
            path: p.to_owned(),
            source,
        })
    };
    let (a, b) = (meta(a)?, meta(b)?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a9e-1b2c-4d5e-8f90-123456789abc";

    /// A fake node: cgroup tree and /proc with pid 1 (host netns) and pid 42 (pod netns).
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new(tag: &str, pod_dir: &str, pod_pid: u32) -> Fake {
            let root = std::env::temp_dir().join(format!("discover-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let cg = root.join("cgroup");
            std::fs::create_dir_all(cg.join(pod_dir)).unwrap();
            std::fs::create_dir_all(cg.join("system.slice/containerd.service")).unwrap();
            std::fs::write(cg.join(pod_dir).join("cgroup.procs"), format!("{pod_pid}\n")).unwrap();
            for (pid, ns) in [(1, "host"), (42, "pod")] {
                let dir = root.join(format!("proc/{pid}/ns"));
                std::fs::create_dir_all(&dir).unwrap();
                let target = root.join(format!("netns-{ns}"));
                std::fs::write(&target, ns).unwrap();
                std::os::unix::fs::symlink(&target, dir.join("net")).unwrap();
            }
            Fake { root }
        }
        fn discoverer(&self) -> Discoverer {
            Discoverer {
                cgroup_root: self.root.join("cgroup"),
                proc_root: self.root.join("proc"),
                host_netns: self.root.join("proc/1/ns/net"),
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
        let f = Fake::new("systemd", &format!("{pod}/cri-containerd-0123abcd.scope"), 42);
        let loc = f.discoverer().find(UID).unwrap();
        assert_eq!(loc.cgroup, f.root.join("cgroup").join(&pod));
        assert_eq!((loc.pid, loc.netns.clone()), (42, f.root.join("proc/42/ns/net")));
    }

    #[test]
    fn crio_with_cgroupfs_driver_and_each_qos_class() {
        for qos in ["", "burstable/", "besteffort/"] {
            let pod = format!("kubepods/{qos}pod{UID}");
            let f = Fake::new(&format!("cgroupfs{}", qos.len()), &format!("{pod}/crio-feedbeef"), 42);
            assert_eq!(
                f.discoverer().find(UID).unwrap().cgroup,
                f.root.join("cgroup").join(&pod)
            );
        }
        let guaranteed = format!("kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_"));
        let f = Fake::new("guaranteed", &format!("{guaranteed}/crio-1.scope"), 42);
        assert_eq!(
            f.discoverer().find(UID).unwrap().cgroup,
            f.root.join("cgroup").join(&guaranteed)
        );
    }

    #[test]
    fn host_network_pods_and_missing_pods_say_so() {
        let f = Fake::new("hostnet", &format!("kubepods/pod{UID}/c1"), 1);
        let e = f.discoverer().find(UID).unwrap_err().to_string();
        assert!(e.contains("host network"), "{e}");
        let e = f
            .discoverer()
            .find("00000000-0000-0000-0000-000000000000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no cgroup of pod") && e.contains("--cgroup-root"), "{e}");
    }
}
