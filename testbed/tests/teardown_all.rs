//! `teardown_all` affects every cluster of the process, so it lives in its
//! own test binary (cargo runs test binaries one after another).

use std::path::Path;
use std::process::Command;

use testbed::{teardown_all, Cluster, ClusterSpec, NodeSpec};

fn netns_count(prefix: &str) -> usize {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let dash = format!("{prefix}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&dash))
        .count()
}

#[test]
fn teardown_all_removes_every_live_cluster() {
    let spec = ClusterSpec::new(vec![NodeSpec::new("n1", &["p1"]), NodeSpec::new("n2", &[])]);
    let one = Cluster::create("all", &spec).unwrap();
    let two = Cluster::create("all", &spec).unwrap();
    let mut c = two.pod("p1").command("sleep");
    c.arg("300");
    let mut child = c.spawn().unwrap();
    assert_eq!(netns_count(one.prefix()), 4);
    assert_eq!(netns_count(two.prefix()), 4);

    teardown_all().unwrap();
    for c in [&one, &two] {
        assert_eq!(netns_count(c.prefix()), 0);
        assert!(!Path::new(c.cgroup_root()).exists());
    }
    assert!(!child.wait().unwrap().success());
    // Dropping after teardown_all is a no-op.
    drop(one);
    drop(two);
    teardown_all().unwrap();
}
