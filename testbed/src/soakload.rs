//! The soak's load (`cargo xtask soak`): an echo server that checksums
//! what it received, and a client that a controller drives with JSON
//! commands on stdin (one reply line on stdout per command, with its `id`).
//!
//! * Server: echoes every byte; when the client half-closes it writes
//!   [`TRAILER`] and the SHA-256 of everything it received, then closes.
//! * `hold`: opens connections and keeps them; each is proven end to end by
//!   one echoed line before it counts.
//! * `ping`: one line there and back on every held connection (dead ones
//!   are dropped and counted); `close`: half-close each, and compare the
//!   server's checksum with the client's own of every byte it sent.
//! * `loop` (until `stop`) and `probe`: new connections one after the
//!   other (connect, a line, the checksum), outcomes counted by kind:
//!   refused (fail closed), broken (cut after the connect), timeout, and
//!   mismatched (bytes that came back wrong: data lost).
//! * `stream`: bulk bytes (seeded pseudo-random, the marker every 64 KiB),
//!   echoed while sent; the SHA-256 of what was sent, of the echo, and the
//!   server's are compared.
//!
//! Every payload carries the run's marker so a capture of the wire can
//! prove that none of it ever crossed in plaintext. Every wait is bounded;
//! a loop stops by itself after [`LOOP_MAX`] at the latest, and the client
//! exits when its stdin closes (its controller is gone).
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

/// What the server writes before its SHA-256 when the client half-closes.
pub const TRAILER: &[u8] = b"SOAK-SHA256:";
const DIGEST_LEN: usize = 32;
/// Bound on a connect, and on one echoed line.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections in setup (or pinged) at once per client.
const CONCURRENCY: usize = 256;
/// A loop ends by itself after this long, `stop` or not.
const LOOP_MAX: Duration = Duration::from_secs(1800);
/// Bound on a whole stream: this long plus one second per 8 MiB.
const STREAM_BASE: Duration = Duration::from_secs(60);
/// The stream's chunk; each starts with the marker.
const CHUNK: usize = 64 << 10;

/// Echoes each connection; on the client's half-close writes the trailer and
/// closes. Runs until the process ends.
pub async fn serve(l: TcpListener) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        tokio::spawn(echo_one(s));
    }
}

async fn echo_one(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                ctx.update(&buf[..n]);
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let mut trailer = TRAILER.to_vec();
    trailer.extend_from_slice(ctx.finish().as_ref());
    let _ = s.write_all(&trailer).await;
    let _ = s.shutdown().await;
}

/// How one new connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The connect was refused: what an enrolled pod sees with no agent (fail closed).
    Refused,
    /// Connected, then cut (reset, early EOF) before the exchange finished.
    Broken,
    Timeout,
    /// Bytes came back different from what was sent: data lost.
    Mismatched,
}

/// Counts of [`Outcome`]s, and the first failure's text.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Tally {
    pub ok: u64,
    pub refused: u64,
    pub broken: u64,
    pub timeout: u64,
    pub mismatched: u64,
    pub first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, o: Outcome, err: Option<String>) {
        *match o {
            Outcome::Ok => &mut self.ok,
            Outcome::Refused => &mut self.refused,
            Outcome::Broken => &mut self.broken,
            Outcome::Timeout => &mut self.timeout,
            Outcome::Mismatched => &mut self.mismatched,
        } += 1;
        if o != Outcome::Ok && self.first_error.is_none() {
            self.first_error = err;
        }
    }

    pub fn failed(&self) -> u64 {
        self.refused + self.broken + self.timeout + self.mismatched
    }
}

/// A failure of one step, already classified.
struct Failure(Outcome, String);

fn classify(what: &str, e: std::io::Error) -> Failure {
    let o = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        std::io::ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Broken,
    };
    Failure(o, format!("{what}: {e}"))
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| classify(what, e)),
        Err(_) => Err(Failure(Outcome::Timeout, format!("{what} timed out"))),
    }
}

/// A held connection and the checksum of every byte it sent.
struct Held {
    s: TcpStream,
    sent: Context,
    seq: u64,
    id: usize,
}

impl Held {
    async fn connect(addr: SocketAddr, id: usize) -> Result<Held, Failure> {
        let s = bounded("connect", TcpStream::connect(addr)).await?;
        let _ = s.set_nodelay(true);
        Ok(Held {
            s,
            sent: Context::new(&SHA256),
            seq: 0,
            id,
        })
    }

    /// One line there and back: `<marker> <id> <seq>`, padded to a fixed size.
    async fn ping(&mut self, marker: &str) -> Result<(), Failure> {
        self.seq += 1;
        let line = format!("{marker} {:08} {:012}\n", self.id, self.seq);
        self.sent.update(line.as_bytes());
        bounded("write", self.s.write_all(line.as_bytes())).await?;
        let mut back = vec![0u8; line.len()];
        bounded("read", self.s.read_exact(&mut back)).await?;
        if back != line.as_bytes() {
            return Err(Failure(
                Outcome::Mismatched,
                format!("sent {line:?}, got {:?}", String::from_utf8_lossy(&back)),
            ));
        }
        Ok(())
    }

    /// Half-closes and checks the server's checksum against our own.
    async fn close(mut self) -> Result<(), Failure> {
        bounded("shutdown", self.s.shutdown()).await?;
        let mut rest = Vec::new();
        bounded("read", self.s.read_to_end(&mut rest)).await?;
        check_trailer(&rest, self.sent.finish().as_ref())
    }
}

fn check_trailer(got: &[u8], want: &[u8]) -> Result<(), Failure> {
    match got.strip_prefix(TRAILER) {
        Some(digest) if digest == want => Ok(()),
        Some(_) => Err(Failure(
            Outcome::Mismatched,
            "the server's checksum differs from the client's".into(),
        )),
        None => Err(Failure(
            Outcome::Broken,
            format!("no checksum trailer at the end ({} bytes)", got.len()),
        )),
    }
}

/// One new connection: connect, a line there and back, the checksum.
pub async fn one_connection(addr: SocketAddr, marker: &str, id: usize) -> (Outcome, Option<String>) {
    let r = async {
        let mut h = Held::connect(addr, id).await?;
        h.ping(marker).await?;
        h.close().await
    }
    .await;
    match r {
        Ok(()) => (Outcome::Ok, None),
        Err(Failure(o, e)) => (o, Some(e)),
    }
}

/// The client's state: its held connections and the stop signal of its loops.
pub struct Client {
    addr: SocketAddr,
    marker: String,
    held: Mutex<Vec<Held>>,
    next_id: Mutex<usize>,
    /// Bumped by `stop`: a loop ends once it differs from its start value.
    stop: watch::Sender<u64>,
}

impl Client {
    pub fn new(addr: SocketAddr, marker: &str) -> Arc<Client> {
        Arc::new(Client {
            addr,
            marker: marker.to_string(),
            held: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
            stop: watch::channel(0).0,
        })
    }

    fn ids(&self, n: usize) -> std::ops::Range<usize> {
        let mut next = self.next_id.lock().unwrap();
        let start = *next;
        *next += n;
        start..*next
    }

    /// Opens `n` connections, `CONCURRENCY` at a time, each proven by a line.
    pub async fn hold(&self, n: usize) -> Value {
        let start = Instant::now();
        let marker = self.marker.clone();
        let addr = self.addr;
        let results: Vec<Result<Held, Failure>> = futures::stream::iter(self.ids(n))
            .map(|id| {
                let marker = marker.clone();
                async move {
                    let mut h = Held::connect(addr, id).await?;
                    h.ping(&marker).await?;
                    Ok(h)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut tally = Tally::default();
        let mut held = Vec::new();
        for r in results {
            match r {
                Ok(h) => {
                    tally.add(Outcome::Ok, None);
                    held.push(h);
                }
                Err(Failure(o, e)) => tally.add(o, Some(e)),
            }
        }
        let total = {
            let mut all = self.held.lock().unwrap();
            all.extend(held);
            all.len()
        };
        json!({"opened": tally.ok, "tally": tally, "held": total, "seconds": start.elapsed().as_secs_f64()})
    }

    /// A line there and back on every held connection; the dead are dropped.
    pub async fn ping(&self) -> Value {
        let start = Instant::now();
        let all = std::mem::take(&mut *self.held.lock().unwrap());
        let marker = self.marker.clone();
        let results: Vec<(Held, Result<(), Failure>)> = futures::stream::iter(all)
            .map(|mut h| {
                let marker = marker.clone();
                async move {
                    let r = h.ping(&marker).await;
                    (h, r)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut tally = Tally::default();
        let mut alive = Vec::new();
        for (h, r) in results {
            match r {
                Ok(()) => {
                    tally.add(Outcome::Ok, None);
                    alive.push(h);
                }
                Err(Failure(o, e)) => tally.add(o, Some(e)),
            }
        }
        self.held.lock().unwrap().extend(alive);
        json!({"alive": tally.ok, "dead": tally.failed(), "tally": tally, "seconds": start.elapsed().as_secs_f64()})
    }

    /// Half-closes every held connection and checks each one's checksum.
    pub async fn close(&self) -> Value {
        let all = std::mem::take(&mut *self.held.lock().unwrap());
        let results: Vec<Result<(), Failure>> = futures::stream::iter(all)
            .map(Held::close)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut tally = Tally::default();
        for r in results {
            match r {
                Ok(()) => tally.add(Outcome::Ok, None),
                Err(Failure(o, e)) => tally.add(o, Some(e)),
            }
        }
        json!({"verified": tally.ok, "tally": tally})
    }

    /// New connections one after the other, `interval` apart, until `stop`,
    /// `max` connections or [`LOOP_MAX`].
    pub async fn run_loop(&self, interval: Duration, max: u64) -> Value {
        let mut stop = self.stop.subscribe();
        let generation = *stop.borrow_and_update();
        let deadline = Instant::now() + LOOP_MAX;
        let mut tally = Tally::default();
        let mut n = 0u64;
        while *stop.borrow_and_update() == generation && n < max && Instant::now() < deadline {
            let id = self.ids(1).start;
            let (o, e) = one_connection(self.addr, &self.marker, id).await;
            tally.add(o, e);
            n += 1;
            // Woken early by `stop`.
            let _ = tokio::time::timeout(interval, stop.changed()).await;
        }
        json!({"tally": tally})
    }

    /// `n` new connections one after the other.
    pub async fn probe(&self, n: u64) -> Value {
        let mut tally = Tally::default();
        for _ in 0..n {
            let id = self.ids(1).start;
            let (o, e) = one_connection(self.addr, &self.marker, id).await;
            tally.add(o, e);
        }
        json!({"tally": tally})
    }

    /// Ends every running loop (each replies with its tally); later loops run.
    pub fn stop_loops(&self) {
        self.stop.send_modify(|g| *g += 1);
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Streams `bytes` through an echo connection (see [`stream`]).
    pub async fn stream(&self, bytes: u64, seed: u64) -> Value {
        serde_json::to_value(stream(self.addr, &self.marker, bytes, seed).await).unwrap_or_default()
    }

    /// Runs one command line; its reply (`command_error` for a bad one) carries its `id`.
    pub async fn command(self: &Arc<Self>, line: &str) -> Value {
        let cmd: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return json!({"command_error": format!("not JSON: {e}")}),
        };
        let number = |k: &str| cmd[k].as_u64().unwrap_or(0);
        let mut reply = match cmd["op"].as_str().unwrap_or_default() {
            "hold" => self.hold(number("n") as usize).await,
            "ping" => self.ping().await,
            "close" => self.close().await,
            "loop" => {
                self.run_loop(Duration::from_millis(number("interval_ms")), number("max"))
                    .await
            }
            "probe" => self.probe(number("n")).await,
            "stop" => {
                self.stop_loops();
                json!({})
            }
            "stream" => self.stream(number("bytes"), number("seed")).await,
            other => json!({"command_error": format!("unknown op {other:?}")}),
        };
        reply["id"] = cmd["id"].clone();
        reply
    }
}

/// Runs the commands of `lines` until it closes; each runs as its own task
/// (a `loop` runs while `ping`s come and go) and prints one reply line.
pub async fn drive(client: Arc<Client>, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = lines.recv().await {
        let client = client.clone();
        tokio::spawn(async move {
            let reply = client.command(&line).await;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{reply}");
            let _ = out.flush();
        });
    }
}

/// The lines of stdin, read on a thread of their own (blocking reads);
/// the channel closes with stdin.
pub fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What one stream carried, and whether both ends agree.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub bytes: u64,
    pub echoed: u64,
    pub sent_sha256: String,
    pub echoed_sha256: String,
    pub server_sha256: String,
    /// Sent, echoed and the server's checksums are equal, every byte came back.
    pub verified: bool,
    pub seconds: f64,
    pub error: Option<String>,
}

/// The seeded pseudo-random stream (xorshift64*), the marker at the start
/// of every [`CHUNK`].
struct Source {
    state: u64,
    marker: Vec<u8>,
}

impl Source {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
        let m = self.marker.len().min(buf.len());
        buf[..m].copy_from_slice(&self.marker[..m]);
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `bytes` to the echo at `addr` while reading the echo back, then
/// half-closes and reads the server's checksum.
pub async fn stream(addr: SocketAddr, marker: &str, bytes: u64, seed: u64) -> StreamReport {
    let start = Instant::now();
    let limit = STREAM_BASE + Duration::from_secs(bytes >> 23);
    let mut report = StreamReport {
        bytes,
        echoed: 0,
        sent_sha256: String::new(),
        echoed_sha256: String::new(),
        server_sha256: String::new(),
        verified: false,
        seconds: 0.0,
        error: None,
    };
    let run = stream_inner(addr, marker, bytes, seed, &mut report);
    if tokio::time::timeout(limit, run).await.is_err() {
        report.error = Some(format!("not done within {limit:?}"));
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

async fn stream_inner(addr: SocketAddr, marker: &str, bytes: u64, seed: u64, report: &mut StreamReport) {
    let s = match bounded("connect", TcpStream::connect(addr)).await {
        Ok(s) => s,
        Err(Failure(_, e)) => {
            report.error = Some(e);
            return;
        }
    };
    let (mut rd, mut wr) = s.into_split();
    let mut src = Source {
        state: seed | 1,
        marker: marker.as_bytes().to_vec(),
    };
    let writer = tokio::spawn(async move {
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            src.fill(&mut buf[..n]);
            ctx.update(&buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(ctx.finish())
    });
    // The echo: exactly `bytes`, then the trailer up to EOF.
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut tail = Vec::new();
    let read = async {
        loop {
            let n = match tokio::time::timeout(STEP_TIMEOUT * 3, rd.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "echo stalled")),
            };
            if n == 0 {
                return Ok(());
            }
            let echo_left = (bytes - report.echoed) as usize;
            let e = n.min(echo_left);
            ctx.update(&buf[..e]);
            report.echoed += e as u64;
            tail.extend_from_slice(&buf[e..n]);
            if tail.len() > TRAILER.len() + DIGEST_LEN {
                return Err(std::io::Error::other("more bytes came back than were sent"));
            }
        }
    }
    .await;
    let sent = match writer.await {
        Ok(Ok(d)) => Some(d),
        Ok(Err(e)) => {
            report.error.get_or_insert(format!("write: {e}"));
            None
        }
        Err(e) => {
            report.error.get_or_insert(format!("writer: {e}"));
            None
        }
    };
    if let Err(e) = read {
        report.error.get_or_insert(format!("read: {e}"));
    }
    let echoed = ctx.finish();
    report.echoed_sha256 = hex(echoed.as_ref());
    report.server_sha256 = tail.strip_prefix(TRAILER).map(hex).unwrap_or_default();
    if let Some(sent) = sent {
        report.sent_sha256 = hex(sent.as_ref());
        report.verified = report.echoed == bytes
            && report.sent_sha256 == report.echoed_sha256
            && report.sent_sha256 == report.server_sha256;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l));
        addr
    }

    #[tokio::test]
    async fn held_connections_echo_pings_and_close_with_matching_checksums() {
        let c = Client::new(server().await, "MARK");
        let r = c.hold(40).await;
        assert_eq!((r["opened"].as_u64(), r["held"].as_u64()), (Some(40), Some(40)), "{r}");
        for _ in 0..3 {
            let r = c.ping().await;
            assert_eq!((r["alive"].as_u64(), r["dead"].as_u64()), (Some(40), Some(0)), "{r}");
        }
        let r = c.close().await;
        assert_eq!(r["verified"], 40, "{r}");
        assert_eq!(c.held(), 0);
    }

    #[tokio::test]
    async fn a_stream_is_verified_by_the_checksums_of_both_ends() {
        let r = stream(server().await, "MARK", (3 << 20) + 17, 7).await;
        assert!(r.verified, "{r:?}");
        assert_eq!(r.echoed, (3 << 20) + 17);
        assert_eq!(r.sent_sha256.len(), 64);
        // Another seed, other bytes.
        let other = stream(server().await, "MARK", (3 << 20) + 17, 8).await;
        assert!(other.verified && other.sent_sha256 != r.sent_sha256, "{other:?}");
    }

    #[tokio::test]
    async fn a_corrupting_peer_is_caught_as_mismatched_data() {
        // An "echo" that flips one byte of what it returns.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        buf[0] ^= 1;
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let (o, e) = one_connection(addr, "MARK", 1).await;
        assert_eq!(o, Outcome::Mismatched, "{e:?}");
        let r = stream(addr, "MARK", 1 << 20, 3).await;
        assert!(!r.verified && r.sent_sha256 != r.echoed_sha256, "{r:?}");
    }

    #[tokio::test]
    async fn connects_to_a_closed_port_count_as_refused_and_loops_stop_when_told() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let c = Client::new(closed, "MARK");
        let r = c.probe(5).await;
        assert_eq!(r["tally"]["refused"], 5, "{r}");
        assert_eq!(r["tally"]["ok"], 0, "{r}");

        let c = Client::new(server().await, "MARK");
        let looping = tokio::spawn({
            let c = c.clone();
            async move { c.run_loop(Duration::from_millis(5), u64::MAX).await }
        });
        // Stopped once it has made some connections.
        for _ in 0..1000 {
            if *c.next_id.lock().unwrap() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.stop_loops();
        let r = tokio::time::timeout(Duration::from_secs(10), looping)
            .await
            .unwrap()
            .unwrap();
        assert!(r["tally"]["ok"].as_u64().unwrap() >= 5, "{r}");
        assert_eq!(r["tally"]["mismatched"], 0, "{r}");
    }

    #[tokio::test]
    async fn commands_reply_with_their_id() {
        let c = Client::new(server().await, "MARK");
        let r = c.command(r#"{"id": 9, "op": "hold", "n": 3}"#).await;
        assert_eq!((r["id"].as_u64(), r["opened"].as_u64()), (Some(9), Some(3)), "{r}");
        let r = c.command(r#"{"id": 10, "op": "nope"}"#).await;
        assert!(r["command_error"].as_str().unwrap().contains("nope"), "{r}");
    }
}
