//! The controller's end of one `mesh-echo soak-client` (or `soak-serve`)
//! process in a pod: JSON commands to its stdin, replies from its stdout,
//! matched by id, every wait bounded. Killed on drop; a client also exits
//! by itself when its stdin closes.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use testbed::{mesh, Pod};

/// A soak client in a pod.
pub struct Worker {
    pub pod: String,
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<Value>,
    early: HashMap<u64, Value>,
    next: u64,
}

impl Worker {
    /// `mesh-echo soak-client` in `pod`'s netns and `cgroup`, against `addr`.
    pub fn start(pod: &Pod, cgroup: &Path, addr: &str, marker: &str, log: &Path) -> Result<Worker> {
        let mut cmd = pod.try_command_in(mesh::binary("mesh-echo")?, cgroup)?;
        cmd.args(["soak-client", "--addr", addr, "--marker", marker]);
        Worker::spawn(cmd, &pod.name, log)
    }

    fn spawn(mut cmd: Command, pod: &str, log: &Path) -> Result<Worker> {
        let err = std::fs::File::create(log)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start the soak client in {pod}"))?;
        let stdin = child.stdin.take().context("stdin not piped")?;
        let stdout = child.stdout.take().context("stdout not piped")?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({"unparsed": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Ok(Worker {
            pod: pod.to_string(),
            child,
            stdin,
            replies,
            early: HashMap::new(),
            next: 0,
        })
    }

    /// Sends `op` (an object with `op` and its arguments); returns its id.
    pub fn send(&mut self, mut op: Value) -> Result<u64> {
        self.next += 1;
        op["id"] = json!(self.next);
        writeln!(self.stdin, "{op}").with_context(|| format!("the soak client in {} is gone", self.pod))?;
        self.stdin.flush()?;
        Ok(self.next)
    }

    /// The reply to command `id`, waiting at most `timeout`.
    pub fn wait(&mut self, id: u64, timeout: Duration) -> Result<Value> {
        if let Some(v) = self.early.remove(&id) {
            return Ok(v);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = match self.replies.recv_timeout(left) {
                Ok(v) => v,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "the soak client in {} did not answer command {id} within {timeout:?}",
                        self.pod
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the soak client in {} exited: {:?}", self.pod, self.child.try_wait())
                }
            };
            if let Some(error) = v.get("command_error") {
                bail!("the soak client in {} refused command {id}: {error}", self.pod);
            }
            match v["id"].as_u64() {
                Some(got) if got == id => return Ok(v),
                Some(got) => {
                    self.early.insert(got, v);
                }
                None => bail!("the soak client in {} printed {v}", self.pod),
            }
        }
    }

    pub fn call(&mut self, op: Value, timeout: Duration) -> Result<Value> {
        let id = self.send(op)?;
        self.wait(id, timeout)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `mesh-echo soak-serve` in a pod, once it listens; killed on drop.
pub struct EchoServer(Child);

impl EchoServer {
    pub fn start(pod: &Pod, cgroup: &Path, port: u16) -> Result<EchoServer> {
        let mut child = pod
            .try_command_in(mesh::binary("mesh-echo")?, cgroup)?
            .args(["soak-serve", "--listen", &format!("0.0.0.0:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the soak echo")?;
        let mut line = String::new();
        BufReader::new(child.stderr.take().context("stderr not piped")?).read_line(&mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the soak echo in {} did not start: {line}", pod.name);
        }
        Ok(EchoServer(child))
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
