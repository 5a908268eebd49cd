//! The sockmap kernel path (`agent run --sockmap-forward`): a plain
//! connection (no HBONE) whose in-pod hop is redirected both ways is
//! forwarded in the kernel once it has warmed up. The app's sends go by
//! sk_msg straight to the egress of the agent's other socket (`net`: the
//! connection to the peer, or the one accepted from it), and an sk_skb
//! verdict on `net` moves what arrives there straight into the app's
//! socket. The agent then only polices, counts and closes; it wakes again
//! when the verdict hands a segment back (the app stopped reading, or left)
//! and at the end of the stream (ARCHITECTURE.md, "The kernel path").
//!
//! Order is kept by three rules:
//! * `net` joins only once the agent -> app direction is redirected (the
//!   app reads its sk_msg queue before TCP, so the verdict's bytes would
//!   overtake agent writes still waiting on TCP), after the agent has
//!   written on every byte it read from `net`, and it stops reading `net`
//!   before the join. `SO_RCVLOWAT` then runs the verdict over what waits.
//! * The app's sends switch only when the agent has reported forwarding
//!   every byte redirected to it (the sk_msg program checks, under the app
//!   socket's lock).
//! * Once the verdict hands bytes back, or `net` reaches its end, the agent
//!   writes to the app (or half-closes it) only after the app has read every
//!   byte the verdict moved: those may still wait in a kernel work queue.
use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use mesh::splice::{self, Copied, Hooks, Read};
use tokio::{io::Interest, net::TcpStream};

use super::{ForgetOnDrop, PodCtx};
use crate::capture::{
    sockmap::{Forwarded, ToAppNow},
    ProxyMaps,
};

/// How the reader of an accelerated hop reports to the kernel path.
#[derive(Debug, Default)]
pub struct Report {
    /// Report the read count after every forward (set when the hop joins).
    pub eager: AtomicBool,
    /// Bytes read from the hop and already written on.
    pub forwarded: AtomicU64,
}

/// What an accelerated hop's hooks hold for as long as it is read.
pub struct Held {
    /// An SM_TO_APP entry the agent created (removed when dropped).
    pub created: Option<ForgetOnDrop>,
    pub report: Arc<Report>,
}

/// Reads of `net` before a connection may join (with bytes forwarded the
/// other way too).
const JOIN_AFTER_READS: u32 = 2;

/// Reads of `net` after which a connection that has not joined stops
/// trying (it is spliced instead).
const JOIN_TRIES: u32 = 8;

/// Longest pause between two looks at what the app has read.
const MAX_POLL: Duration = Duration::from_millis(20);

/// Forwards a plain connection between the agent's in-pod socket `hop`
/// (read as `hop_read` says) and its other socket `net` (read as
/// `net_read` says), in the kernel where the hop allows it. `hop_is_client`:
/// `hop` is the connection's client side (outbound), else `net` is.
pub async fn forward(
    ctx: &PodCtx,
    hop: &TcpStream,
    hop_read: Read,
    net: &TcpStream,
    net_read: Read,
    hop_is_client: bool,
) -> Copied {
    let report = match &hop_read {
        Read::Recv(h) => h
            .hold
            .as_ref()
            .and_then(|h| h.downcast_ref::<Held>())
            .map(|h| h.report.clone()),
        Read::Splice => None,
    };
    let (Some(report), Ok(app), Ok(agent)) = (report, hop.peer_addr(), hop.local_addr()) else {
        return match hop_is_client {
            true => splice::forward_reading(hop, hop_read, net, net_read).await,
            false => splice::forward_reading(net, net_read, hop, hop_read).await,
        };
    };
    let k = Kernel {
        maps: ctx.orig.clone(),
        netns: ctx.netns_cookie,
        app,
        agent,
        report,
        joined: Mutex::new(None),
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let r = splice::both(splice::one_way(hop, hop_read, net, &up), k.replies(net, hop, &down)).await;
    let mut copied = Copied::new(r, &up, &down);
    if let Some(moved) = k.finish() {
        copied.sent += moved.sent;
        copied.received += moved.received;
    }
    if !hop_is_client {
        std::mem::swap(&mut copied.sent, &mut copied.received);
    }
    copied
}

/// One connection's kernel path.
struct Kernel {
    maps: Arc<ProxyMaps>,
    netns: u64,
    /// The hop as the agent's socket sees it.
    app: SocketAddr,
    agent: SocketAddr,
    report: Arc<Report>,
    joined: Mutex<Option<Joined>>,
}

/// A hop in the kernel path; its entries go when dropped.
struct Joined {
    maps: Arc<ProxyMaps>,
    fwd: Forwarded,
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let Some(ends) = self.maps.sockmap() {
            ends.forget_forward(&self.fwd);
        }
    }
}

impl Kernel {
    /// `net` -> `hop`: through the agent until the agent -> app direction
    /// is decided. Redirected: `net` joins, and the agent waits until the
    /// verdict hands something back or the stream ends, then until the app
    /// has read all that was moved, and reads `net` itself from then on.
    async fn replies(&self, net: &TcpStream, hop: &TcpStream, count: &AtomicU64) -> io::Result<()> {
        let mut buf = vec![0u8; splice::COPY_BUF];
        let mut reads = 0u32;
        loop {
            let n = splice::recv_send(net, hop, &mut buf).await?;
            if n == 0 {
                return socket2::SockRef::from(hop).shutdown(std::net::Shutdown::Write);
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
            reads += 1;
            // A stream that has not joined within a few reads (it never
            // pauses, or never goes the other way) goes on through the
            // agent, zero-copy.
            if reads > JOIN_TRIES {
                return splice::one_way(net, Read::Splice, hop, count).await;
            }
            // Only a conversation joins: bytes both ways, and more than one
            // read this way. A one-shot exchange would pay the join for
            // nothing.
            if reads < JOIN_AFTER_READS || self.report.forwarded.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let Some(ends) = self.maps.sockmap() else {
                return splice::one_way(net, Read::Splice, hop, count).await;
            };
            match ends.to_app_state(self.netns, self.app, self.agent) {
                ToAppNow::Undecided => continue,
                ToAppNow::Never => return splice::one_way(net, Read::Splice, hop, count).await,
                // The verdict takes whole segments from the receive queue:
                // one the agent has read in part would be moved again from
                // its start. So join only with nothing unread on `net`
                // (every read segment freed); more may arrive meanwhile, as
                // whole segments the agent never touches.
                ToAppNow::Redirected(_) if unread(net)? > 0 => continue,
                ToAppNow::Redirected(app_cookie) => match self.join(net, app_cookie) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(app = %self.app, error = %e, "cannot forward the hop in the kernel: it goes on through the agent");
                        return splice::one_way(net, Read::Recv(Hooks::default()), hop, count).await;
                    }
                },
            }
        }
        // `net` is in a sockhash: recvmsg reads what the verdict passed (a
        // forwarding verdict leaves nothing to read), or the end.
        let n = recv(net, &mut buf).await?;
        self.app_read_all().await;
        if n == 0 {
            return socket2::SockRef::from(hop).shutdown(std::net::Shutdown::Write);
        }
        send_all(hop, &buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        splice::one_way(net, Read::Recv(Hooks::default()), hop, count).await
    }

    /// `net` joins SM_NET; the app's sends may switch once the agent has
    /// reported all it forwarded, which it does from now on after each
    /// forward, and once here.
    fn join(&self, net: &TcpStream, app_cookie: u64) -> io::Result<()> {
        let ends = self.maps.sockmap().ok_or_else(|| io::Error::other("sockmap off"))?;
        let fwd = ends.join_forward(self.netns, self.app, self.agent, net, app_cookie)?;
        *self.joined.lock().unwrap_or_else(|e| e.into_inner()) = Some(Joined {
            maps: self.maps.clone(),
            fwd,
        });
        self.report.eager.store(true, Ordering::SeqCst);
        let _ = ends.report_read(
            self.netns,
            self.app,
            self.agent,
            self.report.forwarded.load(Ordering::SeqCst),
        );
        // Runs the verdict over what already waits on `net` (it runs on
        // each new segment otherwise, and a peer that spoke first may wait).
        // The hop is in the kernel path either way now: never read `net`.
        if let Err(e) = set_rcvlowat(net, 1) {
            tracing::warn!(app = %self.app, error = %e, "cannot set SO_RCVLOWAT on a forwarded hop: bytes already waiting move with the next segment");
        }
        Ok(())
    }

    /// Until the app has read every byte moved into its socket (or its
    /// socket closed). Polled: nothing wakes the agent when the app reads.
    /// It ends with the app's reads, as a TCP sender's wait for window does.
    async fn app_read_all(&self) {
        let mut pause = Duration::from_micros(100);
        while self
            .maps
            .sockmap()
            .is_some_and(|e| !e.app_read_all(self.netns, self.app, self.agent))
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// The bytes the kernel moved, and the hop's entries removed.
    fn finish(&self) -> Option<agent_common::Fwd> {
        let joined = self.joined.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        self.maps.sockmap()?.forwarded_bytes(&joined.fwd)
    }
}

/// One recv from `sock` into `buf`, waiting for it: the bytes read (0: the
/// end of the stream).
async fn recv(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        sock.ready(Interest::READABLE).await?;
        let r = sock.try_io(Interest::READABLE, || {
            // SAFETY: a valid fd and a buffer of `buf.len()` bytes.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Writes all of `bytes` to `sock`.
async fn send_all(sock: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        sock.writable().await?;
        match sock.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes received on `sock` and not read yet (SIOCINQ; on a socket in no
/// sockmap, TCP's own count).
fn unread(sock: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; a valid fd.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// SO_RCVLOWAT: setting it runs the socket's data-ready callback.
fn set_rcvlowat(sock: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid fd and an int option of its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
