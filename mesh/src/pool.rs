//! HBONE connection pool: one TLS + HTTP/2 connection per key carries many
//! CONNECT streams (ztunnel's design).
//!
//! * Key: (source identity, acceptable destination identities, destination
//!   address, source IP). Concurrent first dials to one key make one
//!   handshake: the others wait for it.
//! * A connection takes new streams while it is alive, below its stream cap,
//!   and made with the source's *current* certificate: after a rotation old
//!   connections only finish the streams they have.
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

use bytes::Bytes;
use h2::client::SendRequest;

use crate::{
    hbone::{self, ConnectHeaders, HboneError, Tunnel},
    identity::SpiffeId,
};

const STREAMS_PER_CONNECTION: usize = 100;
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

#[derive(Default, Clone)]
pub struct Pool {
    conns: Arc<Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>>,
    /// One dial at a time per key.
    dialing: Arc<Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Pool {
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
        D: FnOnce() -> F,
        F: Future<Output = Result<hbone::Dialed, HboneError>>,
    {
        if let Some(c) = self.pick(key, serial) {
            return open(&c, headers).await;
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        // Someone may have dialled while we waited.
        if let Some(c) = self.pick(key, serial) {
            return open(&c, headers).await;
        }
        let dialed = dial().await?;
        let (send, peer) = hbone::handshake(dialed.tcp, dialed.tls).await?;
        let c = Arc::new(Conn {
            send: send.clone(),
            identity: peer.identity.clone(),
            serial: serial.to_string(),
            streams: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
        });
        tokio::spawn(keepalive(self.clone(), key.clone(), c.clone(), peer.driver));
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(c.clone());
        open(&c, headers).await
    }

    /// A live connection for `key`, made with certificate `serial`, with room.
    fn pick(&self, key: &PoolKey, serial: &str) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| c.alive.load(Ordering::SeqCst));
        list.iter()
            .find(|c| c.serial == serial && c.streams.load(Ordering::SeqCst) < STREAMS_PER_CONNECTION)
            .cloned()
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

    fn remove(&self, key: &PoolKey, c: &Arc<Conn>) {
        c.alive.store(false, Ordering::SeqCst);
        if let Some(list) = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get_mut(key) {
            list.retain(|x| !Arc::ptr_eq(x, c));
        }
    }
}

async fn open(c: &Conn, headers: &ConnectHeaders) -> Result<(Tunnel, StreamGuard), HboneError> {
    c.streams.fetch_add(1, Ordering::SeqCst);
    let guard = StreamGuard(c.streams.clone());
    let mut tunnel = hbone::open_stream(c.send.clone(), headers).await?;
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
