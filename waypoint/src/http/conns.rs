//! Upstream HTTP connections kept for the next request to the same
//! endpoint, so a keep-alive client costs one HBONE CONNECT (and one
//! HTTP handshake) per connection, not per request.
//!
//! Keyed by endpoint, original client and protocol: a CONNECT carries the
//! original client's address (`forwarded: for=`) that the destination's
//! policy may check, so one client's requests never ride another client's
//! stream. An HTTP/1.1 connection serves one request at a time and is
//! taken only when ready; an h2 connection is shared. Bounded: a few idle
//! connections per key, a cap on keys, and idle ones closed after
//! [`IDLE`] (dropping the sender closes the connection).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2, TrySendError},
};

use super::Replay;

/// Idle HTTP/1.1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 16;
/// Keys kept at once (clients x endpoints); beyond it nothing new is kept.
const MAX_KEYS: usize = 4096;
/// An unused connection is closed after this long.
pub const IDLE: Duration = Duration::from_secs(60);
/// How often idle connections of every key are swept.
const SWEEP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub endpoint: SocketAddr,
    pub client: IpAddr,
    pub h2: bool,
}

/// A connection's request sender.
pub enum Tx {
    H1(http1::SendRequest<Replay>),
    H2(http2::SendRequest<Replay>),
}

impl Tx {
    fn usable(&self) -> bool {
        match self {
            Tx::H1(t) => t.is_ready(),
            Tx::H2(t) => !t.is_closed(),
        }
    }

    fn closed(&self) -> bool {
        match self {
            Tx::H1(t) => t.is_closed(),
            Tx::H2(t) => t.is_closed(),
        }
    }

    /// Sends `req`; when it was never written, the error gives it back.
    pub async fn send(&mut self, req: Request<Replay>) -> Result<Response<Incoming>, TrySendError<Request<Replay>>> {
        match self {
            Tx::H1(t) => t.try_send_request(req).await,
            Tx::H2(t) => t.try_send_request(req).await,
        }
    }
}

struct Idle {
    since: Instant,
    tx: Tx,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<Key, Vec<Idle>>,
    swept: Option<Instant>,
}

/// The kept connections.
#[derive(Default)]
pub struct Conns(Mutex<Inner>);

impl Conns {
    /// A kept connection for `key` that can take a request now.
    pub fn take(&self, key: &Key) -> Option<Tx> {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let list = inner.idle.get_mut(key)?;
        list.retain(|i| !i.tx.closed() && i.since.elapsed() < IDLE);
        let found = list.iter().position(|i| i.tx.usable());
        let tx = match (key.h2, found) {
            (_, None) => None,
            // h2 multiplexes: it stays for the next request too.
            (true, Some(i)) => {
                list[i].since = Instant::now();
                match &list[i].tx {
                    Tx::H2(t) => Some(Tx::H2(t.clone())),
                    Tx::H1(_) => None,
                }
            }
            (false, Some(i)) => Some(list.swap_remove(i).tx),
        };
        if list.is_empty() {
            inner.idle.remove(key);
        }
        tx
    }

    /// Keeps `tx` for the next request (an HTTP/1.1 connection becomes
    /// ready again once its response has been read).
    pub fn put(&self, key: Key, tx: Tx) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.swept.is_none_or(|t| t.elapsed() > SWEEP) {
            inner.swept = Some(Instant::now());
            inner.idle.retain(|_, list| {
                list.retain(|i| !i.tx.closed() && i.since.elapsed() < IDLE);
                !list.is_empty()
            });
        }
        if !inner.idle.contains_key(&key) && inner.idle.len() >= MAX_KEYS {
            return;
        }
        let list = inner.idle.entry(key.clone()).or_default();
        let room = if key.h2 {
            list.is_empty()
        } else {
            list.len() < MAX_IDLE_PER_KEY
        };
        if room {
            list.push(Idle {
                since: Instant::now(),
                tx,
            });
        }
    }

    /// Connections kept (for tests and metrics).
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
