//! The sockmap kernel path (`agent run --sockmap-forward`): a plain
//! connection (no HBONE) whose in-pod hop is redirected both ways is
//! forwarded in the kernel once it has warmed up. The app's sends go by
//! sk_msg straight to the egress of the agent's other socket (`net`: the
//! connection to the peer, or the one accepted from it), and an sk_skb
//! verdict on `net` moves what arrives there straight into the app's
//! socket. The agent then only polices, counts and closes; it acts again
//! when the verdict hands a segment back (the app stopped reading, or left)
//! and at the end of the stream.
//!
//! While the kernel forwards, nothing watches `net` for reads: the
//! verdict's data-ready callback would wake a reader after every segment it
//! moves, for nothing to read. So the app's direction writes to `net`
//! through a duplicate fd with no read interest ([`Writes`]), and a joined
//! connection takes `net` out of the runtime while it is parked
//! ([`Kernel::park`]), woken by the verdict through the hand-back ring
//! when it passes bytes to `net`, or by `net`'s end, a reset or a shutdown
//! ([`Watch`]).
//!
//! Order is kept by three rules:
//! * `net` joins only once the agent -> app direction is redirected (the
//!   app reads its sk_msg queue before TCP, so the verdict's bytes would
//!   overtake agent writes still waiting on TCP), after the agent has
//!   written on every byte it read from `net`, with nothing unread on `net`
//!   (the verdict takes whole segments), and it stops reading `net` before
//!   the join. `SO_RCVLOWAT` then runs the verdict over what waits.
//! * The app's sends switch only when the agent has reported forwarding
//!   every byte redirected to it (the sk_msg program checks, under the app
//!   socket's lock).
//! * Once the verdict hands bytes back, or `net` reaches its end, the agent
//!   writes to the app (or half-closes it) only after the app has read every
//!   byte the verdict moved: those may still wait in a kernel work queue.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use mesh::splice::{self, Copied, Hooks, Read};
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpStream,
    sync::{Notify, OnceCell},
};

use super::{Direction, ForgetOnDrop, PodCtx};
use crate::capture::{
    sockmap::{Forwarded, Park, ToAppNow},
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
    /// The hop as the agent's socket sees it (its peer, the app; its own
    /// address).
    pub app: SocketAddr,
    pub agent: SocketAddr,
}

/// Reads of `net` before a connection may join (with bytes forwarded the
/// other way too).
const JOIN_AFTER_READS: u32 = 2;

/// Reads of `net` after which a connection that has not joined stops
/// trying (it is spliced instead).
const JOIN_TRIES: u32 = 8;

/// The warm-up's read buffer (a bulk stream is spliced after a few reads).
const WARM_UP_BUF: usize = 16 * 1024;

/// Longest pause between two looks at what the app has read.
const MAX_POLL: Duration = Duration::from_millis(20);

/// A wait for the app's reads longer than this is logged.
const SLOW_READER: Duration = Duration::from_secs(1);

/// Forwards a plain connection between the agent's in-pod socket `hop`
/// (read as `hop_read` says) and its other socket `net` (read as
/// `net_read` says), in the kernel where the hop allows it. `dir`: outbound,
/// `hop` is the connection's client side; inbound, `net` is.
pub async fn forward(
    ctx: &PodCtx,
    dir: Direction,
    hop: &TcpStream,
    hop_read: Read,
    net: TcpStream,
    net_read: Read,
) -> Copied {
    let hop_is_client = matches!(dir, Direction::Outbound);
    let held = match &hop_read {
        Read::Recv(h) => h
            .hold
            .as_ref()
            .and_then(|h| h.downcast_ref::<Held>())
            .map(|h| (h.report.clone(), h.app, h.agent)),
        Read::Splice => None,
    };
    let Some((report, app, agent)) = held else {
        return match hop_is_client {
            true => splice::forward_reading(hop, hop_read, &net, net_read).await,
            false => splice::forward_reading(&net, net_read, hop, hop_read).await,
        };
    };
    let writes = match Writes::new(&net) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(app = %app, error = %e, "cannot duplicate a connection's socket for the kernel path: the connection is closed");
            return Copied::failed(format!("error: {e}"));
        }
    };
    let k = Kernel {
        maps: ctx.orig.clone(),
        netns: ctx.netns_cookie,
        app,
        agent,
        report,
        joined: Mutex::new(None),
        app_done: Notify::new(),
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let app_sends = async {
        let r = splice::one_way(hop, hop_read, &writes, &up).await;
        k.app_done.notify_one();
        r
    };
    let r = splice::both(app_sends, k.replies(net, hop, &down)).await;
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
    /// Notified when the app's direction has ended (the app half-closed or
    /// left): a parked connection then reads `net` again.
    app_done: Notify,
}

/// A hop in the kernel path; its entries go at [`Joined::end`], or when
/// dropped.
struct Joined {
    maps: Arc<ProxyMaps>,
    fwd: Option<Forwarded>,
}

impl Joined {
    /// The bytes the kernel moved; the hop's entries removed.
    fn end(mut self) -> Option<agent_common::Fwd> {
        let fwd = self.fwd.take()?;
        self.maps.sockmap()?.forget_forward(&fwd)
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if let (Some(fwd), Some(ends)) = (self.fwd.take(), self.maps.sockmap()) {
            ends.forget_forward(&fwd);
        }
    }
}

/// How the warm-up of a connection's `net` -> app direction ended.
enum WarmUp {
    /// `net` is in SM_NET: the kernel forwards into the app socket of this
    /// cookie; a hand-back wakes the second (`None`: the verdict is a
    /// newer agent's, see [`Forwarded::handed_back`]).
    Joined(u64, Option<Arc<Park>>),
    /// The stream ended (and was passed on) before it could join.
    Ended,
    /// It will not join: go on through the agent, read as said.
    Agent(Read),
}

impl Kernel {
    /// `net` -> `hop`. Through the agent during the warm-up; once joined,
    /// the agent parks until the verdict hands something back or the
    /// stream ends, then waits until the app has read all that was moved,
    /// and reads `net` itself from then on (with recvmsg: `net` stays in a
    /// sockhash, whose queue splice never reads).
    async fn replies(&self, net: TcpStream, hop: &TcpStream, count: &AtomicU64) -> io::Result<()> {
        // Warm-up reads are a conversation's: small. What comes after has
        // a buffer of its own.
        let mut buf = vec![0u8; WARM_UP_BUF];
        let (app_cookie, handed_back) = match self.warm_up(&net, hop, count, &mut buf).await? {
            WarmUp::Ended => return Ok(()),
            WarmUp::Agent(read) => return splice::one_way(&net, read, hop, count).await,
            WarmUp::Joined(app_cookie, handed_back) => (app_cookie, handed_back),
        };
        let net = match handed_back {
            Some(handed_back) => self.park(net, &handed_back).await?,
            None => net,
        };
        // A forwarding verdict leaves nothing to read: this waits for bytes
        // it passed, or the end.
        let n = splice::recv(&net, &mut buf).await?;
        self.app_read_all(app_cookie).await;
        if n == 0 {
            return socket2::SockRef::from(hop).shutdown(std::net::Shutdown::Write);
        }
        splice::send_all(hop, &buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        splice::one_way(&net, Read::Recv(Hooks::default()), hop, count).await
    }

    /// A joined connection, `net`'s registration with the runtime given up
    /// (the app's sends have their own, [`Writes`]), until the agent must
    /// read `net` again; then `net` registered anew. That is when the
    /// verdict passed it bytes (`handed_back` says so; the bytes may still
    /// be on their way into `net`'s queue, so the wake-up decides, not the
    /// queue), `net` has its end, an error or a shutdown ([`Watch`]), or
    /// the app's direction ended (the app half-closed, or left: a later
    /// connection on its ports may take the hop's entries). Without a
    /// watch (no fd left for its epoll instance), it stays registered for
    /// reads: woken per segment, as before.
    async fn park(&self, net: TcpStream, handed_back: &Park) -> io::Result<TcpStream> {
        let watch = match Watch::new(&net) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(app = %self.app, error = %e, "cannot park a forwarded hop: the agent keeps watching it for reads");
                return Ok(net);
            }
        };
        // Out of the runtime's epoll: its read interest is what each
        // segment the verdict moves would wake.
        let net = net.into_std()?;
        loop {
            tokio::select! {
                () = handed_back.woken() => {
                    // A wake-up without word (hand-backs were lost, so
                    // every parked connection was woken) parks again a
                    // connection whose verdict still forwards.
                    if handed_back.told() || !self.still_forwarding() {
                        break;
                    }
                }
                () = self.app_done.notified() => break,
                ready = watch.0.readable() => {
                    let mut ready = ready?;
                    if has_news(&net)? {
                        break;
                    }
                    ready.clear_ready();
                }
            }
        }
        TcpStream::from_std(net)
    }

    /// Whether the hop's verdict still forwards (see
    /// [`AgentEnds::still_forwarding`]).
    fn still_forwarding(&self) -> bool {
        let joined = self.joined.lock().unwrap_or_else(|e| e.into_inner());
        match (joined.as_ref().and_then(|j| j.fwd.as_ref()), self.maps.sockmap()) {
            (Some(fwd), Some(ends)) => ends.still_forwarding(fwd),
            _ => false,
        }
    }

    /// Copies `net` -> `hop` through the agent until the connection joins
    /// the kernel path, or shows it never will.
    async fn warm_up(&self, net: &TcpStream, hop: &TcpStream, count: &AtomicU64, buf: &mut [u8]) -> io::Result<WarmUp> {
        for reads in 1..=JOIN_TRIES {
            let n = splice::recv_send(net, hop, buf).await?;
            if n == 0 {
                socket2::SockRef::from(hop).shutdown(std::net::Shutdown::Write)?;
                return Ok(WarmUp::Ended);
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
            // Only a conversation joins: bytes both ways, and more than one
            // read this way. A single exchange would pay the join for
            // nothing.
            if reads < JOIN_AFTER_READS || self.report.forwarded.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let Some(ends) = self.maps.sockmap() else {
                return Ok(WarmUp::Agent(Read::Splice));
            };
            let app_cookie = match ends.to_app_state(self.netns, self.app, self.agent) {
                ToAppNow::Undecided => continue,
                ToAppNow::Never => return Ok(WarmUp::Agent(Read::Splice)),
                ToAppNow::Redirected(app_cookie) => app_cookie,
            };
            // The verdict takes whole segments from the receive queue: one
            // the agent has read in part would be moved again from its
            // start. So join only with nothing unread on `net` (every read
            // segment freed); what arrives meanwhile comes as whole
            // segments the agent never touches. Unknown: not now.
            if splice::unread(net).map_or(true, |n| n > 0) {
                continue;
            }
            return Ok(match self.join(net, app_cookie) {
                Ok(handed_back) => WarmUp::Joined(app_cookie, handed_back),
                Err(e) => {
                    tracing::debug!(app = %self.app, error = %e, "cannot forward the hop in the kernel: it goes on through the agent");
                    // The insert into SM_NET is the join's last step: on
                    // any failure `net` is in no sockmap.
                    WarmUp::Agent(Read::Splice)
                }
            });
        }
        // Not joined within a few reads (a stream that never pauses, or
        // never answers): zero-copy through the agent, as without the path.
        Ok(WarmUp::Agent(Read::Splice))
    }

    /// `net` joins SM_NET; the app's sends may switch once the agent has
    /// reported all it forwarded, which it does from now on after each
    /// forward, and once here.
    fn join(&self, net: &TcpStream, app_cookie: u64) -> Result<Option<Arc<Park>>, ForwardError> {
        let ends = self.maps.sockmap().ok_or(ForwardError::Off)?;
        let fwd = ends
            .join_forward(self.netns, self.app, self.agent, net, app_cookie)
            .map_err(ForwardError::Join)?;
        let handed_back = fwd.handed_back();
        *self.joined.lock().unwrap_or_else(|e| e.into_inner()) = Some(Joined {
            maps: self.maps.clone(),
            fwd: Some(fwd),
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
        Ok(handed_back)
    }

    /// Until the app has read every byte moved into its socket (or its
    /// socket closed). Polled: nothing wakes the agent when the app reads.
    /// It ends with the app's reads, as a TCP sender's wait for window
    /// does; a wait of over a second is logged (an app that stopped
    /// reading, or a read count that fell short: ARCHITECTURE.md).
    async fn app_read_all(&self, app_cookie: u64) {
        let (start, mut logged) = (std::time::Instant::now(), false);
        let mut pause = Duration::from_micros(100);
        while self
            .maps
            .sockmap()
            .is_some_and(|e| !e.app_read_all(self.netns, self.app, self.agent, app_cookie))
        {
            if !logged && start.elapsed() > SLOW_READER {
                logged = true;
                tracing::info!(app = %self.app, "a forwarded hop waits for its app to read what the kernel moved into it before the agent writes more");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// The bytes the kernel moved, and the hop's entries removed.
    fn finish(&self) -> Option<agent_common::Fwd> {
        self.joined.lock().unwrap_or_else(|e| e.into_inner()).take()?.end()
    }
}

/// Why a hop could not join the kernel path.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("sockmap acceleration is off")]
    Off,
    #[error("cannot put the hop into the kernel path's maps: {0}")]
    Join(#[source] io::Error),
}

/// The app's direction's writes to `net`, through a duplicate of its fd:
/// `net`'s own registration with the runtime (read interest too) leaves
/// when the hop parks, while the app's direction goes on; this one never
/// has read interest. It registers only once a write would block, which
/// most connections never see, so a connection that never joins pays a
/// `dup` and a `close`.
struct Writes {
    /// Declared before `fd`: deregistered before the fd closes.
    registered: OnceCell<AsyncFd<Fd>>,
    fd: OwnedFd,
}

/// The fd of a registration whose fd another field owns.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl Writes {
    fn new(net: &TcpStream) -> io::Result<Self> {
        Ok(Self {
            registered: OnceCell::new(),
            fd: net.as_fd().try_clone_to_owned()?,
        })
    }
}

impl splice::Io for Writes {
    /// Registers for the interest of the first wait (the copy loops only
    /// write to this socket).
    async fn io<R: Send>(&self, interest: Interest, mut op: impl FnMut() -> io::Result<R> + Send) -> io::Result<R> {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let fd = self.fd.as_raw_fd();
        let registered = self
            .registered
            .get_or_try_init(|| async move {
                // SAFETY: `fd` is `self.fd`, open and the same for as long
                // as the registration lives (dropped before it).
                unsafe { register(Fd(fd), interest) }
            })
            .await?;
        registered.async_io(interest, |_| op()).await
    }
}

impl AsFd for Writes {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Writes {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What wakes a parked connection besides a hand-back: an epoll instance
/// of its own, holding `net` for `EPOLLRDHUP` alone (with `EPOLLERR` and
/// `EPOLLHUP`, which epoll always reports), registered with the runtime for
/// reads. The verdict's data-ready wake-ups carry `EPOLLIN` and match
/// nothing here; a state change carries no key, so epoll asks the socket,
/// which says `EPOLLRDHUP` once the peer's FIN came, whatever its send
/// buffer holds (a watch of `EPOLLOUT` would miss a FIN that comes while
/// the buffer is full).
struct Watch(AsyncFd<OwnedFd>);

impl Watch {
    fn new(net: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: plain syscall; a new fd on success.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: valid fds and one event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, net.as_raw_fd(), &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `ep`, which stays open for as long as it
        // lives.
        Ok(Self(unsafe { register(ep, Interest::READABLE) }?))
    }
}

/// `fd` registered with the runtime for `interest` alone.
///
/// # Safety
/// `fd` must stay open, the same fd, for as long as the registration lives.
unsafe fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the caller's promise.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// Whether a parked connection's `net` has its end, an error or a
/// shutdown (bytes handed back come through the ring, and bytes readable
/// now may be a segment the verdict has yet to move).
fn has_news(net: &impl AsFd) -> io::Result<bool> {
    let r = crate::capture::poll(net.as_fd(), libc::POLLRDHUP, None)?;
    Ok(r & (libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) != 0)
}

/// SO_RCVLOWAT: setting it runs the socket's data-ready callback.
fn set_rcvlowat(sock: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
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
