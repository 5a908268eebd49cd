//! Unit tests needing crate internals (failure injection). They create real
//! namespaces and cgroups; run as root.

use super::*;

fn spec() -> ClusterSpec {
    ClusterSpec::new(vec![NodeSpec::new("node1", &["p1"]), NodeSpec::new("node2", &["p2"])])
}

fn assert_gone(prefix: &str) {
    assert!(!prefix.is_empty());
    let dash = format!("{prefix}-");
    let left: Vec<String> = sys::list_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&dash))
        .collect();
    assert!(left.is_empty(), "netns left behind: {left:?}");
    let root = cgroup2_mount().unwrap().join(prefix);
    assert!(!root.exists(), "cgroup {} left behind", root.display());
    assert!(
        !lock(&REGISTRY).iter().any(|r| lock(r).prefix == prefix),
        "cluster {prefix} still registered"
    );
}

#[test]
fn failed_creation_cleans_up_at_every_step() {
    for step in ["wire", "node", "routes"] {
        FAIL_AT.with(|f| f.set(Some(step)));
        let result = Cluster::create("inj", &spec());
        FAIL_AT.with(|f| f.set(None));
        let err = result.expect_err("injected failure must fail create");
        let prefix = LAST_PREFIX.with(|p| p.borrow().clone());
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("injected failure at {step}")), "{msg}");
        assert!(msg.contains(&prefix), "error should name the cluster: {msg}");
        assert_gone(&prefix);
    }
}

#[test]
fn invalid_spec_creates_nothing() {
    let bad = ClusterSpec::new(vec![NodeSpec::new("n", &["n"])]);
    let err = Cluster::create("bad", &bad).unwrap_err();
    assert!(format!("{err:#}").contains("more than once"), "{err:#}");
}

#[test]
fn ip_errors_name_the_command_and_carry_stderr() {
    let err = sys::ip_n("mt-testbed-no-such-netns", &["link", "show"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("`ip -n mt-testbed-no-such-netns link show` failed"),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("no such file"), "stderr missing: {msg}");
}

#[test]
fn teardown_is_idempotent() {
    let mut c = Cluster::create("idem", &spec()).unwrap();
    let prefix = c.prefix().to_string();
    c.teardown().unwrap();
    assert_gone(&prefix);
    c.teardown().unwrap();
    drop(c);
    assert_gone(&prefix);
}

#[test]
fn sysctls_are_set_per_namespace() {
    let c = Cluster::create("sysctl", &spec()).unwrap();
    let read = |path: &Path, key: &str| {
        in_netns(path, || {
            Ok(fs::read_to_string(Path::new("/proc/sys").join(key))?.trim().to_string())
        })
        .unwrap()
    };
    let n = c.node("node1");
    assert_eq!(read(&n.netns_path, "net/ipv4/ip_forward"), "1");
    assert_eq!(read(&n.netns_path, "net/ipv6/conf/all/forwarding"), "1");
    assert_eq!(read(&n.netns_path, "net/ipv6/conf/all/accept_dad"), "0");
    let p = c.pod("p1");
    assert_eq!(read(&p.netns_path, "net/ipv6/conf/default/accept_dad"), "0");
    assert_eq!(read(&p.netns_path, "net/ipv4/ip_forward"), "0");
    let wire_dad = read(&sys::netns_path(c.wire_netns()), "net/ipv6/conf/default/accept_dad");
    assert_eq!(wire_dad, "0");
}
