//! The kernel path's hand-backs: the owner of SM_FWD_EVENTS and
//! SM_FWD_LOST (agent-ebpf).
//!
//! Once a hop joins the kernel path its agent stops watching the socket
//! `net` for reads: the socket's data-ready callback runs after every
//! segment the verdict moves into the app, and would wake the agent each
//! time for nothing to read. The end of `net`'s stream, a reset or a
//! shutdown still reach the agent through `net`'s state (the proxy's
//! watch, `proxy::forward::Watch`). Bytes the verdict passes to `net` do
//! not change its state: the verdict then writes `net`'s cookie into
//! SM_FWD_EVENTS, which a thread of its own reads, telling the connection
//! parked on that socket to read it.
use std::{
    collections::HashMap,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::sync::Notify;

use super::super::sys;

/// Longest wait for records: bounds how long the reader outlives its
/// agent's capture (it reads the lost count after every wake-up, which
/// is where a loss shows, see [`read`]).
const IDLE: Duration = Duration::from_secs(10);

/// Records of 8 bytes take 16 in the ring: a drain of more than this many
/// may have followed a full ring.
const FULLISH: usize = 64 * 1024 / 16 / 4;

/// How long after such a drain the lost count is read again: a failed
/// write is counted a few instructions after it failed.
const LATE_COUNT: Duration = Duration::from_millis(1);

/// The connections parked on the kernel path, by the cookie of their
/// SM_NET socket, while the reader runs.
#[derive(Debug)]
pub struct Parked {
    parked: Mutex<HashMap<u64, Arc<Park>>>,
    /// Cleared when the reader thread ends: nothing parks from then on.
    reading: AtomicBool,
}

/// What a parked connection waits on.
#[derive(Debug, Default)]
pub struct Park {
    /// Set before a wake-up that means "read `net`": the verdict passed it
    /// bytes, or took its verdict away. A wake-up without it (hand-backs
    /// were lost) asks the connection to look at its entry.
    told: AtomicBool,
    notify: Notify,
}

impl Park {
    /// Until the next wake-up (a permit keeps one that came first).
    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Whether the connection must read its socket again.
    pub fn told(&self) -> bool {
        self.told.load(Ordering::SeqCst)
    }

    fn tell(&self) {
        self.told.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }
}

impl Parked {
    /// Starts the thread that reads `ring`: each record tells the
    /// connection it names to read its socket; a grown `lost` count wakes
    /// them all, each to look at its entry.
    pub fn start(ring: RingBuf<MapData>, lost: PerCpuArray<MapData, u64>) -> std::io::Result<Arc<Self>> {
        let parked = Arc::new(Self {
            parked: Mutex::default(),
            reading: AtomicBool::new(true),
        });
        let weak = Arc::downgrade(&parked);
        std::thread::Builder::new().name("fwd-handback".into()).spawn(move || {
            let _ended = Ended(weak.clone());
            read(ring, &lost, &weak);
        })?;
        Ok(parked)
    }

    /// The socket `cookie` joins: what tells its connection to read it.
    /// Called before the socket enters SM_NET, so no record comes first;
    /// `None` once the reader has ended (the connection must not park).
    pub fn park(&self, cookie: u64) -> Option<Arc<Park>> {
        let park = self.lock().entry(cookie).or_default().clone();
        // After the insert: an ending reader tells every entry it finds
        // once this is false.
        self.reading.load(Ordering::SeqCst).then_some(park)
    }

    /// The socket `cookie` left the kernel path.
    pub fn leave(&self, cookie: u64) {
        self.lock().remove(&cookie);
    }

    /// Tells the connection parked on socket `cookie`, if any, to read it.
    pub fn tell(&self, cookie: u64) {
        if let Some(p) = self.lock().get(&cookie) {
            p.tell();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Park>>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        for p in self.lock().values() {
            p.notify.notify_one();
        }
    }
}

/// Ends the parking with its reader, however the reader ends (a panic
/// too): every parked connection reads its socket again, and no other
/// parks.
struct Ended(Weak<Parked>);

impl Drop for Ended {
    fn drop(&mut self) {
        let Some(parked) = self.0.upgrade() else {
            return;
        };
        parked.reading.store(false, Ordering::SeqCst);
        tracing::warn!("kernel path: the hand-back reader ended; parked connections read their sockets again");
        for p in parked.lock().values() {
            p.tell();
        }
    }
}

/// The reader thread, until its agent's capture is gone. After each drain
/// it reads the lost count: a record is lost only while the ring is full,
/// and a full ring holds records that wake this thread, so a loss is seen
/// after the drain of the records that filled the ring (read once more a
/// moment later, for a loss counted while that drain ran).
fn read(mut ring: RingBuf<MapData>, lost: &PerCpuArray<MapData, u64>, parked: &Weak<Parked>) {
    let mut seen = 0;
    let mut wait = IDLE;
    loop {
        if sys::poll(ring.as_fd(), libc::POLLIN, Some(wait)).is_err() {
            // EINTR or the like: do not spin.
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(parked) = parked.upgrade() else {
            return;
        };
        let mut drained = 0;
        while let Some(item) = ring.next() {
            drained += 1;
            if let Ok(cookie) = <[u8; 8]>::try_from(&*item) {
                parked.tell(u64::from_ne_bytes(cookie));
            }
        }
        wait = if drained > FULLISH { LATE_COUNT } else { IDLE };
        // A count that cannot be read counts as unchanged.
        let now = lost_count(lost).unwrap_or(seen);
        if now > seen {
            tracing::warn!(
                lost = now - seen,
                "kernel path: hand-backs found their ring full; every parked connection looks at its entry"
            );
            seen = now;
            parked.wake_all();
        }
    }
}

fn lost_count(lost: &PerCpuArray<MapData, u64>) -> Option<u64> {
    lost.get(&0, 0).ok().map(|v| v.iter().sum())
}
