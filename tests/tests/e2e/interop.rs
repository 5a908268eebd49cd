//! HBONE wire compatibility with an independent peer (`apps/hbone_peer.py`,
//! Python's `ssl` and the `h2` package; none of our code): a foreign client
//! tunnels into an enrolled pod through our agent, and our agent tunnels an
//! unmodified client's connection to a foreign server. Both directions check
//! TLS 1.3, ALPN h2, no SNI, the SPIFFE identities, the CONNECT headers, the
//! status codes, half-close and flow control with a 1 MiB transfer.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use testbed::mesh::{self, Agent, Server};

use crate::{access_to, World, APP_PORT, WAIT};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The pretend workload behind the Python server: pod `ext` on node `external`.
const EXT_ID: &str = "spiffe://cluster.local/ns/default/sa/ext";
const MIB: u64 = 1 << 20;
/// 16 bytes, repeated to make the large payload.
const PATTERN: &str = "interop-0123456/";

pub(crate) fn peer_app() -> PathBuf {
    mesh::meshapp().with_file_name("hbone_peer.py")
}

/// Runs `cmd`, killing it if it outlives `timeout`.
pub(crate) fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its waiter is still blocked).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("{cmd:?} did not finish within {timeout:?}; killed")
        }
    }
}

/// The last stdout line of a finished program as JSON.
pub(crate) fn report(out: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "no JSON report ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Adds pod `ext` (service account `ext`) on node `external`, with the
/// network namespace and addresses of the `backend` pod: the agents treat
/// backend's IPs as an HBONE destination, and no agent enrolls it.
fn add_external_pod(w: &World) -> Result<()> {
    let b = w.cluster.pod("backend");
    let mut y = fs::read_to_string(&w.config)?;
    if !y
        .trim_end()
        .lines()
        .last()
        .is_some_and(|l| l.trim_start().starts_with("labels:"))
    {
        bail!("the enrolment file does not end with a pod entry:\n{y}");
    }
    let _ = write!(
        y,
        "  - name: ext\n    namespace: default\n    serviceAccount: ext\n    node: external\n    netns: {}\n    cgroup: {}\n    ips: [\"{}\", \"{}\"]\n    labels: {{app: ext}}\n",
        b.netns_path.display(),
        b.cgroup.display(),
        b.ip4,
        b.ip6
    );
    let tmp = w.config.with_extension("tmp");
    fs::write(&tmp, y)?;
    fs::rename(&tmp, &w.config)?;
    Ok(())
}

/// The mesh CA (`agent ca init` + `agent ca serve` on node1) with a
/// credential for every cluster node and for the pretend node `external`.
struct Ca {
    dir: PathBuf,
    address: String,
    child: Child,
}

impl Ca {
    fn start(w: &World) -> Result<Ca> {
        let dir = w.dir.join("ca");
        let mut init = vec![
            "ca".to_string(),
            "init".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        for n in w.cluster.nodes().iter().map(|n| n.name.as_str()).chain(["external"]) {
            init.extend(["--node".to_string(), n.to_string()]);
        }
        mesh::agent_cli(&init.iter().map(String::as_str).collect::<Vec<_>>())?;
        let n = w.cluster.node("node1");
        let listen = format!("{}:15012", n.link_ip4);
        let log = fs::File::create(dir.join("ca.log"))?;
        let child = n
            .try_command(mesh::binary("agent")?)?
            .args(["--log-format", "json", "ca", "serve", "--listen", &listen])
            .arg("--dir")
            .arg(&dir)
            .arg("--config")
            .arg(&w.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Ca {
            dir,
            address: format!("https://{listen}"),
            child,
        })
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    fn client_args(&self, node: &str) -> Vec<String> {
        let creds = self.dir.join("nodes").join(node);
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--ca-root".into(),
            self.root().display().to_string(),
            "--node-cert".into(),
            creds.join("cert.pem").display().to_string(),
            "--node-key".into(),
            creds.join("key.pem").display().to_string(),
        ]
    }

    /// `agent ca request --key-out` with `node`'s credential, run in the netns
    /// of cluster node `from`: the chain (leaf first, root last) and the key.
    fn request(&self, w: &World, from: &str, node: &str, id: &str) -> Result<(PathBuf, PathBuf)> {
        let name = id.rsplit('/').next().unwrap_or(id);
        let (chain, key) = (
            w.dir.join(format!("{name}-chain.pem")),
            w.dir.join(format!("{name}-key.pem")),
        );
        let out = output_within(
            w.cluster
                .node(from)
                .try_command(mesh::binary("agent")?)?
                .args(["ca", "request", "--id", id])
                .arg("--key-out")
                .arg(&key)
                .args(self.client_args(node)),
            WAIT,
        )?;
        if !out.status.success() {
            bail!(
                "agent ca request {id} as node {node} failed: {}\nCA log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(self.dir.join("ca.log")).unwrap_or_default()
            );
        }
        fs::write(&chain, &out.stdout)?;
        Ok((chain, key))
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Agents with the CA, each waiting until its pod's certificate is ready.
fn agents(w: &World, ca: &Ca) -> Result<(Agent, Agent)> {
    Ok((
        crate::agent_with_ca(w, "node1", "client", &ca.client_args("node1"), &[])?,
        crate::agent_with_ca(w, "node2", "server", &ca.client_args("node2"), &[])?,
    ))
}

/// `hbone_peer.py client` in `pod`; its report and exit code.
pub(crate) fn peer_client(w: &World, pod: &str, tls: [&Path; 3], args: &[&str]) -> Result<(Value, Option<i32>)> {
    let [cert, key, ca] = tls;
    let out = output_within(
        w.cluster
            .pod(pod)
            .try_command("python3")?
            .arg(peer_app())
            .arg("client")
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--ca")
            .arg(ca)
            .args(["--timeout", "15"])
            .args(args),
        Duration::from_secs(30),
    )?;
    Ok((report(&out)?, out.status.code()))
}

/// `hbone_peer.py server` in a pod, its output in files; killed on drop.
pub(crate) struct PeerServer {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl PeerServer {
    pub(crate) fn start(w: &World, pod: &str, cert: &Path, key: &Path, ca: &Path) -> Result<PeerServer> {
        let (out, err) = (
            w.dir.join(format!("hbone-peer-{pod}.out")),
            w.dir.join(format!("hbone-peer-{pod}.err")),
        );
        let child = w
            .cluster
            .pod(pod)
            .try_command("python3")?
            .arg(peer_app())
            .args(["server", "--listen", "[::]:15008", "--trust-domain", "cluster.local"])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--ca")
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()?;
        let mut s = PeerServer { child, out, err };
        s.wait_lines(|l| l.iter().any(|l| l.get("listening").is_some()))?;
        Ok(s)
    }

    pub(crate) fn lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded) until `pred` holds for the printed lines.
    pub(crate) fn wait_lines(&mut self, pred: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
        mesh::poll(WAIT, || {
            let lines = self.lines();
            if pred(&lines) {
                return Ok(Some(lines));
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("hbone_peer.py server exited ({status})");
            }
            Ok(None)
        })
        .with_context(|| {
            format!(
                "hbone_peer.py server:\n{}{}",
                fs::read_to_string(&self.out).unwrap_or_default(),
                fs::read_to_string(&self.err).unwrap_or_default()
            )
        })
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An unmodified TCP client: sends MESSAGE x REPEAT, half-closes, reads the
/// echo to the end (the Python server echoes only, no greeting line).
const PLAIN_CLIENT: &str = r#"
import json, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
msg = sys.argv[3].encode() * int(sys.argv[4])
s = socket.create_connection((host, port), timeout=15)
def send():
    s.sendall(msg)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send)
t.start()
buf = bytearray()
while True:
    c = s.recv(1 << 20)
    if not c:
        break
    buf += c
t.join()
print(json.dumps({"sent": len(msg), "echoed": len(buf), "echo_ok": bytes(buf) == msg,
                  "head": bytes(buf[:64]).decode(errors="replace")}))
"#;

fn plain_client(w: &World, pod: &str, host: &str, message: &str, repeat: u64) -> Result<Value> {
    plain_client_at(w, pod, host, APP_PORT, message, repeat)
}

/// [`plain_client`] to any port: the report, or an error when the
/// connection failed (refused or reset: no JSON).
pub(crate) fn plain_client_at(
    w: &World,
    pod: &str,
    host: &str,
    port: u16,
    message: &str,
    repeat: u64,
) -> Result<Value> {
    let out = output_within(
        w.cluster.pod(pod).try_command("python3")?.args([
            "-c",
            PLAIN_CLIENT,
            host,
            &port.to_string(),
            message,
            &repeat.to_string(),
        ]),
        Duration::from_secs(30),
    )?;
    report(&out)
}

/// A certificate chained to the mesh root (signed with its key by openssl,
/// outside our CA) for an identity of another trust domain.
fn foreign_trust_domain_cert(w: &World, ca: &Ca) -> Result<(PathBuf, PathBuf)> {
    let d = &w.dir;
    let (key, csr, cert, ext) = (
        d.join("other-key.pem"),
        d.join("other.csr"),
        d.join("other-chain.pem"),
        d.join("other.ext"),
    );
    fs::write(
        &ext,
        "subjectAltName=critical,URI:spiffe://other.local/ns/default/sa/client\n\
         extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n\
         basicConstraints=critical,CA:FALSE\n",
    )?;
    let openssl = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let out = output_within(Command::new("openssl").args(args), WAIT)?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let s = |x: &'static str| std::ffi::OsStr::new(x);
    openssl(&[
        s("req"),
        s("-new"),
        s("-newkey"),
        s("ec"),
        s("-pkeyopt"),
        s("ec_paramgen_curve:prime256v1"),
        s("-nodes"),
        s("-subj"),
        s("/O=interop"),
        s("-keyout"),
        key.as_os_str(),
        s("-out"),
        csr.as_os_str(),
    ])?;
    let root_key = ca.dir.join("root-key.pem");
    let root = ca.root();
    openssl(&[
        s("x509"),
        s("-req"),
        s("-in"),
        csr.as_os_str(),
        s("-CA"),
        root.as_os_str(),
        s("-CAkey"),
        root_key.as_os_str(),
        s("-set_serial"),
        s("7"),
        s("-days"),
        s("1"),
        s("-extfile"),
        ext.as_os_str(),
        s("-out"),
        cert.as_os_str(),
    ])?;
    Ok((cert, key))
}

/// `00-<32 hex>-<16 hex>-00`.
fn is_traceparent(v: &Value) -> bool {
    let parts: Vec<&str> = v.as_str().unwrap_or_default().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    matches!(parts.as_slice(), [v, t, s, f] if *v == "00" && hex(t, 32) && hex(s, 16) && *f == "00")
}

/// Waits (bounded) for an agent log line "HBONE connection failed" whose error contains `text`.
fn wait_refusal_logged(a: &Agent, text: &str) -> Result<()> {
    mesh::poll(WAIT, || {
        Ok(a.logs()
            .iter()
            .any(|l| l["message"] == "HBONE connection failed" && l["error"].as_str().unwrap_or("").contains(text))
            .then_some(()))
    })
    .with_context(|| {
        format!(
            "agent on {} did not log a refusal with `{text}`:\n{}",
            a.node,
            a.raw_log()
        )
    })
}

#[test]
fn an_independent_hbone_peer_interoperates_with_the_agent_in_both_directions() -> Result<()> {
    let w = World::new("interop")?;
    add_external_pod(&w)?;
    let ca = Ca::start(&w)?;
    let _app = Server::start(w.cluster.pod("server"), &[APP_PORT])?;
    let (a1, a2) = agents(&w, &ca)?;
    let root = ca.root();
    let (client_chain, client_key) = ca.request(&w, "node1", "node1", CLIENT_ID)?;

    // 1. A foreign client (in the unenrolled `outsider` pod, so not captured)
    //    dials the server pod's 15008 as the client identity: our agent on
    //    node2 terminates the tunnel and reaches the application.
    let server4 = w.ip4("server");
    let hbone = format!("{server4}:15008");
    let dst = format!("{server4}:{APP_PORT}");
    let as_client = [client_chain.as_path(), &client_key, &root];
    let connect = |authority: &str, tls: [&Path; 3], rest: &[&str]| {
        let mut args = vec![
            "--connect",
            hbone.as_str(),
            "--authority",
            authority,
            "--expect-id",
            SERVER_ID,
        ];
        args.extend(rest);
        peer_client(&w, "outsider", tls, &args)
    };
    const MSG: &str = "hello over a foreign HBONE client";
    let (r, code) = connect(&dst, as_client, &["--message", MSG, "--skip-line"])?;
    assert_eq!((r["status"].as_u64(), code), (Some(200), Some(0)), "{r}");
    assert_eq!(r["echo"], MSG, "{r}");
    assert_eq!(r["peer_id"], SERVER_ID, "{r}");
    assert_eq!(
        (r["tls"].as_str(), r["alpn"].as_str()),
        (Some("TLSv1.3"), Some("h2")),
        "{r}"
    );
    // The application was reached at the CONNECT's :authority.
    let hello: Value = serde_json::from_str(r["first_line"].as_str().unwrap_or_default())?;
    assert_eq!(hello["server_local"], dst.as_str(), "{r}");
    eprintln!("foreign client -> agent: {r}");

    // 4 concurrent streams on one TLS connection, 1 MiB each way with a
    // half-close: multiplexing and flow control with a foreign h2 stack.
    let size = MIB.to_string();
    let (big, _) = connect(&dst, as_client, &["--size", &size, "--streams", "4", "--skip-line"])?;
    assert_eq!(
        (big["status"].as_u64(), big["streams_ok"].as_u64()),
        (Some(200), Some(4)),
        "{big}"
    );
    assert_eq!(
        (big["echo_ok"].as_bool(), big["echoed"].as_u64()),
        (Some(true), Some(MIB)),
        "{big}"
    );

    let inb = a2.wait_access(WAIT, |l| access_to(l, &dst).len() >= 5)?;
    let outsider4 = w.ip4("outsider");
    for i in &access_to(&inb, &dst) {
        assert_eq!(
            (i["direction"].as_str(), i["protocol"].as_str(), i["mtls"].as_bool()),
            (Some("inbound"), Some("hbone"), Some(true)),
            "{i}"
        );
        assert_eq!(
            (i["src_identity"].as_str(), i["dst_identity"].as_str()),
            (Some(CLIENT_ID), Some(SERVER_ID)),
            "{i}"
        );
        assert!(i["src"].as_str().unwrap_or("").starts_with(&outsider4), "{i}");
    }
    // The four big ones came over one TCP (and TLS) connection.
    let big_srcs: Vec<Value> = access_to(&inb, &dst)
        .into_iter()
        .filter(|i| i["bytes_sent"] == MIB && i["bytes_received"].as_u64() > Some(MIB))
        .map(|i| i["src"].clone())
        .collect();
    assert!(
        big_srcs.len() == 4 && big_srcs.iter().all(|s| *s == big_srcs[0]),
        "{inb:?}"
    );

    // Status codes: an :authority that is not this pod's -> 400; nothing
    // listening at the :authority -> 503.
    let (r, code) = connect(
        &format!("{}:{APP_PORT}", w.ip4("backend")),
        as_client,
        &["--message", "x"],
    )?;
    assert_eq!((r["status"].as_u64(), code), (Some(400), Some(1)), "{r}");
    let (r, code) = connect(&format!("{server4}:9"), as_client, &["--message", "x"])?;
    assert_eq!((r["status"].as_u64(), code), (Some(503), Some(1)), "{r}");

    // Refused at TLS: a node credential (chained to the root, but no workload
    // identity) and a workload identity of another trust domain.
    let node_creds = ca.dir.join("nodes/node1");
    let (node_cert, node_key) = (node_creds.join("cert.pem"), node_creds.join("key.pem"));
    let (r, code) = connect(&dst, [node_cert.as_path(), &node_key, &root], &["--message", "x"])?;
    assert!(
        code == Some(2) && r.get("status").is_none(),
        "node credential accepted: {r}"
    );
    wait_refusal_logged(&a2, "has no SPIFFE identity")?;
    let (other_cert, other_key) = foreign_trust_domain_cert(&w, &ca)?;
    let (r, code) = connect(&dst, [other_cert.as_path(), &other_key, &root], &["--message", "x"])?;
    assert!(
        code == Some(2) && r.get("status").is_none(),
        "other trust domain accepted: {r}"
    );
    wait_refusal_logged(&a2, "is not in trust domain cluster.local")?;

    // 2. Our agent dials a foreign server: `ext` (pretend node `external`,
    //    nobody's agent) lives in the backend pod's netns; an unmodified
    //    client in the enrolled `client` pod connects to backend:8080 and
    //    agent1 tunnels it to backend:15008 as the client identity.
    let (ext_chain, ext_key) = ca.request(&w, "node2", "external", EXT_ID)?;
    let mut peer = PeerServer::start(&w, "backend", &ext_chain, &ext_key, &root)?;
    let backend4 = w.ip4("backend");
    const OUT_MSG: &str = "hello to a foreign HBONE server";
    let r = plain_client(&w, "client", &backend4, OUT_MSG, 1)?;
    assert!(r["echo_ok"] == true && r["head"] == OUT_MSG, "{r}");
    let big = plain_client(&w, "client", &backend4, PATTERN, MIB / PATTERN.len() as u64)?;
    assert!(big["echo_ok"] == true && big["echoed"] == MIB, "{big}");

    let authority = format!("{backend4}:{APP_PORT}");
    let lines = peer.wait_lines(|l| l.iter().filter(|s| s["authority"] == authority.as_str()).count() >= 2)?;
    let streams: Vec<&Value> = lines.iter().filter(|s| s["authority"] == authority.as_str()).collect();
    let client4 = w.ip4("client");
    for s in &streams {
        assert_eq!(
            (s["status"].as_u64(), s.get("error"), s["peer_id"].as_str()),
            (Some(200), None, Some(CLIENT_ID)),
            "{s}"
        );
        assert_eq!(
            (s["tls"].as_str(), s["alpn"].as_str(), &s["sni"]),
            (Some("TLSv1.3"), Some("h2"), &Value::Null),
            "{s}"
        );
        // Ordinary CONNECT: :method and :authority only, no :scheme or :path.
        assert_eq!(s["pseudo"], serde_json::json!([":authority", ":method"]), "{s}");
        let fwd = s["forwarded"].as_str().unwrap_or_default();
        assert!(fwd.starts_with(&format!("for=\"{client4}:")), "forwarded: {s}");
        assert!(is_traceparent(&s["traceparent"]), "traceparent: {s}");
        let baggage = s["baggage"].as_str().unwrap_or_default();
        assert!(
            baggage.split(',').any(|kv| kv == "k8s.namespace.name=default"),
            "baggage: {s}"
        );
    }
    assert_ne!(
        streams[0]["traceparent"], streams[1]["traceparent"],
        "fresh per connection"
    );
    assert_eq!(
        streams
            .iter()
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>(),
        vec![OUT_MSG.len() as u64, MIB]
    );
    eprintln!("agent -> foreign server, streams seen: {streams:?}");

    let out = a1.wait_access(WAIT, |l| access_to(l, &authority).len() >= 2)?;
    for o in &access_to(&out, &authority) {
        assert_eq!(
            (o["direction"].as_str(), o["protocol"].as_str(), o["mtls"].as_bool()),
            (Some("outbound"), Some("hbone"), Some(true)),
            "{o}"
        );
        assert_eq!(
            (o["src_identity"].as_str(), o["dst_identity"].as_str()),
            (Some(CLIENT_ID), Some(EXT_ID)),
            "{o}"
        );
    }
    Ok(())
}
