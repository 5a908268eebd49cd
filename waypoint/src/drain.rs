//! Graceful drain: one signal every connection watches (HBONE connections
//! answer it with GOAWAY, HTTP connections with GOAWAY or `Connection:
//! close`), and a count of the connections still open, so shutdown waits
//! for in-flight work (bounded by the drain timeout).
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::sync::{watch, Notify};

#[derive(Clone)]
pub struct Drain {
    signal: watch::Sender<bool>,
    open: Arc<(AtomicUsize, Notify)>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: watch::channel(false).0,
            open: Arc::default(),
        }
    }
}

/// Counts one open connection until dropped.
pub struct Open(Arc<(AtomicUsize, Notify)>);

impl Drop for Open {
    fn drop(&mut self) {
        if self.0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0 .1.notify_waiters();
        }
    }
}

impl Drain {
    /// Starts draining: every watcher's [`Drain::signaled`] resolves.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started.
    pub fn signaled(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.signal.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self) -> Open {
        self.open.0.fetch_add(1, Ordering::SeqCst);
        Open(self.open.clone())
    }

    pub fn open_connections(&self) -> usize {
        self.open.0.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open.
    pub async fn closed(&self) {
        loop {
            let notified = self.open.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }
}
