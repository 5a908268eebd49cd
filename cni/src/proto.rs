//! The plugin ⇄ agent protocol.
//!
//! One request per connection over the agent's Unix stream socket: the plugin writes one
//! [`Request`] as a single JSON line (terminated by `'\n'`), shuts down its write half, and
//! reads one [`Reply`] JSON line back. The agent then closes the connection.
//!
//! Example exchange:
//!
//! ```text
//! → {"command":"ADD","containerId":"c1","netns":"/var/run/netns/cni-1","podNamespace":"default",
//!    "podName":"web-0","podUid":"5f1c…","ips":["10.244.1.7","fd00::7"]}
//! ← {"ok":true,"enrolled":true,"message":"captured"}
//! ```
//!
//! Compatibility: fields may be added to either message in later versions; readers must ignore
//! unknown fields (serde's default) and new [`Reply`] fields carry `#[serde(default)]`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where the agent listens by default (a hostPath shared with the runtime's plugin process).
pub const DEFAULT_SOCKET: &str = "/var/run/mesh/cni.sock";

/// Upper bound on one message line, both directions; longer lines are a protocol error.
pub const MAX_LINE: usize = 64 * 1024;

/// The CNI operation the request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// A pod sandbox was created (after the main plugin set up its network).
    Add,
    /// A pod sandbox is being torn down. May be repeated; the netns may already be gone.
    Del,
    /// The runtime asks whether the pod's setup is still as ADD left it.
    Check,
}

/// One request per connection, one JSON line each way, over the agent's Unix socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: Command,
    /// `CNI_CONTAINERID`: the sandbox (pause container) ID.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace (may be empty on DEL).
    pub netns: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `K8S_POD_UID` from `CNI_ARGS` (may be empty with old runtimes).
    pub pod_uid: String,
    /// The pod's addresses, from `prevResult.ips[].address` without the `/prefix`.
    pub ips: Vec<IpAddr>,
}

/// The agent's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// Whether the agent handled the request. On ADD and CHECK, `false` fails the pod sandbox.
    pub ok: bool,
    /// ADD: whether the pod is now captured (false: not in the mesh, nothing done).
    #[serde(default)]
    pub enrolled: bool,
    /// Why, for logs; on !ok the error the runtime shows in pod events.
    #[serde(default)]
    pub message: String,
}

impl Reply {
    /// A successful reply; `enrolled` says whether the pod is captured.
    pub fn success(enrolled: bool, message: impl Into<String>) -> Self {
        Reply {
            ok: true,
            enrolled,
            message: message.into(),
        }
    }

    /// A failed reply; `message` reaches the pod's events through the runtime.
    pub fn failure(message: impl Into<String>) -> Self {
        Reply {
            ok: false,
            enrolled: false,
            message: message.into(),
        }
    }
}

/// Why [`call`] did not get a [`Reply`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be connected to: the agent is not running or not listening.
    #[error("connect to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The exchange did not complete within the timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Reading or writing the connection failed.
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    /// The agent closed the connection without a reply line.
    #[error("the agent closed the connection without replying")]
    Closed,
    /// The reply line was longer than [`MAX_LINE`].
    #[error("reply longer than {MAX_LINE} bytes")]
    TooLong,
    /// The reply was not a valid [`Reply`].
    #[error("invalid reply: {0}")]
    Decode(#[source] serde_json::Error),
}

impl CallError {
    /// True when the agent could not be reached at all (as opposed to a broken exchange).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, CallError::Connect { .. })
    }
}

/// Sends `req` to the agent listening on `socket` and returns its reply.
///
/// `timeout` bounds the whole exchange after the connection is made (writing the request and
/// reading the reply); connecting to a Unix socket does not wait for the peer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(|source| CallError::Connect {
        socket: socket.to_owned(),
        source,
    })?;

    let mut line = serde_json::to_vec(req).expect("a Request always serializes");
    line.push(b'\n');
    stream
        .set_write_timeout(Some(remaining(deadline, timeout)?))
        .map_err(CallError::Io)?;
    stream.write_all(&line).map_err(|e| io_error(e, timeout))?;
    // The agent may read to EOF; a peer that already closed its side is not our problem here.
    let _ = stream.shutdown(Shutdown::Write);

    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline, timeout)?))
            .map_err(CallError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, timeout)),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_LINE {
            return Err(CallError::TooLong);
        }
    }
    decode_reply(&buf)
}

/// The plugin's side: the agent's reply line as read (up to its `'\n'`).
pub fn decode_reply(line: &[u8]) -> Result<Reply, CallError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(CallError::Closed);
    }
    if line.len() > MAX_LINE {
        return Err(CallError::TooLong);
    }
    serde_json::from_slice(line).map_err(CallError::Decode)
}

/// Why the agent could not read a request line.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("{0} (plugin and agent versions differ?)")]
    Decode(#[source] serde_json::Error),
}

/// The agent's side: one request line as read (with or without its `'\n'`;
/// a reader reads at most `MAX_LINE + 1` bytes, so a longer line shows).
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.strip_suffix(b"\n").unwrap_or(line).len() > MAX_LINE {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice(line).map_err(RequestError::Decode)
}

fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, CallError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(CallError::Timeout(timeout))
    } else {
        Ok(left)
    }
}

fn io_error(e: io::Error, timeout: Duration) -> CallError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CallError::Timeout(timeout),
        _ => CallError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    fn sample() -> Request {
        Request {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/var/run/netns/cni-1".into(),
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-1".into(),
            ips: vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    }

    #[test]
    fn wire_format() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert_eq!(
            json,
            r#"{"command":"ADD","containerId":"c1","netns":"/var/run/netns/cni-1","podNamespace":"default","podName":"web-0","podUid":"uid-1","ips":["10.244.1.7","fd00::7"]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), sample());
        assert_eq!(serde_json::to_string(&Command::Del).unwrap(), r#""DEL""#);
        assert_eq!(serde_json::to_string(&Command::Check).unwrap(), r#""CHECK""#);
        // Missing optional reply fields default; unknown ones are ignored.
        let r: Reply = serde_json::from_str(r#"{"ok":true,"future":1}"#).unwrap();
        assert_eq!(r, Reply::success(false, ""));
    }

    #[test]
    fn call_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-proto-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            // 1: a proper reply; 2: close without replying; 3: garbage.
            for (i, conn) in listener.incoming().take(3).enumerate() {
                let mut conn = conn.unwrap();
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                let req: Request = serde_json::from_str(&line).unwrap();
                assert_eq!(req, sample());
                match i {
                    0 => conn
                        .write_all(b"{\"ok\":true,\"enrolled\":true,\"message\":\"hi\"}\n")
                        .unwrap(),
                    1 => {}
                    _ => conn.write_all(b"not json\n").unwrap(),
                }
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(call(&sock, &sample(), t).unwrap(), Reply::success(true, "hi"));
        assert!(matches!(call(&sock, &sample(), t), Err(CallError::Closed)));
        assert!(matches!(call(&sock, &sample(), t), Err(CallError::Decode(_))));
        server.join().unwrap();
        let err = call(&dir.join("missing.sock"), &sample(), t).unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn call_times_out() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-proto-to-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // Accepted by the kernel (backlog) but never answered.
        let err = call(&sock, &sample(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, CallError::Timeout(_)), "{err}");
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
