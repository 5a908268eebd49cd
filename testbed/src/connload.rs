//! TCP connection load for `cargo xtask bench`: an echo server that answers
//! the first read and closes first (so TIME_WAIT stays on the accepting
//! side and the client's ports never run out), and a client that keeps
//! `concurrency` connections in setup at once (connect, 1 byte there and
//! back, read to EOF, close). Many clients at once measure capacity: the
//! connections per second a node carries, not the latency of one.
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// One connection's connect, and then its echo, may take this long.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// The run stops early after this many failed connections.
const MAX_ERRORS: u64 = 100;

/// Answers each connection's first read with the same bytes, then closes.
pub async fn serve(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            if let Ok(Ok(n)) = tokio::time::timeout(STEP_TIMEOUT, s.read(&mut buf)).await {
                let _ = s.write_all(&buf[..n]).await;
            }
        });
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
    /// The client's own CPU time (user + system) during the run.
    pub cpu_s: f64,
    pub first_error: Option<String>,
}

/// Runs `concurrency` loops of connect + 1-byte echo + close against
/// `addr` for `duration` (or until [`MAX_ERRORS`] connections failed).
pub async fn run(addr: SocketAddr, concurrency: usize, duration: Duration) -> Report {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None));
    let cpu0 = own_cpu_s();
    let start = Instant::now();
    let end = start + duration;
    let loops: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ok, errors, first_error) = (ok.clone(), errors.clone(), first_error.clone());
            tokio::spawn(async move {
                while Instant::now() < end && errors.load(Ordering::Relaxed) < MAX_ERRORS {
                    match one(addr).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for l in loops {
        let _ = l.await;
    }
    let first_error = first_error.lock().unwrap().take();
    Report {
        connections: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        cpu_s: own_cpu_s() - cpu0,
        first_error,
    }
}

async fn one(addr: SocketAddr) -> Result<(), String> {
    let mut s = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.write_all(b"x").await.map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::with_capacity(1);
    tokio::time::timeout(STEP_TIMEOUT, s.read_to_end(&mut got))
        .await
        .map_err(|_| "echo timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if got != b"x" {
        return Err(format!("echo was {got:?}"));
    }
    Ok(())
}

/// This process's user + system CPU seconds.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_loops_complete_echoed_connections_and_stop_by_themselves() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l));
        let r = run(addr, 8, Duration::from_millis(300)).await;
        assert_eq!(r.errors, 0, "{:?}", r.first_error);
        assert!(r.connections >= 8, "{r:?}");
        assert!(r.seconds < 10.0, "{r:?}");
    }

    #[tokio::test]
    async fn a_refusing_server_is_counted_as_errors_and_the_run_ends_early() {
        // A port nobody listens on: every connect is refused.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = run(addr, 4, Duration::from_secs(60)).await;
        assert_eq!(r.connections, 0);
        assert!(r.errors >= MAX_ERRORS, "{r:?}");
        assert!(r.first_error.unwrap().contains("connect"));
        assert!(r.seconds < 30.0, "stopped early");
    }
}
