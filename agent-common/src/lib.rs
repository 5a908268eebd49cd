//! Map keys, values and constants shared by the kernel programs (`agent-ebpf`)
//! and their user-space owner (`agent::capture`). Everything here is
//! `#[repr(C)]` with explicit padding so both sides agree on every byte.
#![no_std]

/// Pod-local port the agent listens on for captured outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// Pod-local port for captured inbound plaintext connections.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE (mTLS tunnel) port: never diverted by capture.
pub const HBONE_PORT: u16 = 15008;
/// SO_MARK on every socket the agent opens itself; capture skips it (Istio uses 1337 too).
pub const AGENT_MARK: u32 = 1337;
/// SO_MARK of the agent's connections to an application inside its pod that
/// carry the real client's address (IP_TRANSPARENT). The app's replies
/// inherit it (tcp_fwmark_accept) and a policy route keeps them local.
pub const FORWARD_MARK: u32 = 1338;
/// Routing table of that policy route, in each enrolled pod netns.
pub const FORWARD_TABLE: u32 = 133;
/// Version of the naming scheme inside the pin directory (`v1/maps/<NAME>`,
/// `v1/links/<slot>`). It does not change when a map or program changes:
/// maps carry their own shape version in their name (see [`maps`]) and
/// programs are compared by content, so agents of different releases share
/// one `v1` directory and hand over to each other in both directions.
pub const PIN_SCHEME_VERSION: u32 = 1;

/// Map names (at most 15 characters: the kernel keeps 16 bytes with the NUL).
///
/// A map is pinned by its name, and the name is its shape version: a map
/// whose key, value, type or size changes gets a new name (`STATS` ->
/// `STATS_V2`), so two releases never share a map of different shapes. Maps
/// that keep their name are shared by both releases during a handover, which
/// is what keeps the per-connection state (ORIG_DST, CONN_ORIG, LOCAL_FWD)
/// valid across an upgrade or a downgrade. The keys of a family (`STATS*`)
/// never change: tools of any release can delete by key.
pub mod maps {
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const CONN_ORIG: &str = "CONN_ORIG";
    pub const POD_IPS: &str = "POD_IPS";
    pub const INBOUND: &str = "INBOUND";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const EXCL_PORTS: &str = "EXCL_PORTS";
    pub const EXCL_CIDRS: &str = "EXCL_CIDRS";
    /// The counters family: slot `i` means the same counter in every
    /// version (slots are only appended), so counters migrate both ways.
    pub const STATS_FAMILY: &str = "STATS";
    #[cfg(not(feature = "next-layout"))]
    pub const STATS: &str = "STATS";
    /// The upgrade test's "next release": one more counter slot.
    #[cfg(feature = "next-layout")]
    pub const STATS: &str = "STATS_V2";
    pub const LOCAL_FWD: &str = "LOCAL_FWD";
    /// aya-log's ring buffer (created per load, never pinned).
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// Sockmap acceleration of the in-pod hops (`agent run --sockmap`):
    /// the applications' sockets, keyed by socket cookie; the sk_msg
    /// program is attached to this map, so it runs on their sendmsg.
    pub const SM_APP: &str = "SM_APP";
    /// The agent's end of each in-pod hop, keyed by [`super::HopKey`] as
    /// the application's socket sees it: where redirected bytes go.
    pub const SM_AGENT: &str = "SM_AGENT";
    /// Companion of SM_APP: each application socket's [`super::hop`] state
    /// (undecided, redirected, TCP), keyed by its [`super::HopKey`];
    /// removed when the socket closes.
    pub const SM_HOPS: &str = "SM_HOPS";
    /// Sockmap counters, see [`super::sockmap_stats`].
    pub const SM_STATS: &str = "SM_STATS";
    /// Companion of SM_HOPS: the bytes the agent has read from each hop
    /// (u64, keyed by [`super::HopKey`]), which bounds what waits in its
    /// socket ([`super::hop::BACKLOG_BOUND`]). sockops creates the entry
    /// with the hop state and removes it when the socket closes; the agent
    /// only updates it; the sk_msg program removes it when the hop falls
    /// back.
    pub const SM_READ: &str = "SM_READ";
    /// Phase two (agent to app, `agent run --sockmap-to-app`): the state of
    /// each hop's agent -> app direction ([`super::ToApp`]), keyed by
    /// [`super::HopKey`] *as the agent's socket sees it* (src = the agent).
    /// sockops creates it beside the app's SM_HOPS entry and removes it when
    /// the app's socket closes; the sk_msg program decides and counts in it.
    pub const SM_TO_APP: &str = "SM_TO_APP";
    /// Phase two: the bytes each app socket has read (u64, keyed by the
    /// app socket's cookie), counted by the program on the
    /// `sock_recv_length` tracepoint; bounds what waits unread in the app's
    /// socket as SM_READ does in the agent's. Created and removed with the
    /// SM_TO_APP entry.
    pub const SM_APP_READ: &str = "SM_APP_READ";
    /// Phase two: the agent's own ends of the hops whose agent -> app
    /// direction sockops prepared, keyed by socket cookie. The sk_msg
    /// program is attached here too (a second link), so it runs on the
    /// agent's sends; SM_APP keeps only the apps' sockets.
    pub const SM_AGENT_TX: &str = "SM_AGENT_TX";
    /// Phase two: the generation of the read-count program that counts (an
    /// array of one u64). Each agent loads its object with its own
    /// [`super::globals::READ_GEN`] and writes it here once its program is
    /// attached: a replaced program that something still holds attached
    /// stops counting at once, so no read is counted twice.
    pub const SM_READ_GEN: &str = "SM_READ_GEN";
    /// Phase two's counters, see [`super::to_app_stats`].
    pub const SM_TO_APP_STATS: &str = "SM_TO_APP_STATS";
    /// The kernel path (`agent run --sockmap-forward`): the agent's other
    /// socket of each forwarded hop (to the peer off the pod, or the
    /// accepted one from it), keyed by the hop's [`super::HopKey`] as the
    /// app's socket sees it (as SM_HOPS). The sk_skb verdict program is
    /// attached here; the app's sends go to these sockets' egress.
    pub const SM_NET: &str = "SM_NET";
    /// The kernel path: each forwarded hop's [`super::Fwd`], keyed by the
    /// app's [`super::HopKey`]. The agent creates it when its socket joins
    /// SM_NET and removes it when the connection ends.
    pub const SM_FWD: &str = "SM_FWD";
    /// The kernel path: a SM_NET socket's cookie -> its hop's app key (the
    /// verdict program knows only the socket it runs on).
    pub const SM_NET_HOP: &str = "SM_NET_HOP";
    /// The kernel path's counters, see [`super::fwd_stats`].
    pub const SM_FWD_STATS: &str = "SM_FWD_STATS";
    /// The kernel path's hand-backs (a ring buffer of SM_NET socket
    /// cookies); not pinned: each agent reads its own.
    pub const SM_FWD_EVENTS: &str = "SM_FWD_EVENTS";
    /// Hand-backs the full ring could not take (one per-CPU counter).
    pub const SM_FWD_LOST: &str = "SM_FWD_LOST";
    /// The kernel path: the generation of the send-count program that
    /// counts (an array of one u64), as [`SM_READ_GEN`] is the read
    /// count's: each agent writes its [`super::globals::READ_GEN`] here
    /// once its program is attached, so no send is counted twice.
    pub const SM_SENT_GEN: &str = "SM_SENT_GEN";
}

/// Globals of the kernel object that the agent sets at load.
pub mod globals {
    /// The generation of this load (see `maps::SM_READ_GEN` and
    /// `maps::SM_SENT_GEN`).
    pub const READ_GEN: &str = "READ_GEN";
}

/// Program names (the Rust function names in agent-ebpf).
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    pub const GETPEERNAME6: &str = "mesh_getpeer6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// sk_msg verdict program, attached to the SM_APP sockhash (and, with
    /// phase two, to SM_AGENT_TX).
    pub const SK_MSG: &str = "mesh_sk_msg";
    /// On the `sock_recv_length` tracepoint: counts what each phase-two
    /// app socket reads (SM_APP_READ).
    pub const APP_READ: &str = "mesh_app_read";
    /// The tracepoint [`APP_READ`] runs on (Linux 6.3+).
    pub const APP_READ_TRACEPOINT: &str = "sock_recv_length";
    /// sk_skb verdict program, attached to SM_NET (the kernel path): moves
    /// what arrives on the agent's other socket of a forwarded hop into the
    /// app's socket.
    pub const SK_SKB: &str = "mesh_sk_skb";
    /// On the `sock_send_length` tracepoint (the kernel path): adds what
    /// each forwarded hop's agent socket sent to the hop's SM_READ count.
    pub const FWD_SENT: &str = "mesh_fwd_sent";
    /// The tracepoint [`FWD_SENT`] runs on (Linux 6.3+).
    pub const FWD_SENT_TRACEPOINT: &str = "sock_send_length";
}

/// `PodEntry::flags` bits.
pub mod pod_flags {
    /// Sockmap acceleration is on for this pod: sockops puts the app's ends
    /// of the in-pod hops into SM_APP.
    pub const SOCKMAP: u32 = 1;
    /// Phase two is on too (with [`SOCKMAP`]): sockops also prepares the
    /// agent -> app direction of each hop (SM_TO_APP, SM_APP_READ), which
    /// the agent may then redirect into the app's socket.
    pub const SOCKMAP_TO_APP: u32 = 2;
}

/// States of an application socket in SM_HOPS. A hop is redirected from its
/// first byte or never: its first sendmsg decides, once.
pub mod hop {
    /// No byte sent yet.
    pub const UNDECIDED: u32 = 0;
    /// The first byte found the agent's end in SM_AGENT: every byte is
    /// redirected into it (while it exists).
    pub const REDIRECT: u32 = 1;
    /// The first byte found no agent end: the hop stays on TCP for good
    /// (switching later could deliver newer bytes before older ones).
    pub const TCP: u32 = 2;
    /// Redirected, then sent back to TCP for good by the sk_msg program,
    /// because more than [`BACKLOG_BOUND`] bytes wait in the agent's socket
    /// (a redirected send never blocks, so a bulk sender would take the
    /// CPU its bytes need, and their memory is not bounded by any buffer). The agent's socket stays in SM_AGENT and
    /// is read with recvmsg, which returns the redirected bytes before the
    /// TCP ones: nothing is reordered.
    pub const FALLBACK: u32 = 3;

    /// A SM_HOPS value holds the state in its low two bits and, above
    /// them, the bytes redirected so far modulo 2^30 (written by the sk_msg
    /// program, kept when the hop falls back). Values of releases that
    /// stored the state alone read the same (nothing redirected counted).
    pub const STATE_BITS: u32 = 2;
    const STATE_MASK: u32 = (1 << STATE_BITS) - 1;
    const SENT_MASK: u32 = u32::MAX >> STATE_BITS;

    /// Redirected bytes that may wait in the agent's socket, unread: beyond
    /// it the sk_msg program sends the hop back to TCP ([`FALLBACK`]). A
    /// redirected send never blocks and the kernel bounds that queue by no
    /// buffer, so without it a sender whose agent is not reading (its
    /// downstream is full, or it is starved of CPU) would queue without
    /// limit. Four of the agent's reads: a request or reply of an ordinary
    /// protocol stays below it, a bulk sender passes it at once.
    pub const BACKLOG_BOUND: u32 = 256 * 1024;

    /// The agent reports the bytes it has read (SM_READ) at least every
    /// this many bytes, so the program's view lags by at most this much.
    pub const READ_REPORT_STEP: u64 = 64 * 1024;

    /// The state of a SM_HOPS value.
    pub const fn state(value: u32) -> u32 {
        value & STATE_MASK
    }

    /// `state` with `sent` redirected bytes (modulo 2^30).
    pub const fn with_sent(state: u32, sent: u32) -> u32 {
        (sent & SENT_MASK) << STATE_BITS | (state & STATE_MASK)
    }

    /// The redirected bytes (modulo 2^30) of a SM_HOPS value.
    pub const fn sent(value: u32) -> u32 {
        value >> STATE_BITS
    }

    /// Bytes redirected but not yet reported read: `sent - read` modulo
    /// 2^30, exact while fewer than 2^30 wait (the bound keeps far below).
    pub const fn unread(value: u32, read: u64) -> u32 {
        sent(value).wrapping_sub(read as u32) & SENT_MASK
    }

    /// Whether redirecting `size` more bytes would leave more than
    /// [`BACKLOG_BOUND`] unread, `read` of the hop's (value `value`)
    /// redirected bytes being read: the bound of both directions.
    pub const fn over_bound(value: u32, read: u64, size: u32) -> bool {
        unread(value, read) as u64 + size as u64 > BACKLOG_BOUND as u64
    }

    /// Whether `read` bytes cover the `sent` redirected ones of a hop that
    /// fell back (both modulo 2^30; the reader is never more than 2^29
    /// bytes past them when it asks: it asks after every read).
    pub const fn read_all(sent: u32, read: u64) -> bool {
        (read as u32).wrapping_sub(sent) & SENT_MASK < 1 << 29
    }
}

/// An IP address in IPv6 form (IPv4 as `::ffff:a.b.c.d`), stored as the kernel
/// hands it over: four 32-bit words whose in-memory bytes are the address
/// bytes in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip6 {
    pub words: [u32; 4],
}

impl Ip6 {
    /// Word 2 of an IPv4-mapped address (`0000:ffff`) in memory order.
    pub const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// From an IPv4 address as the kernel stores it (network order in memory).
    pub const fn from_v4_raw(ip4: u32) -> Self {
        Self {
            words: [0, 0, Self::MAPPED_PREFIX, ip4],
        }
    }

    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.words[i].to_ne_bytes();
            o[i * 4] = b[0];
            o[i * 4 + 1] = b[1];
            o[i * 4 + 2] = b[2];
            o[i * 4 + 3] = b[3];
            i += 1;
        }
        o
    }

    pub const fn is_v4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::MAPPED_PREFIX
    }

    /// 127.0.0.0/8 (also as ::ffff:127.x) or ::1.
    pub const fn is_loopback(&self) -> bool {
        if self.is_v4_mapped() {
            return self.words[3].to_ne_bytes()[0] == 127;
        }
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == 0
            && self.words[3] == u32::from_ne_bytes([0, 0, 0, 1])
    }
}

/// Per enrolled pod netns (key: netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's id, issued by the agent that enrolled it (from a random
    /// start per agent): logs, and which agent may remove its entries.
    pub pod_id: u32,
    pub flags: u32,
}

/// The destination an application dialled, before capture rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Ip6,
    /// Port in host byte order.
    pub port: u16,
    /// 4 when dialled through an AF_INET socket, 6 for AF_INET6 (incl. mapped).
    pub family: u16,
    pub _pad: u32,
}

/// Key of a redirected connection as the agent sees it after accept():
/// the pod netns plus the client's (loopback) address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub addr: Ip6,
    /// Client port in host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A socket address as sk_lookup sees the remote end (port in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub addr: Ip6,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// One end of an in-pod hop, always in the orientation of the application's
/// socket (`src` = the app's address, `dst` = its peer's), in the pod's
/// network namespace. IPv4 and IPv4-mapped IPv6 addresses are both stored as
/// `::ffff:a.b.c.d`, so an AF_INET6 app talking to a mapped address and the
/// agent's AF_INET socket meet under one key. The netns cookie keeps pods
/// apart: every pod's client hop is `127.0.0.1:eph -> 127.0.0.1:15001`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HopKey {
    pub netns_cookie: u64,
    pub src: Ip6,
    pub dst: Ip6,
    /// Ports in host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
}

impl HopKey {
    /// The same hop as its other end sees it (src and dst swapped): the key
    /// of the agent's socket for an app's key, and back.
    pub const fn reversed(&self) -> Self {
        HopKey {
            netns_cookie: self.netns_cookie,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            _pad: 0,
        }
    }
}

/// The agent -> app direction of an in-pod hop (phase two), in SM_TO_APP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToApp {
    /// A [`hop`] state with the bytes redirected so far, as in SM_HOPS.
    /// Written only by the sk_msg program, on the agent's sends.
    pub value: u32,
    /// Non-zero once the app's own direction sends through TCP (it went
    /// TCP or fell back): the agent's next send stops redirecting, so that
    /// the app's socket can leave SM_APP once it has read what was
    /// redirected. Written only on the app's side.
    pub app_tcp: u32,
    /// The app socket's cookie: its key in SM_APP (where the redirect
    /// goes) and in SM_APP_READ.
    pub app_cookie: u64,
}

/// A hop forwarded in the kernel (`agent run --sockmap-forward`), in SM_FWD.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fwd {
    /// [`fwd::FORWARD`] while the verdict program moves what arrives on the
    /// agent's other socket into the app's, [`fwd::PASSED`] once it passed
    /// a segment to that socket (for good: the agent reads it from then on).
    /// Written by the verdict program only.
    pub replies: u32,
    /// Non-zero once the app's socket closed (written by sockops): the entry
    /// then belongs to no socket that may send, and its agent still reads
    /// its counts. A later connection of the same hop never uses it.
    pub app_gone: u32,
    /// The app socket's cookie: its key in SM_APP and SM_APP_READ.
    pub app_cookie: u64,
    /// The cookie of the agent's other socket: the verdict acts only on the
    /// entry of the socket it runs on.
    pub net_cookie: u64,
    /// Bytes the app's sends moved straight to the other socket (written
    /// by the sk_msg program, under the app socket's lock).
    pub sent: u64,
    /// Bytes the verdict moved into the app's socket.
    pub received: u64,
}

/// [`Fwd::replies`] states.
pub mod fwd {
    /// The verdict moves each segment into the app's socket.
    pub const FORWARD: u32 = 0;
    /// The verdict passed a segment to the agent's socket: it passes every
    /// later one too, and the agent reads them, once the app has read all
    /// it was given.
    pub const PASSED: u32 = 1;
}

/// Indexes of the per-CPU counters in SM_FWD_STATS (slots only append).
pub mod fwd_stats {
    /// App sends moved straight to the egress of the agent's other socket.
    pub const SENT: u32 = 0;
    /// Segments moved by the verdict into the app's socket.
    pub const RECEIVED: u32 = 1;
    /// Hops whose replies the verdict passed to the agent for good: more
    /// than [`super::hop::BACKLOG_BOUND`] unread in the app's socket, the
    /// app's socket gone, or its direction no longer redirected.
    pub const PASSED: u32 = 2;
    pub const COUNT: u32 = 3;
    pub const NAMES: [&str; 3] = ["sent", "received", "passed"];
}

/// Indexes of the per-CPU counters in SM_TO_APP_STATS (slots only append).
pub mod to_app_stats {
    /// Agent sends redirected into the app's socket.
    pub const REDIRECTED: u32 = 0;
    /// Directions left on TCP for good: the agent's first send found no app
    /// socket in SM_APP, or the app's own direction had gone TCP first.
    pub const PEER_MISSING: u32 = 1;
    /// Redirected directions sent back to TCP: more than
    /// [`super::hop::BACKLOG_BOUND`] unread in the app's socket, or the
    /// app's own direction went TCP (its socket must leave SM_APP).
    pub const FALLBACK: u32 = 2;
    /// Sends of a redirected direction passed to TCP because the app's
    /// socket had left SM_APP (it closed): never a drop.
    pub const PEER_GONE: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; 4] = ["redirected", "peer_missing", "fallback", "peer_gone"];
}

/// Indexes of the per-CPU counters in the SM_STATS map (slots only append).
pub mod sockmap_stats {
    /// Messages (sendmsg calls) redirected into the agent's socket.
    pub const REDIRECTED: u32 = 0;
    /// Hops left on TCP for good: their first message found no agent end,
    /// or their first bytes reached TCP without sk_msg (TCP Fast Open).
    pub const PEER_MISSING: u32 = 1;
    /// Messages of a redirected hop passed to TCP because the agent's end
    /// had left SM_AGENT (it closed): never a drop.
    pub const PEER_GONE: u32 = 2;
    /// Application sockets put into SM_APP by sockops.
    pub const APP_INSERTED: u32 = 3;
    /// Application sockets sockops could not put into SM_APP (map full):
    /// they stay on TCP.
    pub const APP_INSERT_FAILED: u32 = 4;
    pub const COUNT: u32 = 5;
    pub const NAMES: [&str; 5] = [
        "redirected",
        "peer_missing",
        "peer_gone",
        "app_inserted",
        "app_insert_failed",
    ];
}

/// Indexes of the per-CPU counters in the STATS map.
pub mod stats {
    /// Outbound connects redirected to the agent.
    pub const OUTBOUND_REDIRECTED: u32 = 0;
    /// Outbound connects of enrolled pods let through (loopback, excluded, agent's own).
    pub const OUTBOUND_SKIPPED: u32 = 1;
    /// Redirected connects whose original destination could not be recorded:
    /// the connect is refused (fail closed).
    pub const OUTBOUND_REFUSED: u32 = 2;
    /// Inbound connections handed to the agent's 15006 listener.
    pub const INBOUND_REDIRECTED: u32 = 3;
    /// Inbound connections to an enrolled pod refused because no agent listener exists.
    pub const INBOUND_REFUSED: u32 = 4;
    /// Inbound connections of enrolled pods let through (HBONE port, loopback, node probes).
    pub const INBOUND_SKIPPED: u32 = 5;
    /// getpeername answers rewritten to the dialled address (only counted by
    /// the upgrade test's "next release" build).
    #[cfg(feature = "next-layout")]
    pub const PEERNAME_REWRITTEN: u32 = 6;
    #[cfg(not(feature = "next-layout"))]
    pub const COUNT: u32 = 6;
    #[cfg(feature = "next-layout")]
    pub const COUNT: u32 = 7;
    /// Names of every slot any release has defined (slots are only appended);
    /// a release reads the first [`COUNT`].
    pub const NAMES: [&str; 7] = [
        "outbound_redirected",
        "outbound_skipped",
        "outbound_refused",
        "inbound_redirected",
        "inbound_refused",
        "inbound_skipped",
        "peername_rewritten",
    ];
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all are #[repr(C)], Copy, contain only integers, and have
    // explicit padding fields, so every byte pattern is valid.
    unsafe impl aya::Pod for super::Ip6 {}
    unsafe impl aya::Pod for super::PodEntry {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::HopKey {}
    unsafe impl aya::Pod for super::ToApp {}
    unsafe impl aya::Pod for super::Fwd {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<Ip6>(), 16);
        assert_eq!(core::mem::size_of::<OrigDst>(), 24);
        assert_eq!(core::mem::size_of::<ConnKey>(), 32);
        assert_eq!(core::mem::size_of::<PodEntry>(), 8);
        assert_eq!(core::mem::size_of::<SockKey>(), 24);
        assert_eq!(core::mem::size_of::<HopKey>(), 48);
        assert_eq!(core::mem::size_of::<Fwd>(), 40);
    }

    #[test]
    fn map_names_fit_the_kernel_and_every_counter_slot_has_a_name() {
        for name in [
            maps::ENROLLED_NETNS,
            maps::ORIG_DST,
            maps::CONN_ORIG,
            maps::POD_IPS,
            maps::INBOUND,
            maps::NODE_ADDRS,
            maps::EXCL_PORTS,
            maps::EXCL_CIDRS,
            maps::STATS,
            maps::LOCAL_FWD,
            maps::SM_APP,
            maps::SM_AGENT,
            maps::SM_HOPS,
            maps::SM_STATS,
            maps::SM_READ,
            maps::SM_TO_APP,
            maps::SM_APP_READ,
            maps::SM_AGENT_TX,
            maps::SM_TO_APP_STATS,
            maps::SM_READ_GEN,
            maps::SM_NET,
            maps::SM_FWD,
            maps::SM_NET_HOP,
            maps::SM_FWD_STATS,
            maps::SM_SENT_GEN,
        ] {
            assert!(name.len() <= 15, "{name}: the kernel keeps 15 characters");
        }
        assert!(stats::NAMES.len() >= stats::COUNT as usize);
        assert_eq!(sockmap_stats::NAMES.len(), sockmap_stats::COUNT as usize);
        assert_eq!(to_app_stats::NAMES.len(), to_app_stats::COUNT as usize);
        assert_eq!(fwd_stats::NAMES.len(), fwd_stats::COUNT as usize);
    }

    #[test]
    fn a_hop_value_keeps_its_state_and_counts_unread_bytes_across_the_wrap() {
        // Values of releases that stored the state alone.
        for st in [hop::UNDECIDED, hop::REDIRECT, hop::TCP, hop::FALLBACK] {
            assert_eq!(hop::state(st), st);
            assert_eq!(hop::unread(st, 0), 0);
        }
        let v = hop::with_sent(hop::REDIRECT, 300_000);
        assert_eq!((hop::state(v), hop::sent(v)), (hop::REDIRECT, 300_000));
        assert_eq!(hop::unread(v, 100_000), 200_000);
        // 2^30 + 10 bytes redirected (stored as 10), all but 5 of them read.
        let wrapped = hop::with_sent(hop::REDIRECT, (1u64 << 30) as u32 + 10);
        assert_eq!(hop::sent(wrapped), 10);
        assert_eq!(hop::unread(wrapped, (1u64 << 30) + 5), 5);
        assert_eq!(hop::unread(wrapped, 1u64 << 30), 10);
        // Read reported past a gigabyte boundary while sent is just below.
        let below = hop::with_sent(hop::REDIRECT, (1u32 << 30) - 4);
        assert_eq!(hop::unread(below, (1u64 << 30) - 4), 0);
        // A hop that fell back after 3 GiB + 100 bytes redirected.
        let sent = hop::sent(hop::with_sent(hop::FALLBACK, ((3u64 << 30) + 100) as u32));
        assert!(!hop::read_all(sent, (3 << 30) + 99));
        assert!(hop::read_all(sent, (3 << 30) + 100));
        assert!(hop::read_all(sent, (3 << 30) + 100 + (1 << 20)));
        assert!(!hop::read_all(
            hop::sent(hop::with_sent(hop::FALLBACK, 5)),
            (1 << 30) + 4
        ));
        // The bound: 256 KiB may wait unread, not a byte more (200,000 of
        // 300,000 redirected bytes unread).
        let v = hop::with_sent(hop::REDIRECT, 300_000);
        let room = hop::BACKLOG_BOUND - 200_000;
        assert!(!hop::over_bound(v, 100_000, room));
        assert!(hop::over_bound(v, 100_000, room + 1));
    }

    #[test]
    fn v4_mapped_and_loopback() {
        let lo4 = Ip6::from_v4_raw(u32::from_ne_bytes([127, 0, 0, 9]));
        assert!(lo4.is_v4_mapped() && lo4.is_loopback());
        let pod = Ip6::from_v4_raw(u32::from_ne_bytes([10, 1, 1, 11]));
        assert!(pod.is_v4_mapped() && !pod.is_loopback());
        let mut six = [0u8; 16];
        six[15] = 1;
        assert!(Ip6::from_octets(six).is_loopback());
        assert_eq!(Ip6::from_octets(six).octets(), six);
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 1, 1, 11]);
        assert_eq!(Ip6::from_octets(mapped), pod);
    }
}
