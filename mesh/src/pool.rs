//! HBONE connection pool: one TLS + HTTP/2 connection per key carries many
//! CONNECT streams (ztunnel's design).
//!
//! * Key: (source identity, acceptable destination identities, destination
//!   address, source IP). Concurrent first dials to one key make one
//!   handshake: the others wait for it.
//! * A connection takes new streams while it is alive, below its stream cap,
//!   and made with the source's *current* certificate: after a rotation old
//!   connections only finish the streams they have. The slot is reserved
//!   when the connection is picked, so concurrent opens never overshoot the
//!   cap (h2 would otherwise queue the extra streams).
//! * A stream the peer did not process (GOAWAY from a draining agent,
//!   REFUSED_STREAM at its limit) is opened again once on a fresh
//!   connection, and the refusing connection takes no new streams.
//! * PING every 10 s, dropped after 20 s without an answer; released after
//!   5 minutes without streams.
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    hbone::{self, ConnectHeaders, HboneError, Timeouts, Tunnel},
    identity::SpiffeId,
};

const STREAMS_PER_CONNECTION: usize = hbone::MAX_STREAMS as usize;
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
const IDLE_RELEASE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: SpiffeId,
    /// Identities the server may present (the key is the whole set).
    pub dst_identities: Vec<SpiffeId>,
    pub dst: SocketAddr,
    pub src_ip: IpAddr,
}

/// One pooled connection.
struct Conn {
    send: SendRequest<Bytes>,
    /// The verified server identity.
    identity: Option<SpiffeId>,
    /// Serial of the certificate the connection was made with.
    serial: String,
    streams: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
}

/// Counts a stream on its connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pooled CONNECT stream: AsyncRead + AsyncWrite, counted on its
/// connection until dropped.
pub struct PooledStream {
    tunnel: Tunnel,
    _guard: StreamGuard,
}

impl PooledStream {
    /// The server's verified identity.
    pub fn peer(&self) -> Option<&SpiffeId> {
        self.tunnel.peer.as_ref()
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tunnel).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tunnel).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tunnel).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tunnel).poll_shutdown(cx)
    }
}

#[derive(Default, Clone)]
pub struct Pool {
    conns: Arc<Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>>,
    /// One dial at a time per key (entries leave when their dial is done).
    dialing: Arc<Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>>,
    timeouts: Timeouts,
}

impl Pool {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            ..Self::default()
        }
    }

    /// A CONNECT stream to `headers.authority` over a pooled connection for
    /// `key`, dialling with `dial` (a TCP connection to the peer's 15008 plus
    /// the TLS config of the certificate `serial`) when none can take it.
    pub async fn connect<D, F>(
        &self,
        key: &PoolKey,
        serial: &str,
        headers: &ConnectHeaders,
        dial: D,
    ) -> Result<(Tunnel, StreamGuard), HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<hbone::Dialed, HboneError>>,
    {
        let mut retried = false;
        loop {
            let (c, guard) = self.checkout(key, serial, &dial).await?;
            match open(&c, guard, headers, &self.timeouts).await {
                Err(e) if e.unprocessed() && !retried => {
                    tracing::debug!(dst = %key.dst, error = %e, "stream not processed by the peer; retrying on a new connection");
                    self.remove(key, &c);
                    retried = true;
                }
                r => return r,
            }
        }
    }

    /// [`Pool::connect`] as one AsyncRead + AsyncWrite value (for an HTTP
    /// client such as hyper's running on the stream); the stream's slot is
    /// held until it is dropped.
    pub async fn connect_stream<D, F>(
        &self,
        key: &PoolKey,
        serial: &str,
        headers: &ConnectHeaders,
        dial: D,
    ) -> Result<PooledStream, HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<hbone::Dialed, HboneError>>,
    {
        let (tunnel, guard) = self.connect(key, serial, headers, dial).await?;
        Ok(PooledStream { tunnel, _guard: guard })
    }

    /// A connection with a reserved stream slot: a pooled one, else a new
    /// one (one dial per key at a time; others wait for it).
    async fn checkout<D, F>(
        &self,
        key: &PoolKey,
        serial: &str,
        dial: &D,
    ) -> Result<(Arc<Conn>, StreamGuard), HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<hbone::Dialed, HboneError>>,
    {
        if let Some(picked) = self.pick(key, serial) {
            return Ok(picked);
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let turn = gate.lock().await;
        // Someone may have dialled while we waited.
        let r = match self.pick(key, serial) {
            Some(picked) => Ok(picked),
            None => self.dial(key, serial, dial).await,
        };
        drop(turn);
        // The last one through removes the gate, so the map stays bounded.
        let mut dialing = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&gate) == 2 {
            dialing.remove(key);
        }
        r
    }

    async fn dial<D, F>(&self, key: &PoolKey, serial: &str, dial: &D) -> Result<(Arc<Conn>, StreamGuard), HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<hbone::Dialed, HboneError>>,
    {
        let dialed = dial().await?;
        let (send, peer) = hbone::handshake(dialed.tcp, dialed.tls, &self.timeouts).await?;
        let c = Arc::new(Conn {
            send: send.clone(),
            identity: peer.identity.clone(),
            serial: serial.to_string(),
            // The dialler's own stream is counted from the start.
            streams: Arc::new(AtomicUsize::new(1)),
            alive: Arc::new(AtomicBool::new(true)),
        });
        tokio::spawn(keepalive(self.clone(), key.clone(), c.clone(), peer.driver));
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(c.clone());
        let guard = StreamGuard(c.streams.clone());
        Ok((c, guard))
    }

    /// A live connection for `key`, made with certificate `serial`, with a
    /// free slot, which is reserved before the lock is released.
    fn pick(&self, key: &PoolKey, serial: &str) -> Option<(Arc<Conn>, StreamGuard)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| c.alive.load(Ordering::SeqCst));
        let c = list.iter().find(|c| {
            c.serial == serial
                && c.streams
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < STREAMS_PER_CONNECTION).then_some(n + 1)
                    })
                    .is_ok()
        })?;
        Some((c.clone(), StreamGuard(c.streams.clone())))
    }

    /// Live pooled connections (for tests and the config dump).
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .values()
            .flatten()
            .filter(|c| c.alive.load(Ordering::SeqCst))
            .count()
    }

    /// Streams open on each live connection (for tests and the config dump).
    pub fn streams(&self) -> Vec<usize> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .values()
            .flatten()
            .filter(|c| c.alive.load(Ordering::SeqCst))
            .map(|c| c.streams.load(Ordering::SeqCst))
            .collect()
    }

    fn remove(&self, key: &PoolKey, c: &Arc<Conn>) {
        c.alive.store(false, Ordering::SeqCst);
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = conns.get_mut(key) {
            list.retain(|x| !Arc::ptr_eq(x, c));
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }
}

/// Opens the stream whose slot `guard` holds.
async fn open(
    c: &Conn,
    guard: StreamGuard,
    headers: &ConnectHeaders,
    t: &Timeouts,
) -> Result<(Tunnel, StreamGuard), HboneError> {
    let mut tunnel = hbone::open_stream(c.send.clone(), headers, t).await?;
    tunnel.peer = c.identity.clone();
    Ok((tunnel, guard))
}

/// Drives the connection, pings it, and releases it when dead or idle.
async fn keepalive(pool: Pool, key: PoolKey, c: Arc<Conn>, mut driver: hbone::Driver) {
    let mut ping = driver.ping_pong();
    let mut idle_for = Duration::ZERO;
    loop {
        tokio::select! {
            r = &mut driver.conn => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, dst = %key.dst, "pooled HBONE connection ended");
                }
                break;
            }
            _ = tokio::time::sleep(PING_EVERY) => {
                if let Some(p) = ping.as_mut() {
                    let pong = tokio::time::timeout(PING_TIMEOUT, p.ping(h2::Ping::opaque()));
                    // The connection must keep being driven while we wait.
                    let alive = tokio::select! {
                        r = pong => matches!(r, Ok(Ok(_))),
                        _ = &mut driver.conn => false,
                    };
                    if !alive {
                        tracing::warn!(dst = %key.dst, "pooled HBONE connection did not answer PING; dropping it");
                        break;
                    }
                }
                idle_for = if c.streams.load(Ordering::SeqCst) == 0 { idle_for + PING_EVERY } else { Duration::ZERO };
                if idle_for >= IDLE_RELEASE {
                    break;
                }
            }
        }
    }
    pool.remove(&key, &c);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection over an in-memory pipe (nothing is sent on it).
    async fn conn(pool: &Pool, key: &PoolKey, serial: &str) {
        let (io, peer) = tokio::io::duplex(1 << 16);
        let (send, driver) = h2::client::Builder::new().handshake::<_, Bytes>(io).await.unwrap();
        tokio::spawn(driver);
        let c = Arc::new(Conn {
            send,
            identity: None,
            serial: serial.into(),
            streams: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
        });
        pool.conns.lock().unwrap().entry(key.clone()).or_default().push(c);
        // The peer end stays open for the test's lifetime.
        std::mem::forget(peer);
    }

    #[tokio::test]
    async fn pick_reserves_the_slot_it_hands_out() {
        let pool = Pool::default();
        let key = PoolKey {
            src_identity: SpiffeId::new("td", "ns", "a"),
            dst_identities: vec![SpiffeId::new("td", "ns", "b")],
            dst: "10.0.0.2:15008".parse().unwrap(),
            src_ip: "10.0.0.1".parse().unwrap(),
        };
        conn(&pool, &key, "s1").await;
        // Each pick holds a slot until its guard drops, with no open() in
        // between: the 101st finds the connection full.
        let mut held: Vec<StreamGuard> = (0..STREAMS_PER_CONNECTION)
            .map(|_| pool.pick(&key, "s1").expect("a free slot").1)
            .collect();
        assert!(pool.pick(&key, "s1").is_none(), "over the stream cap");
        assert_eq!(pool.streams(), vec![STREAMS_PER_CONNECTION]);
        held.pop();
        assert!(pool.pick(&key, "s1").is_some(), "a released slot is free again");
        assert!(
            pool.pick(&key, "rotated").is_none(),
            "another certificate takes a new connection"
        );
    }
}
