//! Pod discovery on a node (issue #4, first slice): a pod laid out like a
//! kubelet + containerd (systemd-free cgroupfs naming, burstable QoS) in a
//! real netns and cgroup is found by its UID and enrolled by what was found,
//! even when the first process of its cgroup sits in another netns.
use std::{fs, os::unix::fs::MetadataExt};

use agent::discover::Discoverer;
use anyhow::Result;
use testbed::{
    mesh::{self, Agent},
    Cluster, ClusterSpec, NodeSpec,
};

use crate::{access_to, succeeded, WAIT};

const UID: &str = "0d6b1f3a-5c7e-4f21-9a0b-1c2d3e4f5a6b";

#[test]
fn a_pod_is_found_by_uid_and_enrolled_from_what_was_found() -> Result<()> {
    let spec = ClusterSpec::new(vec![
        NodeSpec::new("node1", &["kpod"]),
        NodeSpec::new("node2", &["peer"]),
    ]);
    let cluster = Cluster::create("discover", &spec)?;
    let dir = cluster.scratch_dir()?;
    let node = cluster.node("node1");
    let kpod = cluster.pod("kpod");

    // kubepods/burstable/pod<uid>/<container>, below the node's cgroup parent.
    let pod_cgroup = node.cgroup.join(format!("kubepods/burstable/pod{UID}"));
    let container = pod_cgroup.join("cri-containerd-4b1d0c0ffee.scope");
    fs::create_dir_all(&container)?;
    // The "container": the test app in the pod's netns and that cgroup.
    let (mut app, line) = mesh::app_in_cgroup(kpod, &container, &["server", "--ports", "8080"])?;
    assert!(line.contains("listening"), "{line}");
    // First in the pod's cgroup (its container cgroup sorts first): a
    // process that joined from another netns, as a debug tool might.
    let joined = pod_cgroup.join("a-debug.scope");
    let (mut intruder, line) = mesh::app_in_cgroup(cluster.pod("peer"), &joined, &["server", "--ports", "9999"])?;
    assert!(line.contains("listening"), "{line}");

    // Found by UID: the pod-level cgroup and a process in the netns that
    // holds the pod's IP, not the first process.
    let discoverer = Discoverer {
        host_netns: node.netns_path.clone(),
        ..Discoverer::new(&node.cgroup)
    };
    let e = discoverer.find(UID, &["10.9.9.9".parse()?]).unwrap_err().to_string();
    assert!(
        e.contains("none of the 2 network namespaces of the 2 processes") && e.contains("10.9.9.9"),
        "{e}"
    );
    let loc = discoverer.find(UID, &[kpod.ip4.into()])?;
    assert_eq!(loc.pid, app.id(), "the app's process, not the intruder's");
    assert_eq!(loc.cgroup, pod_cgroup);
    assert_eq!(
        fs::metadata(&loc.netns)?.ino(),
        fs::metadata(&kpod.netns_path)?.ino(),
        "the pod's netns"
    );

    // Enrolled by the discovered paths, the pod's inbound traffic is captured.
    let config = dir.join("mesh.yaml");
    fs::write(
        &config,
        format!(
            "pods:\n  - {{name: kpod, namespace: default, uid: {UID}, node: node1, netns: {}, cgroup: {}, ips: [\"{}\"]}}\n",
            loc.netns.display(),
            loc.cgroup.display(),
            kpod.ip4
        ),
    )?;
    let agent = Agent::start_ready(&cluster, "node1", &config, &dir)?;
    let r = mesh::client(cluster.pod("peer"), "once", &kpod.ip4.to_string(), 8080, &[])?;
    assert!(succeeded(&r), "{r}");
    let dst = format!("{}:8080", kpod.ip4);
    let logs = agent.wait_access(WAIT, |l| !access_to(l, &dst).is_empty())?;
    assert_eq!(access_to(&logs, &dst)[0]["direction"], "inbound");
    for p in [&mut app, &mut intruder] {
        let _ = p.kill();
        let _ = p.wait();
    }
    Ok(())
}
