//! Zero-copy forwarding between two TCP sockets: splice(2) moves payload
//! pages socket -> pipe -> socket inside the kernel, so plain (non-TLS)
//! traffic never enters user space. Used for passthrough to destinations
//! outside the mesh. Also the shared vocabulary of how a forwarded
//! connection ended ([`Copied`], [`both`]).
//!
//! A socket whose bytes may arrive through sk_msg (the agent's end of a
//! sockmap-accelerated hop) is read with recvmsg instead ([`Read::Recv`]):
//! splice reads only the TCP receive queue and would never see them.
use std::{
    future::Future,
    io::{self, ErrorKind},
    net::Shutdown,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

/// A socket the copy loops read or write: a runtime [`TcpStream`], or one
/// the caller registers as it needs (the agent's kernel path writes to a
/// socket it must not be woken on for reads).
pub trait Io: AsFd + AsRawFd + Sync {
    /// Runs the non-blocking `op` whenever the socket is ready for
    /// `interest`, until it does not return `WouldBlock`.
    fn io<R: Send>(
        &self,
        interest: Interest,
        op: impl FnMut() -> io::Result<R> + Send,
    ) -> impl Future<Output = io::Result<R>> + Send;
}

impl Io for TcpStream {
    fn io<R: Send>(
        &self,
        interest: Interest,
        op: impl FnMut() -> io::Result<R> + Send,
    ) -> impl Future<Output = io::Result<R>> + Send {
        self.async_io(interest, op)
    }
}

/// Bytes moved per splice call; the pipe is sized to hold it.
const CHUNK: usize = 256 * 1024;

/// How a bidirectional forward ended.
pub struct Copied {
    /// `ok`, `reset`, or `error: ...`.
    pub result: String,
    /// Client -> upstream bytes.
    pub sent: u64,
    /// Upstream -> client bytes.
    pub received: u64,
}

/// Forwards both ways until both sides have closed, passing half-closes on.
/// When one direction fails the connection is over and the other stops too.
pub async fn forward(client: &TcpStream, upstream: &TcpStream) -> Copied {
    forward_reading(client, Read::Splice, upstream, Read::Splice).await
}

/// How a socket is read.
pub enum Read {
    /// Zero-copy: only for sockets that receive through TCP alone.
    Splice,
    /// recvmsg into a buffer: for sockets that may receive through sk_msg.
    Recv(Hooks),
}

/// What the owner of the sockmap asks of the reader of a socket that may
/// receive through sk_msg (the agent's end of an accelerated hop).
#[derive(Default)]
pub struct Hooks {
    /// Asked once, after the first bytes (when the sender's first byte has
    /// decided how the hop goes): `true` means the bytes come through TCP
    /// for good and the socket left the sockmap, so a plain copy splices
    /// the rest, and `progress` is not called again.
    pub settle: Option<Settle>,
    /// Called with the size of every read: the owner tells the sk_msg
    /// program how much has left the socket, which bounds what may wait in
    /// it. `true` once the hop went back to TCP and every byte it
    /// redirected has been read: a plain copy splices from then on (see
    /// [`pump`]), and the hook is not called again.
    pub progress: Option<Progress>,
    /// Whatever the owner keeps for as long as the socket is read (dropped
    /// with the hooks).
    pub hold: Option<Box<dyn std::any::Any + Send>>,
}

/// See [`Hooks::settle`].
pub type Settle = Box<dyn FnOnce() -> bool + Send>;
/// See [`Hooks::progress`].
pub type Progress = Box<dyn FnMut(usize) -> bool + Send>;

impl Read {
    /// The hooks of a socket read with recvmsg (none for [`Read::Splice`]).
    pub fn into_hooks(self) -> Hooks {
        match self {
            Read::Splice => Hooks::default(),
            Read::Recv(hooks) => hooks,
        }
    }
}

impl Hooks {
    /// After a read of `n` bytes: whether the hop fell back to TCP and its
    /// redirected bytes are all read.
    pub fn read(&mut self, n: usize) -> bool {
        let drained = self.progress.as_mut().is_some_and(|p| p(n));
        if drained {
            self.progress = None;
        }
        drained
    }

    /// After the bytes of a read went on: asks `settle` the first time;
    /// whether the hop is on TCP for good.
    pub fn settled(&mut self) -> bool {
        let tcp = self.settle.take().is_some_and(|settle| settle());
        if tcp {
            self.progress = None;
        }
        tcp
    }
}

impl std::fmt::Debug for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Read::Splice => "splice",
            Read::Recv(_) => "recv",
        })
    }
}

/// [`forward`], reading `client` and `upstream` as told.
pub async fn forward_reading(
    client: &TcpStream,
    client_read: Read,
    upstream: &TcpStream,
    upstream_read: Read,
) -> Copied {
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let r = both(
        one_way(client, client_read, upstream, &sent),
        one_way(upstream, upstream_read, client, &received),
    )
    .await;
    Copied::new(r, &sent, &received)
}

/// One direction of [`forward_reading`]: `from` read as told, until EOF,
/// then `to` half-closed; `count` adds what moved.
pub async fn one_way(from: &impl Io, read: Read, to: &impl Io, count: &AtomicU64) -> io::Result<()> {
    match read {
        Read::Splice => pump(from, to, count, TcpOnly::Yes).await,
        Read::Recv(hooks) => copy(from, to, count, hooks).await,
    }
}

/// Bytes read per recvmsg in [`copy`].
pub const COPY_BUF: usize = 64 * 1024;

/// One direction through user space: recvmsg until EOF, then half-close;
/// spliced from the point `settle` says the bytes come through TCP only,
/// or `progress` that a hop that went back to TCP has no redirected byte
/// left to read.
async fn copy(from: &impl Io, to: &impl Io, count: &AtomicU64, mut hooks: Hooks) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = recv_send(from, to, &mut buf).await?;
        if n == 0 {
            return socket2::SockRef::from(to).shutdown(Shutdown::Write);
        }
        let drained = hooks.read(n);
        count.fetch_add(n as u64, Ordering::Relaxed);
        if hooks.settled() {
            return pump(from, to, count, TcpOnly::Yes).await;
        }
        if drained {
            return pump(from, to, count, TcpOnly::NotSure).await;
        }
    }
}

/// One recvmsg from `from` into `buf`, all of it sent on to `to`; the
/// bytes moved (0: EOF).
pub async fn recv_send(from: &impl Io, to: &impl Io, buf: &mut [u8]) -> io::Result<usize> {
    let n = recv(from, buf).await?;
    send_all(to, &buf[..n]).await?;
    Ok(n)
}

/// One recvmsg from `from` into `buf`, once there is something: the bytes
/// read (0: EOF).
pub async fn recv(from: &impl Io, buf: &mut [u8]) -> io::Result<usize> {
    from.io(Interest::READABLE, || {
        // SAFETY: a valid fd and a buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
    .await
}

/// Sends all of `bytes` to `to`.
pub async fn send_all(to: &impl Io, bytes: &[u8]) -> io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        at += to
            .io(Interest::WRITABLE, || {
                // SAFETY: a valid fd and the unsent part of `bytes`.
                let w = unsafe {
                    libc::send(
                        to.as_raw_fd(),
                        bytes[at..].as_ptr().cast(),
                        bytes.len() - at,
                        libc::MSG_NOSIGNAL,
                    )
                };
                if w < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(w as usize)
                }
            })
            .await?;
    }
    Ok(())
}

/// Whether a socket spliced by [`pump`] receives through TCP alone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcpOnly {
    Yes,
    /// An accelerated hop that went back to TCP: a send of the app that
    /// raced its fallback from another thread may still land in the
    /// socket's sk_msg queue, which splice never reads. On a socket in a
    /// sockmap FIONREAD counts that queue (Linux 6.18's `tcp_bpf_ioctl`;
    /// where it counts the TCP queue instead, the check only makes the
    /// pump read with recvmsg more often), so before each splice whatever
    /// waits there is read with recvmsg first. A single writer's
    /// redirected bytes were all queued before its first TCP byte was
    /// sent, and read before the pump started.
    NotSure,
}

/// Bytes in `sock`'s sk_msg queue (see [`TcpOnly::NotSure`]).
fn sk_msg_queued(sock: &impl AsRawFd) -> usize {
    unread(sock).unwrap_or(0)
}

/// What FIONREAD (SIOCINQ) says of `sock`: on a socket in no sockmap,
/// TCP's bytes received and not read; on one in a sockmap with an sk_msg
/// program, its sk_msg queue (Linux 6.18's `tcp_bpf_ioctl`).
pub fn unread(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; a valid fd.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Runs two directions of one connection; the first failure ends both.
pub async fn both(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
) -> io::Result<()> {
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => match r { Ok(()) => down.await, e => e },
        r = &mut down => match r { Ok(()) => up.await, e => e },
    }
}

impl Copied {
    /// A connection that never got to carry bytes.
    pub fn failed(result: String) -> Self {
        Copied {
            result,
            sent: 0,
            received: 0,
        }
    }

    pub fn new(r: io::Result<()>, sent: &AtomicU64, received: &AtomicU64) -> Self {
        let result = match r {
            Ok(()) => "ok".to_string(),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => "reset".to_string(),
            Err(e) => format!("error: {e}"),
        };
        Copied {
            result,
            sent: sent.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
        }
    }
}

/// One direction: splice until EOF, then half-close the destination.
async fn pump(from: &impl Io, to: &impl Io, count: &AtomicU64, tcp_only: TcpOnly) -> io::Result<()> {
    /// What the read step returns when the sk_msg queue holds bytes.
    const IN_SK_MSG: usize = usize::MAX;
    let pipe = Pipe::new()?;
    let mut buf = Vec::new();
    loop {
        let mut queued = from
            .io(Interest::READABLE, || {
                if tcp_only == TcpOnly::NotSure && sk_msg_queued(from) > 0 {
                    return Ok(IN_SK_MSG);
                }
                splice(from.as_raw_fd(), pipe.write(), CHUNK)
            })
            .await?;
        if queued == IN_SK_MSG {
            buf.resize(COPY_BUF, 0);
            let n = recv_send(from, to, &mut buf).await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        if queued == 0 {
            return socket2::SockRef::from(to).shutdown(Shutdown::Write);
        }
        while queued > 0 {
            let n = to
                .io(Interest::WRITABLE, || splice(pipe.read(), to.as_raw_fd(), queued))
                .await?;
            queued -= n;
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: valid fds, no offsets (both ends are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A non-blocking pipe between the two splices of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors we now own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per syscall; the default (64 KiB) still works.
        // SAFETY: fcntl on a pipe we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(Self { read, write })
    }
    fn read(&self) -> RawFd {
        self.read.as_raw_fd()
    }
    fn write(&self) -> RawFd {
        self.write.as_raw_fd()
    }
}
