//! End-to-end tests of the testbed with real namespaces, veths, bridges and
//! cgroups. They must run as root. Every wait is bounded.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use testbed::{cgroup2_mount, sweep_stale, Cluster, ClusterSpec, NodeSpec, Pod};

/// Echo server: listens dual-stack on [::]:PORT, serves N connections
/// ("echo:" + what it got), prints "ready" once listening. Gives up after 20 s.
const SERVER: &str = r#"
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(16)
s.settimeout(20)
print("ready", flush=True)
for _ in range(n):
    c, addr = s.accept()
    c.settimeout(5)
    data = c.recv(1024)
    c.sendall(b"echo:" + data)
    c.close()
    print("served", addr[0], flush=True)
"#;

/// Client: connects to each HOST in turn on PORT, sends "hi <host>", prints
/// "<host> <reply>".
const CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
for host in sys.argv[2:]:
    c = socket.create_connection((host, port), timeout=5)
    c.settimeout(5)
    c.sendall(("hi " + host).encode())
    print(host, c.recv(1024).decode(), flush=True)
    c.close()
"#;

fn spec() -> ClusterSpec {
    ClusterSpec::new(vec![
        NodeSpec::new("node1", &["a1", "a2"]),
        NodeSpec::new("node2", &["b1"]),
    ])
}

/// Spawn with piped stdout; returns the child and a channel of its stdout lines.
fn spawn_lines(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn expect_line(rx: &mpsc::Receiver<String>, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.trim() == want => return,
            Ok(_) => continue,
            Err(e) => panic!("did not see line {want:?} within {timeout:?}: {e}"),
        }
    }
}

/// Run to completion with a deadline (killed if it overruns).
fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("command did not finish within {timeout:?}");
        }
    }
}

/// Wait (bounded) for a child to exit; returns its status.
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {} still alive after {timeout:?}", child.id());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn proc_cgroup(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line in /proc/<pid>/cgroup")
        .to_string()
}

fn assert_in(pid: u32, netns_path: &Path, cgroup: &Path) {
    let cg2 = cgroup2_mount().unwrap();
    let want = Path::new("/").join(cgroup.strip_prefix(&cg2).unwrap());
    assert_eq!(Path::new(&proc_cgroup(pid)), want, "cgroup of pid {pid}");
    let ns_ino = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(ns_ino, fs::metadata(netns_path).unwrap().ino(), "netns of pid {pid}");
    let host_ino = fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(ns_ino, host_ino);
    // Host mount namespace (not `ip netns exec`'s private one).
    assert_eq!(
        fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap().ino(),
        fs::metadata("/proc/self/ns/mnt").unwrap().ino(),
        "mount ns of pid {pid}"
    );
}

fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    let dash = format!("{prefix}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&dash))
        .map(str::to_string)
        .collect()
}

fn assert_cleaned(prefix: &str, cgroup_root: &Path) {
    let left = netns_with_prefix(prefix);
    assert!(left.is_empty(), "netns left behind: {left:?}");
    assert!(!cgroup_root.exists(), "{} left behind", cgroup_root.display());
}

fn pod_server(pod: &Pod, port: u16, conns: u32) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = pod.command("python3");
    cmd.args(["-c", SERVER, &port.to_string(), &conns.to_string()]);
    let (child, rx) = spawn_lines(cmd);
    expect_line(&rx, "ready", Duration::from_secs(10));
    (child, rx)
}

#[test]
fn pods_reach_each_other_across_nodes_over_ipv4_and_ipv6() {
    sweep_stale().unwrap();
    let cluster = Cluster::create("conn", &spec()).unwrap();
    assert!(cluster.prefix().len() <= 12 && cluster.prefix().starts_with("mt"));
    assert_eq!(cluster.nodes().len(), 2);
    assert_eq!(cluster.pods().count(), 3);
    assert_eq!(cluster.pods_on("node1").count(), 2);
    let a1 = cluster.pod("a1");
    let b1 = cluster.pod("b1");
    assert_eq!(a1.ip4.to_string(), "10.1.1.11");
    assert_eq!(cluster.pod("a2").ip6.to_string(), "fd00:1:1::12");
    assert_eq!(b1.ip4.to_string(), "10.1.2.11");
    assert_eq!(b1.ip6.to_string(), "fd00:1:2::11");
    let n2 = cluster.node("node2");
    assert_eq!(
        (n2.index, n2.link_ip4.to_string(), n2.gw_ip6.to_string()),
        (2, "10.99.0.2".into(), "fd00:1:2::1".into())
    );
    assert_eq!(n2.cgroup, cluster.cgroup_root().join("node2"));
    assert_eq!(n2.agent_cgroup, cluster.cgroup_root().join("node2/agent"));

    // Listener in a pod on node1, checked to be in the pod's cgroup and netns.
    let (mut server, lines) = pod_server(a1, 7001, 2);
    assert_in(server.id(), &a1.netns_path, &a1.cgroup);

    // Client in a pod on node2, over IPv4 then IPv6.
    let mut client = b1.command("python3");
    client.args(["-c", CLIENT, "7001", &a1.ip4.to_string(), &a1.ip6.to_string()]);
    let out = run_bounded(client, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("10.1.1.11 echo:hi 10.1.1.11"), "{stdout}");
    assert!(stdout.contains("fd00:1:1::11 echo:hi fd00:1:1::11"), "{stdout}");
    // The server saw the client's real pod addresses (no NAT on the way).
    expect_line(&lines, "served ::ffff:10.1.2.11", Duration::from_secs(5));
    expect_line(&lines, "served fd00:1:2::11", Duration::from_secs(5));
    assert!(wait_exit(&mut server, Duration::from_secs(5)).success());

    // A node process (agent cgroup, node netns) is reachable from its pods
    // on the gateway address, like kubelet probes come from the node.
    let node1 = cluster.node("node1");
    let mut cmd = node1.command("python3");
    cmd.args(["-c", SERVER, "7002", "2"]);
    let (mut agent, lines) = spawn_lines(cmd);
    expect_line(&lines, "ready", Duration::from_secs(10));
    assert_in(agent.id(), &node1.netns_path, &node1.agent_cgroup);
    let a2 = cluster.pod("a2");
    let mut client = a2.command("python3");
    client.args(["-c", CLIENT, "7002", "10.1.1.1", "fd00:1:1::1"]);
    let out = run_bounded(client, Duration::from_secs(20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    expect_line(&lines, "served ::ffff:10.1.1.12", Duration::from_secs(5));
    expect_line(&lines, "served fd00:1:1::12", Duration::from_secs(5));
    assert!(wait_exit(&mut agent, Duration::from_secs(5)).success());
}

#[test]
fn drop_removes_netns_cgroups_and_processes() {
    let cluster = Cluster::create("drop", &spec()).unwrap();
    let prefix = cluster.prefix().to_string();
    let root = cluster.cgroup_root().to_path_buf();
    assert_eq!(netns_with_prefix(&prefix).len(), 1 + 2 + 3);
    assert!(root.join("node1/a2").is_dir() && root.join("node2/agent").is_dir());

    let mut sleepers = Vec::new();
    for pod in cluster.pods() {
        let mut c = pod.command("sleep");
        c.arg("300");
        sleepers.push(c.spawn().unwrap());
    }
    let mut c = cluster.node("node2").command("sleep");
    c.arg("300");
    sleepers.push(c.spawn().unwrap());
    // A grandchild that escaped its parent (double fork) must die too.
    let mut c = cluster.pod("b1").command("sh");
    c.args(["-c", "sleep 300 >/dev/null 2>&1 & echo $!"]);
    let out = run_bounded(c, Duration::from_secs(10));
    let grandchild: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(Path::new(&format!("/proc/{grandchild}")).exists());

    let t = Instant::now();
    drop(cluster);
    assert!(t.elapsed() < Duration::from_secs(10), "teardown took {:?}", t.elapsed());
    assert_cleaned(&prefix, &root);
    for mut s in sleepers {
        let st = wait_exit(&mut s, Duration::from_secs(5));
        assert!(!st.success(), "sleeper should have been killed: {st:?}");
    }
    // The grandchild was reparented away from us; it must be gone (or a
    // zombie waiting for its new parent to reap it).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = fs::read_to_string(format!("/proc/{grandchild}/stat")).ok();
        let dead = match &state {
            None => true,
            Some(s) => s
                .rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false),
        };
        if dead {
            break;
        }
        assert!(Instant::now() < deadline, "grandchild {grandchild} still running");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn teardown_runs_after_a_panicking_test_body() {
    let seen: std::sync::Mutex<Option<(String, PathBuf)>> = std::sync::Mutex::new(None);
    let child: std::sync::Mutex<Option<Child>> = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::create("panic", &spec()).unwrap();
        *seen.lock().unwrap() = Some((cluster.prefix().to_string(), cluster.cgroup_root().to_path_buf()));
        let mut c = cluster.pod("a1").command("sleep");
        c.arg("300");
        *child.lock().unwrap() = Some(c.spawn().unwrap());
        panic!("test body failed");
    }));
    assert!(result.is_err());
    let (prefix, root) = seen.lock().unwrap().clone().expect("cluster was created");
    assert_cleaned(&prefix, &root);
    let mut child = child.lock().unwrap().take().expect("child was spawned");
    assert!(!wait_exit(&mut child, Duration::from_secs(5)).success());
}

#[test]
fn two_clusters_with_the_same_addresses_coexist() {
    let one = Cluster::create("iso", &spec()).unwrap();
    let two = Cluster::create("iso", &spec()).unwrap();
    assert_ne!(one.prefix(), two.prefix());
    assert_eq!(one.pod("a1").ip4, two.pod("a1").ip4);
    // Only cluster one has a listener; cluster two's client must not reach it.
    let (mut server, _lines) = pod_server(one.pod("a1"), 7003, 1);
    let mut c = two.pod("b1").command("python3");
    c.args(["-c", CLIENT, "7003", "10.1.1.11"]);
    let out = run_bounded(c, Duration::from_secs(20));
    assert!(!out.status.success(), "connected across clusters!");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = one.pod("b1").command("python3");
    c.args(["-c", CLIENT, "7003", "10.1.1.11"]);
    let out = run_bounded(c, Duration::from_secs(20));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_exit(&mut server, Duration::from_secs(5)).success());
}

#[test]
fn commands_fail_cleanly_after_teardown() {
    let mut cluster = Cluster::create("gone", &spec()).unwrap();
    let pod = cluster.pod("a1").clone();
    cluster.teardown().unwrap();
    let err = pod.try_command("true").unwrap_err();
    assert!(format!("{err:#}").contains(&pod.netns), "{err:#}");
    assert!(pod.command("true").status().is_err());
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = Vec::new();
    loop {
        v.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    v.reverse();
    String::from_utf8(v).unwrap()
}

#[test]
fn sweep_stale_removes_leftovers_of_dead_processes() {
    // A pid that certainly belonged to a process that is gone now.
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let prefix = format!("mt{}_zzsw", base36(dead_pid));
    let cg2 = cgroup2_mount().unwrap();
    let root = cg2.join(&prefix);
    let ns = format!("{prefix}-wire");
    let ok = Command::new("ip").args(["netns", "add", &ns]).status().unwrap();
    assert!(ok.success());
    fs::create_dir_all(root.join("node1/p")).unwrap();
    // A process left running in the stale cgroup and netns.
    let fake = Pod {
        name: "p".into(),
        node: "node1".into(),
        index: 1,
        netns: ns.clone(),
        netns_path: Path::new("/run/netns").join(&ns),
        cgroup: root.join("node1/p"),
        ip4: "10.1.1.11".parse().unwrap(),
        ip6: "fd00:1:1::11".parse().unwrap(),
        host_veth: "v1".into(),
    };
    let mut c = fake.command("sleep");
    c.arg("300");
    let mut orphan = c.spawn().unwrap();

    // Looks like ours, but neither `<cg2>/<prefix>` nor `<prefix>-wire`
    // exists: not proven ours, so left alone.
    let foreign = format!("mt{}_zzfo-other", base36(dead_pid));
    assert!(Command::new("ip")
        .args(["netns", "add", &foreign])
        .status()
        .unwrap()
        .success());

    // Live clusters (ours) must survive the sweep.
    let live = Cluster::create("live", &spec()).unwrap();

    sweep_stale().unwrap();
    assert_cleaned(&prefix, &root);
    let foreign_left = Path::new("/run/netns").join(&foreign).exists();
    let _ = Command::new("ip").args(["netns", "del", &foreign]).status();
    assert!(foreign_left, "sweep removed a netns not proven to be ours");
    assert!(!wait_exit(&mut orphan, Duration::from_secs(5)).success());
    assert_eq!(netns_with_prefix(live.prefix()).len(), 6);
    assert!(live.cgroup_root().is_dir());
}

/// A private bpffs mount for the test, unmounted on drop.
struct BpffsMount(PathBuf);

impl BpffsMount {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("testbed-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        BpffsMount(dir)
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn owned_bpffs_paths_are_removed_and_nothing_else() {
    let bpffs = BpffsMount::new("bpffs");
    let mut cluster = Cluster::create("bpf", &spec()).unwrap();
    let prefix = cluster.prefix().to_string();
    let root = cluster.cgroup_root().to_path_buf();
    let pinned = bpffs.0.join(format!("{prefix}-node1"));
    fs::create_dir_all(pinned.join("maps/inner")).unwrap();
    cluster.own_bpffs_path(pinned.clone());
    cluster.own_bpffs_path(bpffs.0.join(format!("{prefix}-never-created")));
    // Not on bpffs: teardown must refuse to delete it, and say so.
    let plain = std::env::temp_dir().join(format!("testbed-plain-{}", std::process::id()));
    fs::create_dir_all(&plain).unwrap();
    cluster.own_bpffs_path(plain.clone());

    let err = cluster.teardown().unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not on a bpf file system") && msg.contains(&plain.display().to_string()),
        "{msg}"
    );
    assert!(plain.is_dir());
    assert!(!pinned.exists());
    assert_cleaned(&prefix, &root);
    // Once the offending path is gone, teardown completes.
    fs::remove_dir(&plain).unwrap();
    cluster.teardown().unwrap();
}

#[test]
fn sweep_stale_removes_bpffs_entries_of_dead_processes() {
    let bpffs = BpffsMount::new("bpfsweep");
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let stale = bpffs.0.join(format!("mt{}_zzbp-node1", base36(dead_pid)));
    let bare = bpffs.0.join(format!("mt{}_zzbp", base36(dead_pid)));
    let mine = bpffs.0.join(format!("mt{}_zzbp-node1", base36(std::process::id())));
    for d in [&stale, &bare, &mine] {
        fs::create_dir_all(d.join("maps")).unwrap();
    }
    sweep_stale().unwrap();
    assert!(!stale.exists());
    assert!(bare.exists(), "a bare prefix name is not one of our bpffs paths");
    assert!(mine.exists(), "entries of live processes must stay");
}

#[test]
fn cluster_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Cluster>();
    check::<Pod>();
    check::<testbed::Node>();
}
