//! Kernel programs of the mesh agent: transparent in-pod capture.
//!
//! * `cgroup/connect4|6` send an enrolled pod's TCP connects to the agent's
//!   pod-local outbound listener and remember where they were going
//!   (ORIG_DST, keyed by socket cookie).
//! * `sockops` copies that destination to CONN_ORIG, keyed by what the agent
//!   sees after accept() (pod netns cookie + client address and port), and
//!   forgets ORIG_DST when the socket closes.
//! * `cgroup/getpeername4|6` show the application the address it dialled.
//! * `sk_lookup` (one link per pod netns) hands new inbound connections to
//!   the agent's 15006 listener; with no listener it refuses them (fail
//!   closed) instead of delivering them around the agent.
//! * Sockmap acceleration (pods enrolled with `pod_flags::SOCKMAP`): sockops
//!   puts the application's end of each in-pod hop whose reader is the
//!   agent into SM_APP (the app's redirected connect to 15001, and the app's
//!   accepted socket of the agent's connection to it); `sk_msg`, attached to
//!   SM_APP, moves the app's bytes straight into the agent's socket
//!   (SM_AGENT, inserted by the agent itself) instead of through TCP on
//!   `lo`. A hop is redirected from its first byte or never (SM_HOPS).
//! * Phase two (pods with `pod_flags::SOCKMAP_TO_APP`): the same program,
//!   attached to SM_AGENT_TX too, moves the agent's writes into the app's
//!   socket (SM_TO_APP, under the same rules), and `mesh_app_read` on the
//!   `sock_recv_length` tracepoint counts what the apps read (SM_APP_READ),
//!   which bounds what waits unread in their sockets.
//! * The kernel path (`agent run --sockmap-forward`): `mesh_sk_skb`, the
//!   verdict on the agent's other socket of a forwarded hop (SM_NET), moves
//!   replies straight into the app's socket; the app's sends go straight to
//!   that socket's egress once the agent has forwarded all it was given,
//!   which `mesh_fwd_sent` on the `sock_send_length` tracepoint counts.
//!
//! Every decision is also logged at debug level with aya-log (the reason a
//! connection was or was not captured). The agent sets `AYA_LOG_LEVEL` at
//! load time: 0 unless `agent run --bpf-log`, and since the level lives in
//! frozen read-only data the verifier drops the logging code entirely then.
//!
//! The user-space owner of every program and map is `agent::capture`.
#![no_std]
#![no_main]
// An atomic add on a map value: this target has no atomics in `core`, but
// the BPF instruction set has one (`lock xadd`), which the intrinsic emits.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::ptr::read_volatile;

use agent_common::{
    fwd, fwd_stats, hop, pod_flags, sockmap_stats, stats, to_app_stats, ConnKey, Fwd, HopKey, Ip6, OrigDst, PodEntry,
    SockKey, ToApp, AGENT_MARK, FORWARD_MARK, HBONE_PORT, OUTBOUND_PORT,
};
use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem},
    macros::{btf_tracepoint, cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops, stream_verdict},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{BtfTracePointContext, SkBuffContext, SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `lo` has ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// 127.0.0.1 as the kernel stores it (network order in memory).
const LOOPBACK4_RAW: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1
const LOOPBACK6: Ip6 = Ip6::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
/// recv(2)'s MSG_PEEK: a peek leaves the bytes queued.
const MSG_PEEK: i32 = 2;
/// recv(2)'s MSG_ERRQUEUE: reads the error queue, not the data.
const MSG_ERRQUEUE: i32 = 0x2000;
/// A map insert's answer when the key exists (BPF_NOEXIST).
const EEXIST: i32 = 17;
const ALLOW: i32 = 1;
const DENY: i32 = 0;

// Every map is pinned by name under the agent's pin directory so capture
// (and the fail-closed behaviour) survives agent restarts.

/// Enrolled pods: netns cookie -> pod entry.
#[map]
static ENROLLED_NETNS: HashMap<u64, PodEntry> = HashMap::pinned(4096, 0);
/// Original destination of a redirected socket, keyed by its socket cookie.
#[map]
static ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);
/// Original destination keyed by what the agent sees after accept().
#[map]
static CONN_ORIG: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65536, 0);
/// IPs of enrolled pods (sk_lookup cannot see the netns cookie).
#[map]
static POD_IPS: HashMap<Ip6, u32> = HashMap::pinned(8192, 0);
/// The agent's inbound (15006) listener of each enrolled pod, keyed by pod IP.
#[map]
static INBOUND: SockHash<Ip6> = SockHash::pinned(8192, 0);
/// Node addresses: their connections (kubelet probes) reach the app directly.
#[map]
static NODE_ADDRS: HashMap<Ip6, u32> = HashMap::pinned(64, 0);
/// Destination ports never redirected (host byte order).
#[map]
static EXCL_PORTS: HashMap<u16, u32> = HashMap::pinned(256, 0);
/// Destination CIDRs never redirected (IPv4 as ::ffff:0:0/96 + prefix).
#[map]
static EXCL_CIDRS: LpmTrie<Ip6, u32> = LpmTrie::pinned(256, 0);
/// The agent's own connections to an app carrying the client's source
/// address: sk_lookup lets them through (key: their source address).
#[map]
static LOCAL_FWD: LruHashMap<SockKey, u32> = LruHashMap::pinned(65536, 0);
/// Counters, see `agent_common::stats`. The name carries the shape version
/// (`agent_common::maps::STATS`).
#[cfg_attr(not(feature = "next-layout"), map(name = "STATS"))]
#[cfg_attr(feature = "next-layout", map(name = "STATS_V2"))]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

/// Application ends of the in-pod hops (key: socket cookie); sk_msg is
/// attached here. The kernel drops an entry when its socket closes.
#[map]
static SM_APP: SockHash<u64> = SockHash::pinned(65536, 0);
/// The agent's ends, inserted by the agent (its sockets are not in our
/// cgroups), keyed as the app's socket sees the hop.
#[map]
static SM_AGENT: SockHash<HopKey> = SockHash::pinned(65536, 0);
/// Each app end's hop state (`agent_common::hop`). A plain hash, never LRU:
/// an evicted TCP decision could turn into a redirect mid-stream.
#[map]
static SM_HOPS: HashMap<HopKey, u32> = HashMap::pinned(65536, 0);
/// Sockmap counters, see `agent_common::sockmap_stats`.
#[map]
static SM_STATS: PerCpuArray<u64> = PerCpuArray::pinned(sockmap_stats::COUNT, 0);
/// The bytes the agent has read from each hop (`agent_common::maps::SM_READ`):
/// created with the hop state, updated by the agent, gone at close or
/// fallback.
#[map]
static SM_READ: HashMap<HopKey, u64> = HashMap::pinned(65536, 0);
/// Phase two: each hop's agent -> app direction (`agent_common::ToApp`),
/// keyed as the agent's socket sees the hop. A plain hash, as SM_HOPS.
#[map]
static SM_TO_APP: HashMap<HopKey, ToApp> = HashMap::pinned(65536, 0);
/// Phase two: what each app socket has read out of its sk_msg queue (key:
/// its cookie), counted by `mesh_app_read`.
#[map]
static SM_APP_READ: HashMap<u64, u64> = HashMap::pinned(65536, 0);
/// Phase two: the agent's ends whose agent -> app direction is prepared
/// (key: socket cookie); sk_msg is attached here too.
#[map]
static SM_AGENT_TX: SockHash<u64> = SockHash::pinned(65536, 0);
/// Phase two: the generation of the read-count program that counts (one
/// u64): the agent that attaches its program writes its [`READ_GEN`] here,
/// so that two attached programs never count the same read twice.
#[map]
static SM_READ_GEN: Array<u64> = Array::pinned(1, 0);
/// This object's read-count generation, set by the agent at load. Its
/// initial value is an unlikely one on purpose: LLVM may let another
/// constant of equal bytes share a named global's storage, which the
/// override then changes too (seen: with 0 here, a random value written at
/// load sent phase-two directions to TCP after their first send; with 0
/// written, or with this initial value, it does not).
#[no_mangle]
static READ_GEN: u64 = 0x5245_4144_5f47_454e;
/// Phase two's counters, see `agent_common::to_app_stats`.
#[map]
static SM_TO_APP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(to_app_stats::COUNT, 0);

/// The kernel path (`agent run --sockmap-forward`): the agent's other
/// socket of each forwarded hop, keyed by the app's hop key; the verdict
/// program is attached here.
#[map]
static SM_NET: SockHash<HopKey> = SockHash::pinned(65536, 0);
/// The kernel path: each forwarded hop's state and byte counts, keyed by
/// the app's hop key. The agent creates and removes it; LRU, so that the
/// entries of an agent that died never fill it (an evicted live entry only
/// sends its hop back through the agent, in order).
#[map]
static SM_FWD: LruHashMap<HopKey, Fwd> = LruHashMap::pinned(65536, 0);
/// The kernel path: a SM_NET socket's cookie -> its hop's app key. LRU
/// for the same reason.
#[map]
static SM_NET_HOP: LruHashMap<u64, HopKey> = LruHashMap::pinned(65536, 0);
/// The kernel path's counters, see `agent_common::fwd_stats`.
#[map]
static SM_FWD_STATS: PerCpuArray<u64> = PerCpuArray::pinned(fwd_stats::COUNT, 0);
/// The kernel path: the generation of the send-count program that counts
/// (`mesh_fwd_sent`), as SM_READ_GEN is the read count's.
#[map]
static SM_SENT_GEN: Array<u64> = Array::pinned(1, 0);
/// The kernel path's hand-backs: the cookie of each SM_NET socket whose
/// verdict passed a segment to it for good, or passed a segment of a
/// socket whose hop entries are gone or another connection's (once). The
/// agent watches a forwarding socket without read interest (the socket's
/// data-ready callback runs after every segment the verdict moves, and
/// would wake it for nothing), so this is what tells it to read again.
/// Not pinned: a socket keeps the verdict program, and so the ring, of the
/// agent that inserted it.
#[map]
static SM_FWD_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
/// Hand-backs that found SM_FWD_EVENTS full: the agent then looks at every
/// parked socket. Not pinned, as the ring.
#[map]
static SM_FWD_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Adds one to slot `idx` of a per-CPU counters map.
#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, idx: u32) {
    if let Some(c) = counters.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_sm(idx: u32) {
    bump(&SM_STATS, idx);
}

#[inline(always)]
fn count_to_app(idx: u32) {
    bump(&SM_TO_APP_STATS, idx);
}

#[inline(always)]
fn count_fwd(idx: u32) {
    bump(&SM_FWD_STATS, idx);
}

#[inline(always)]
fn count(idx: u32) {
    bump(&STATS, idx);
}

enum Outbound {
    /// Not ours or explicitly excluded: leave the connect alone.
    Pass,
    /// Send to the agent's pod-local listener.
    Redirect,
    /// Enrolled but the destination could not be recorded: refuse.
    Refuse,
}

/// The decision shared by connect4 and connect6.
#[inline(always)]
fn outbound_verdict(ctx: &SockAddrContext, dst: Ip6, port: u16, family: u16) -> Outbound {
    // SAFETY: the kernel hands a valid bpf_sock_addr to sock_addr programs.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Outbound::Pass;
    }
    // SAFETY: helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ip = dst.octets();
    // SAFETY: read-only lookup, value is Copy-checked below only for presence.
    let Some(pod) = (unsafe { ENROLLED_NETNS.get(&netns) }).copied() else {
        debug!(
            ctx,
            "connect{} [{:i}]:{} netns {} not enrolled: pass", family, ip, port, netns
        );
        return Outbound::Pass;
    };
    // SAFETY: ctx->sk is always a valid socket in sock_addr programs.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == AGENT_MARK || mark == FORWARD_MARK {
        debug!(
            ctx,
            "connect{} [{:i}]:{} pod {}: agent's own socket (mark {}): pass", family, ip, port, pod.pod_id, mark
        );
        count(stats::OUTBOUND_SKIPPED);
        return Outbound::Pass;
    }
    if dst.is_loopback() || dst.words == [0; 4] || is_v4_unspecified(&dst) {
        debug!(
            ctx,
            "connect{} [{:i}]:{} pod {}: loopback or unspecified destination: pass", family, ip, port, pod.pod_id
        );
        count(stats::OUTBOUND_SKIPPED);
        return Outbound::Pass;
    }
    // SAFETY: read-only lookups.
    if unsafe { EXCL_PORTS.get(&port) }.is_some() {
        debug!(
            ctx,
            "connect{} [{:i}]:{} pod {}: excluded port: pass", family, ip, port, pod.pod_id
        );
        count(stats::OUTBOUND_SKIPPED);
        return Outbound::Pass;
    }
    if EXCL_CIDRS.get(&Key::new(128, dst)).is_some() {
        debug!(
            ctx,
            "connect{} [{:i}]:{} pod {}: excluded CIDR: pass", family, ip, port, pod.pod_id
        );
        count(stats::OUTBOUND_SKIPPED);
        return Outbound::Pass;
    }
    // SAFETY: helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port,
        family,
        _pad: 0,
    };
    if ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        debug!(
            ctx,
            "connect{} [{:i}]:{} pod {}: cannot record the original destination: refused", family, ip, port, pod.pod_id
        );
        count(stats::OUTBOUND_REFUSED);
        return Outbound::Refuse;
    }
    debug!(
        ctx,
        "connect{} [{:i}]:{} pod {}: redirected to the agent (port {}, socket {})",
        family,
        ip,
        port,
        pod.pod_id,
        OUTBOUND_PORT,
        cookie
    );
    count(stats::OUTBOUND_REDIRECTED);
    Outbound::Redirect
}

/// Reads a 4-word context field word by word with constant offsets.
#[inline(always)]
unsafe fn read_ctx4(f: &[u32; 4]) -> [u32; 4] {
    // SAFETY: caller passes a field of a valid context.
    unsafe {
        [
            read_volatile(&f[0]),
            read_volatile(&f[1]),
            read_volatile(&f[2]),
            read_volatile(&f[3]),
        ]
    }
}

#[inline(always)]
fn is_v4_unspecified(dst: &Ip6) -> bool {
    dst.is_v4_mapped() && dst.words[3] == 0
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = Ip6::from_v4_raw(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    match outbound_verdict(&ctx, dst, port, 4) {
        Outbound::Pass => ALLOW,
        Outbound::Refuse => DENY,
        Outbound::Redirect => {
            sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = Ip6 {
        words: [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]],
    };
    let port = u16::from_be(sa.user_port as u16);
    match outbound_verdict(&ctx, dst, port, 6) {
        Outbound::Pass => ALLOW,
        Outbound::Refuse => DENY,
        Outbound::Redirect => {
            // An IPv4-mapped destination is really an IPv4 connection: send it
            // to the IPv4 listener (::ffff:127.0.0.1), everything else to ::1.
            let to = if dst.is_v4_mapped() {
                Ip6::from_v4_raw(u32::from_ne_bytes([127, 0, 0, 1]))
            } else {
                Ip6::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
            };
            sa.user_ip6[0] = to.words[0];
            sa.user_ip6[1] = to.words[1];
            sa.user_ip6[2] = to.words[2];
            sa.user_ip6[3] = to.words[3];
            sa.user_port = u32::from(OUTBOUND_PORT.to_be());
            ALLOW
        }
    }
}

#[inline(always)]
fn dialled(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper only reads the context; map value is plain data.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIG_DST.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = dialled(&ctx) {
        // SAFETY: valid context for the whole program run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.addr.words[3];
        sa.user_port = u32::from(orig.port.to_be());
        #[cfg(feature = "next-layout")]
        count(stats::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = dialled(&ctx) {
        // SAFETY: valid context for the whole program run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[0] = orig.addr.words[0];
        sa.user_ip6[1] = orig.addr.words[1];
        sa.user_ip6[2] = orig.addr.words[2];
        sa.user_ip6[3] = orig.addr.words[3];
        sa.user_port = u32::from(orig.port.to_be());
        #[cfg(feature = "next-layout")]
        count(stats::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => publish_conn(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => passive_hop(&ctx),
        BPF_SOCK_OPS_RTT_CB => release_tcp_hop(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => segment_out(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: helper only reads the context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST.remove(&cookie);
            // The hop state leaves with its socket (SM_APP's entry is
            // dropped by the kernel itself).
            let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
            let key = ops_hop_key(&ctx, netns);
            let _ = SM_HOPS.remove(key);
            let _ = SM_READ.remove(key);
            // An app socket's phase-two entries (none for other sockets).
            let _ = SM_TO_APP.remove(&key.reversed());
            let _ = SM_APP_READ.remove(&cookie);
            // Its kernel-path entry stays for its agent to count, marked,
            // so that a later socket on the same addresses and ports never
            // takes it for its own (see forward_send).
            if let Some(f) = SM_FWD.get_ptr_mut(key) {
                // SAFETY: the entry's plain data.
                unsafe {
                    if (*f).app_cookie == cookie {
                        (*f).app_gone = 1;
                    }
                }
            }
        }
        _ => {}
    }
    0
}

/// A port as a context field holds it: some fields keep the network-order
/// port in the upper 16 bits (sock_ops, sk_msg `remote_port`), so take
/// whichever half is set (a port is never 0 on an established socket).
#[inline(always)]
fn be_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// The hop key of the socket behind a context pointer (`bpf_sock_ops` or
/// `sk_msg_md`, whose fields share their names), as that socket sees
/// itself (src = local). A macro, not a function: the two contexts are
/// different types, and each field must stay a constant-offset load of its
/// own context (see publish_conn).
macro_rules! hop_key {
    ($ctx:expr, $netns_cookie:expr) => {{
        let c = $ctx;
        // SAFETY: a valid context of this program; volatile keeps each
        // field a constant-offset load.
        let (family, l4, r4, l6, r6, lport, rport) = unsafe {
            (
                read_volatile(&(*c).family),
                read_volatile(&(*c).local_ip4),
                read_volatile(&(*c).remote_ip4),
                read_ctx4(&(*c).local_ip6),
                read_ctx4(&(*c).remote_ip6),
                read_volatile(&(*c).local_port),
                read_volatile(&(*c).remote_port),
            )
        };
        let (src, dst) = fold(family, l4, r4, l6, r6);
        HopKey {
            netns_cookie: $netns_cookie,
            src,
            dst,
            src_port: lport as u16,
            dst_port: be_port(rport),
            _pad: 0,
        }
    }};
}

/// The hop key of the socket behind a sock_ops context.
#[inline(always)]
fn ops_hop_key(ctx: &SockOpsContext, netns_cookie: u64) -> HopKey {
    hop_key!(ctx.ops, netns_cookie)
}

/// Both addresses in `Ip6` form, IPv4 as `::ffff:a.b.c.d` (an AF_INET6
/// socket on an IPv4-mapped address already holds that form).
#[inline(always)]
fn fold(family: u32, l4: u32, r4: u32, l6: [u32; 4], r6: [u32; 4]) -> (Ip6, Ip6) {
    if family == AF_INET {
        (Ip6::from_v4_raw(l4), Ip6::from_v4_raw(r4))
    } else {
        (Ip6 { words: l6 }, Ip6 { words: r6 })
    }
}

/// Puts an app socket into SM_APP (so sk_msg runs on its sends), with its
/// hop state first: a socket in SM_APP always has one. Either both or
/// neither: without them the hop stays on TCP. Called from the established
/// callbacks, before the app can send its first byte.
#[inline(always)]
fn insert_app(ctx: &SockOpsContext, netns_cookie: u64) {
    let key = ops_hop_key(ctx, netns_cookie);
    if SM_HOPS.insert(key, hop::UNDECIDED, u64::from(BPF_NOEXIST)).is_err() {
        count_sm(sockmap_stats::APP_INSERT_FAILED);
        return;
    }
    // Without its read count a hop would have no bound: then no hop.
    if SM_READ.insert(key, 0, 0).is_err() {
        let _ = SM_HOPS.remove(key);
        count_sm(sockmap_stats::APP_INSERT_FAILED);
        return;
    }
    // SAFETY: helper only reads the context.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context is the kernel's bpf_sock_ops for this socket.
    if SM_APP.update(&mut cookie, unsafe { &mut *ctx.ops }, 0).is_err() {
        let _ = SM_HOPS.remove(key);
        let _ = SM_READ.remove(key);
        count_sm(sockmap_stats::APP_INSERT_FAILED);
        return;
    }
    count_sm(sockmap_stats::APP_INSERTED);
    if to_app_on(netns_cookie) {
        prepare_to_app(&key, cookie);
    }
    // The close callback frees the hop state; the RTT callback (the first
    // ACK of bytes the app sent through TCP) lets a TCP hop go; the header
    // callback of each segment sent until the hop is decided catches bytes
    // that reached TCP without sk_msg (see tcp_bytes_before_sk_msg).
    let flags = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
}

/// Phase two: the agent -> app direction of the hop whose app socket (key
/// `app`, cookie `app_cookie`) just entered SM_APP, undecided. The agent
/// puts its own socket into SM_AGENT_TX (so this program runs on its sends)
/// only when it finds this entry; its first send decides. Read count
/// first: a direction without one would have no bound.
#[inline(always)]
fn prepare_to_app(app: &HopKey, app_cookie: u64) {
    if SM_APP_READ.insert(&app_cookie, &0, 0).is_err() {
        count_sm(sockmap_stats::APP_INSERT_FAILED);
        return;
    }
    let to = ToApp {
        value: hop::UNDECIDED,
        app_tcp: 0,
        app_cookie,
    };
    // Never over an entry: the agent decides a direction TCP itself when
    // it finds none yet (`AgentEnds::to_app`), and that must stand.
    if let Err(e) = SM_TO_APP.insert(&app.reversed(), &to, u64::from(BPF_NOEXIST)) {
        let _ = SM_APP_READ.remove(&app_cookie);
        if e != -EEXIST {
            count_sm(sockmap_stats::APP_INSERT_FAILED);
        }
    }
}

/// Whether the pod of this netns has phase two (agent -> app) on too.
#[inline(always)]
fn to_app_on(netns_cookie: u64) -> bool {
    // SAFETY: read-only lookup of plain data.
    unsafe { ENROLLED_NETNS.get(netns_cookie) }.is_some_and(|p| p.flags & pod_flags::SOCKMAP_TO_APP != 0)
}

/// A segment leaves an app socket of SM_APP while the header callback is
/// asked for: before its hop is decided, or (phase two) while its socket
/// waits to leave SM_APP.
#[inline(always)]
fn segment_out(ctx: &SockOpsContext) {
    // SAFETY: helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of plain data.
    let state = unsafe { SM_HOPS.get(ops_hop_key(ctx, netns)) }.map(|v| hop::state(*v));
    if state == Some(hop::TCP) || state == Some(hop::FALLBACK) {
        release_tcp_hop(ctx);
    } else {
        tcp_bytes_before_sk_msg(ctx);
    }
}

/// A segment leaves an app socket of SM_APP. Bytes can reach TCP without
/// passing sk_msg: a TCP Fast Open connect (`sendto(MSG_FASTOPEN)`) goes
/// through the plain TCP sendmsg, which connects (inserting the socket
/// here) and then sends its data. A hop still undecided when its socket
/// sends payload is decided TCP here: redirecting its next bytes would
/// let the agent read them before these (it reads the redirect queue
/// first). Seen: 27 of 50 such connections reordered. Once decided, the
/// callback is dropped.
#[inline(always)]
fn tcp_bytes_before_sk_msg(ctx: &SockOpsContext) {
    // SAFETY: helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = ops_hop_key(ctx, netns);
    if let Some(state) = SM_HOPS.get_ptr_mut(key) {
        // SAFETY: valid context; the payload length of the segment.
        let payload = unsafe { read_volatile(&(*ctx.ops).skb_len) };
        // SAFETY: map value of this socket, under its lock (as sk_msg).
        unsafe {
            if hop::state(*state) == hop::UNDECIDED {
                if payload == 0 {
                    return; // an ACK: still undecided
                }
                *state = hop::TCP;
                count_sm(sockmap_stats::PEER_MISSING);
                app_sends_tcp(&key);
            }
        }
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// The agent's accepted socket of a client hop (app -> 127.0.0.1:15001 or
/// [::1]:15001, the agent's listeners in the pod) goes into SM_AGENT here,
/// keyed as the app's socket sees the hop. This callback runs when the
/// handshake's last ACK reaches the listener: on `lo` that is inside the
/// app's connect(), so an app that writes at once finds the agent's end
/// and is redirected from its first byte (the agent's own insert after
/// accept() comes too late for it). It runs only when the agent's cgroup
/// is below the cgroup these programs are attached to (the default: the
/// cgroup v2 root); otherwise the agent's insert is the only one.
#[inline(always)]
fn insert_agent(ctx: &SockOpsContext, netns_cookie: u64) {
    let own = ops_hop_key(ctx, netns_cookie);
    // Only the agent listens on the loopback addresses' 15001 in a pod; an
    // app may have its own 15001 on the pod's address.
    if own.src != Ip6::from_v4_raw(LOOPBACK4_RAW) && own.src != LOOPBACK6 {
        return;
    }
    let mut key = own.reversed();
    // On failure (the map full) the agent's own insert after accept() is
    // the next chance; an app that wrote first stays on TCP.
    // SAFETY: the context is the kernel's bpf_sock_ops for this socket.
    let _ = SM_AGENT.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST));
    // Phase two: into SM_AGENT_TX too, before the agent can have written,
    // when the app's connect prepared the agent -> app direction (its
    // callback ran before this one). The agent's own insert after accept()
    // comes too late for an app that wrote and half-closed at once: the
    // kernel refuses a socket in CLOSE_WAIT.
    // SAFETY: read-only lookup of plain data.
    if unsafe { SM_TO_APP.get(&own) }.is_some() {
        // SAFETY: helper only reads the context.
        let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: as above.
        let _ = SM_AGENT_TX.update(&mut cookie, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST));
    }
}

/// An app socket in SM_APP reads with the kernel's tcp_bpf_recvmsg, which
/// can fail a *blocking* recv with EAGAIN when woken without data (an ACK
/// freeing send space wakes the same wait queue). A hop that went TCP
/// needs nothing from SM_APP any more, so its socket leaves it (and gets
/// the plain TCP functions back) at the first ACK of its TCP bytes: before
/// the app can have filled its send buffer, whose space wake-ups are what
/// fails such a recv. The sk_msg program that decides cannot do it itself
/// (the verifier refuses sockmap deletes there). A redirected hop stays,
/// until the agent sends it back to TCP (`hop::FALLBACK`): its next ACK.
/// With phase two, leaving SM_APP would drop what waits in the socket's
/// sk_msg queue: the socket waits until the agent's next send has stopped
/// redirecting into it (`agent_sends` sees `app_tcp`) and the app has read
/// every redirected byte (`to_app_drained`), checking at each segment it
/// sends (`segment_out`). Until then a blocking recv of the app may still
/// fail with EAGAIN, which is why phase two is off by default.
#[inline(always)]
fn release_tcp_hop(ctx: &SockOpsContext) {
    // SAFETY: helpers only read the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of plain data.
    let state = unsafe { SM_HOPS.get(ops_hop_key(ctx, netns)) }.map(|v| hop::state(*v));
    // Undecided, or redirected (which the agent may still send back to
    // TCP): keep the callback.
    if state == Some(hop::UNDECIDED) || state == Some(hop::REDIRECT) {
        return;
    }
    // A hop the agent sent back to TCP (FALLBACK) leaves too: its app
    // socket now sends through TCP. Unless phase two redirects into it:
    // leaving SM_APP would drop what waits in its sk_msg queue.
    if state == Some(hop::TCP) || state == Some(hop::FALLBACK) {
        if !to_app_drained(ctx, &ops_hop_key(ctx, netns)) {
            // Check again at each segment the socket sends (its ACK of the
            // agent's bytes, which come through TCP once the agent's next
            // send has decided or ended its direction) and at each ACK of
            // the app's bytes.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
            return;
        }
        let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: SM_APP is a map definition (repr(transparent) over it)
        // and the key a u64 on this stack; sock_ops may delete from a
        // sockhash. Gone already (closed) is fine.
        unsafe {
            bpf_map_delete_elem(
                core::ptr::from_ref(&SM_APP).cast_mut().cast(),
                core::ptr::from_mut(&mut cookie).cast(),
            )
        };
    }
    done_releasing(ctx);
}

/// The callbacks of [`release_tcp_hop`] are no longer needed.
#[inline(always)]
fn done_releasing(ctx: &SockOpsContext) {
    let flags = BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !flags) as i32);
}

/// Whether the app socket (key `app`) can leave SM_APP as far as phase
/// two is concerned: no agent -> app direction, one decided TCP before any
/// byte, or one the agent stopped redirecting (only the sk_msg program
/// writes that, on a send that starts after every earlier redirect was
/// queued) whose redirected bytes the app has all read (it reads its sk_msg
/// queue before any TCP byte, and every TCP byte was sent after the last
/// redirect). Undecided or still redirected: not yet. The read count never
/// runs ahead: one program counts at a time (SM_READ_GEN), and peeks and
/// error-queue reads are not counted; reads while a restart swaps the
/// program are lost, which keeps such a socket in SM_APP until it closes.
#[inline(always)]
fn to_app_drained(ctx: &SockOpsContext, app: &HopKey) -> bool {
    // SAFETY: read-only lookup of plain data.
    let Some(to) = (unsafe { SM_TO_APP.get(&app.reversed()) }) else {
        return true;
    };
    match hop::state(to.value) {
        hop::TCP => true,
        hop::FALLBACK => {
            // SAFETY: helper only reads the context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: read-only lookup of plain data.
            unsafe { SM_APP_READ.get(&cookie) }.is_some_and(|read| hop::read_all(hop::sent(to.value), *read))
        }
        _ => false,
    }
}

/// Whether the pod of this netns has sockmap acceleration on.
#[inline(always)]
fn sockmap_on(netns_cookie: u64) -> bool {
    // SAFETY: read-only lookup of plain data.
    unsafe { ENROLLED_NETNS.get(netns_cookie) }.is_some_and(|p| p.flags & pod_flags::SOCKMAP != 0)
}

/// A passive end of an in-pod hop. Either the app's accepted socket of a
/// connection the agent made to it inside the pod (it carries the agent's
/// mark: tcp_fwmark_accept copies the SYN's mark), whose replies the agent
/// reads; or the agent's own accepted socket on 15001 (see [`insert_agent`]).
#[inline(always)]
fn passive_hop(ctx: &SockOpsContext) {
    // SAFETY: helper only reads the context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !sockmap_on(netns_cookie) {
        return;
    }
    if ctx.local_port() == u32::from(OUTBOUND_PORT) {
        insert_agent(ctx, netns_cookie);
        return;
    }
    // SAFETY: valid context; `sk` is the full socket or null.
    let sk = unsafe { read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return;
    }
    // SAFETY: non-null bpf_sock of this callback.
    let mark = unsafe { (*sk).mark };
    if mark != AGENT_MARK && mark != FORWARD_MARK {
        return;
    }
    insert_app(ctx, netns_cookie);
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let key = msg_hop_key(&ctx);
    if let Some(state) = SM_HOPS.get_ptr_mut(key) {
        return app_sends(&ctx, &key, state);
    }
    if let Some(to) = SM_TO_APP.get_ptr_mut(key) {
        return agent_sends(&ctx, to);
    }
    // Not a hop of ours (or its state is gone): plain TCP.
    SK_PASS
}

/// A send of an app socket (phase one): into the agent's socket, or TCP.
#[inline(always)]
fn app_sends(ctx: &SkMsgContext, key: &HopKey, state: *mut u32) -> u32 {
    // SAFETY: map value of this socket; sk_msg runs under the socket lock,
    // so this socket's sends see and set the state one at a time.
    let value = unsafe { *state };
    let now = hop::state(value);
    if now == hop::TCP || now == hop::FALLBACK {
        return SK_PASS;
    }
    let size = ctx.size();
    if now == hop::REDIRECT && forward_send(ctx, key, value, size) {
        return SK_PASS;
    }
    if now == hop::REDIRECT && over_bound(key, value, size) {
        // Back to TCP for good, where the sender blocks on a full buffer
        // again. The agent reads what is queued first: no reorder. The
        // count stays: the agent splices again once it has read as many
        // bytes (every redirected byte was queued before this send).
        // SAFETY: as above.
        unsafe { *state = hop::with_sent(hop::FALLBACK, hop::sent(value)) };
        let _ = SM_READ.remove(key);
        app_sends_tcp(key);
        return SK_PASS;
    }
    // The helper answers SK_PASS only when it found the agent's socket;
    // otherwise its SK_DROP is never returned: the bytes go through TCP.
    if SM_AGENT.redirect_msg(ctx, *key, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        // SAFETY: as above. Only this program writes a redirected hop's
        // value. (An agent of an older release writes FALLBACK over it,
        // which a racing write here may undo; such an agent reports no
        // reads, so the bound sends the hop back after 256 KiB anyway.)
        unsafe { *state = hop::with_sent(hop::REDIRECT, hop::sent(value).wrapping_add(size)) };
        count_sm(sockmap_stats::REDIRECTED);
        return SK_PASS;
    }
    if now == hop::UNDECIDED {
        // The agent has not inserted its end yet: TCP for good.
        // SAFETY: as above.
        unsafe { *state = hop::TCP };
        count_sm(sockmap_stats::PEER_MISSING);
        app_sends_tcp(key);
    } else {
        // The agent's end closed: bytes queued earlier are read first
        // (the kernel reads the redirect queue before the TCP one).
        count_sm(sockmap_stats::PEER_GONE);
    }
    SK_PASS
}

/// The kernel path: a send of a redirected hop goes straight to the egress
/// of the agent's other socket (SM_NET), where it blocks on that socket's
/// send buffer as a direct connection would, once the hop is forwarded
/// (SM_FWD) and the agent has forwarded every byte redirected to it before
/// (its SM_READ count, reported after each forward, covers them all): so
/// nothing overtakes a byte the agent still holds. `true`: sent.
#[inline(always)]
fn forward_send(ctx: &SkMsgContext, key: &HopKey, value: u32, size: u32) -> bool {
    let Some(f) = SM_FWD.get_ptr_mut(key) else {
        return false;
    };
    // An entry whose app socket closed is an earlier connection's on the
    // same addresses and ports, which its agent has not removed yet (sk_msg
    // cannot read a socket's cookie to tell them apart).
    // SAFETY: the entry's plain data.
    if unsafe { (*f).app_gone } != 0 {
        return false;
    }
    // SAFETY: read-only lookup of plain data.
    let forwarded_all = unsafe { SM_READ.get(key) }.is_some_and(|read| hop::unread(value, *read) == 0);
    if !forwarded_all || SM_NET.redirect_msg(ctx, *key, 0) != i64::from(SK_PASS) {
        return false;
    }
    // SAFETY: this hop's entry; only the app's sends write `sent`, under
    // its socket's lock.
    unsafe { (*f).sent += u64::from(size) };
    count_fwd(fwd_stats::SENT);
    true
}

/// The kernel path's verdict, on each segment that reaches an agent socket
/// of SM_NET: into the app's socket (SM_APP, ingress) while the hop's
/// agent -> app direction is redirected and the app's unread bytes stay
/// under `hop::BACKLOG_BOUND`, counted as that direction's (it continues
/// the count the agent's redirected writes began, which SM_APP_READ is
/// compared with). Otherwise `SK_PASS` for this segment and every later
/// one: it waits in the agent socket's own queue, bounded by its receive
/// buffer (backpressure again), and the agent reads it once the app has
/// read everything moved before. A segment without payload (a FIN) always
/// stays with the agent's socket, which passes the half-close on once the
/// app has read all. The agent writes nothing to the app while its hop
/// forwards, so this is the only writer of the direction's value then.
/// Every segment with payload passed to the agent's socket is told to the
/// agent (SM_FWD_EVENTS), which does not watch that socket for reads while
/// it forwards; a passed FIN changes the socket's state, which wakes it.
#[stream_verdict]
pub fn mesh_sk_skb(ctx: SkBuffContext) -> u32 {
    // SAFETY: helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let size = ctx.len();
    // SAFETY: read-only lookup of plain data.
    let Some(key) = (unsafe { SM_NET_HOP.get(&cookie) }).copied() else {
        return pass_unowned(cookie, size);
    };
    if key.netns_cookie == 0 {
        // Told already (see pass_unowned).
        return SK_PASS;
    }
    let Some(f) = SM_FWD.get_ptr_mut(&key) else {
        return pass_unowned(cookie, size);
    };
    // SAFETY: this hop's entry; only this program writes `replies` and
    // `received`, under the agent socket's lock. An entry of another socket
    // (a later connection of the same hop that joined while this one still
    // receives) is not ours to use.
    let (owner, replies) = unsafe { ((*f).net_cookie, (*f).replies) };
    if owner != cookie {
        return pass_unowned(cookie, size);
    }
    // Passed for good already: the agent reads this socket again.
    if replies != fwd::FORWARD || size == 0 {
        return SK_PASS;
    }
    // SAFETY: as above.
    let mut app_cookie = unsafe { (*f).app_cookie };
    let Some(to) = SM_TO_APP.get_ptr_mut(key.reversed()) else {
        return pass_for_good(f, cookie);
    };
    // SAFETY: map value of this hop's agent -> app direction (see above).
    let (value, app_tcp) = unsafe { ((*to).value, (*to).app_tcp != 0) };
    if hop::state(value) != hop::REDIRECT {
        return pass_for_good(f, cookie);
    }
    if app_tcp || app_over_bound(app_cookie, value, size) {
        // As the agent's own send would: its later writes go through TCP,
        // which the app reads after its sk_msg queue.
        // SAFETY: as above.
        unsafe { (*to).value = hop::with_sent(hop::FALLBACK, hop::sent(value)) };
        count_to_app(to_app_stats::FALLBACK);
        return pass_for_good(f, cookie);
    }
    if SM_APP.redirect_skb(&ctx, &mut app_cookie, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        // SAFETY: as above.
        unsafe {
            (*to).value = hop::with_sent(hop::REDIRECT, hop::sent(value).wrapping_add(size));
            (*f).received += u64::from(size);
        }
        count_fwd(fwd_stats::RECEIVED);
        return SK_PASS;
    }
    // The app's socket left SM_APP (it closed).
    pass_for_good(f, cookie)
}

/// The verdict passes this segment and every later one of the hop `f` to
/// the agent's socket (cookie `net`), and tells the agent.
#[inline(always)]
fn pass_for_good(f: *mut Fwd, net: u64) -> u32 {
    // SAFETY: the hop's entry, written by the verdict program only.
    unsafe { (*f).replies = fwd::PASSED };
    count_fwd(fwd_stats::PASSED);
    tell_agent(net);
    SK_PASS
}

/// A segment of a socket whose hop entry is gone (evicted from the LRU
/// map, or removed at its connection's end) or is a later connection's:
/// it stays with the agent's socket, and the agent is told if it carries
/// payload, once: the socket's SM_NET_HOP entry becomes a key of netns 0
/// (no netns has that cookie), which later segments pass silently, and
/// which tells the agent's look at its entries that they are not its own.
#[inline(always)]
fn pass_unowned(net: u64, size: u32) -> u32 {
    if size > 0 {
        tell_agent(net);
        let _ = SM_NET_HOP.insert(&net, &HopKey::default(), 0);
    }
    SK_PASS
}

/// Tells the agent that its socket `net` has bytes to read (SM_FWD_EVENTS).
#[inline(always)]
fn tell_agent(net: u64) {
    if SM_FWD_EVENTS.output::<u64>(net, 0).is_err() {
        bump(&SM_FWD_LOST, 0);
    }
}

/// A send of the agent's socket `key` (phase two, its entry `to`): into the
/// app's socket, or TCP. The same rules as the app's sends: the first send
/// decides, once; a redirected direction goes back to TCP for good beyond
/// `hop::BACKLOG_BOUND` unread (the app reads its sk_msg queue before TCP:
/// no reorder); a missing peer means TCP, never a drop. Once the agent's
/// socket is in SM_AGENT_TX this program is the only writer of the value
/// (the agent decides TCP itself only for a socket that never joined), and
/// the agent sends on a socket from one task at a time, under its lock.
#[inline(always)]
fn agent_sends(ctx: &SkMsgContext, to: *mut ToApp) -> u32 {
    // SAFETY: map value of this socket's hop; only this program writes it
    // once the socket is in SM_AGENT_TX.
    let (value, mut app_cookie) = unsafe { ((*to).value, (*to).app_cookie) };
    let now = hop::state(value);
    if now == hop::TCP || now == hop::FALLBACK {
        return SK_PASS;
    }
    let size = ctx.size();
    // The app's socket sends through TCP now, so it must leave SM_APP
    // (release_tcp_hop), which it can only do once its sk_msg queue is
    // read: redirect nothing more into it.
    // SAFETY: as above; written on the app's side only.
    let app_tcp = unsafe { (*to).app_tcp } != 0;
    if now == hop::UNDECIDED && app_tcp {
        // SAFETY: as above.
        unsafe { (*to).value = hop::TCP };
        count_to_app(to_app_stats::PEER_MISSING);
        return SK_PASS;
    }
    if now == hop::REDIRECT && (app_tcp || app_over_bound(app_cookie, value, size)) {
        // SAFETY: as above.
        unsafe { (*to).value = hop::with_sent(hop::FALLBACK, hop::sent(value)) };
        count_to_app(to_app_stats::FALLBACK);
        return SK_PASS;
    }
    if SM_APP.redirect_msg(ctx, &mut app_cookie, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        // SAFETY: as above.
        unsafe { (*to).value = hop::with_sent(hop::REDIRECT, hop::sent(value).wrapping_add(size)) };
        count_to_app(to_app_stats::REDIRECTED);
        return SK_PASS;
    }
    if now == hop::UNDECIDED {
        // SAFETY: as above.
        unsafe { (*to).value = hop::TCP };
        count_to_app(to_app_stats::PEER_MISSING);
    } else {
        // The app's socket closed: earlier bytes are read first.
        count_to_app(to_app_stats::PEER_GONE);
    }
    SK_PASS
}

/// The app's own direction of the hop (its key `app`) now sends through
/// TCP: tells the agent's side (phase two), whose next send stops
/// redirecting into the app's socket.
#[inline(always)]
fn app_sends_tcp(app: &HopKey) {
    if let Some(to) = SM_TO_APP.get_ptr_mut(app.reversed()) {
        // SAFETY: map value of this hop; only the app's side writes it.
        unsafe { (*to).app_tcp = 1 };
    }
}

/// Whether redirecting `size` more bytes would leave more than
/// `hop::BACKLOG_BOUND` unread in the app's socket (its read count is
/// `mesh_app_read`'s). No count: no bound, so no redirect.
#[inline(always)]
fn app_over_bound(app_cookie: u64, value: u32, size: u32) -> bool {
    // SAFETY: read-only lookup of plain data.
    let Some(read) = (unsafe { SM_APP_READ.get(&app_cookie) }) else {
        return true;
    };
    hop::over_bound(value, *read, size)
}

/// Phase two's read count, on the `sock_recv_length` tracepoint (every
/// socket read through recvmsg(2), read(2) or io_uring's recv, with what it
/// returned). Adds what an app socket read (a peek or an error-queue read
/// takes nothing) to its SM_APP_READ entry; other sockets have none. While
/// its agent -> app direction is redirected, every byte the app reads
/// comes out of its sk_msg queue: nothing reaches it through TCP before the
/// fallback. The count bounds that queue, and tells a forwarding agent
/// when the app has read everything moved into it. The addition is atomic:
/// two threads reading one socket at once both count.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn mesh_app_read(ctx: BtfTracePointContext) -> i32 {
    if !this_generation_counts(&SM_READ_GEN) {
        return 0;
    }
    let copied: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if copied <= 0 || flags & (MSG_PEEK | MSG_ERRQUEUE) != 0 {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's socket (a BTF pointer).
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if let Some(read) = SM_APP_READ.get_ptr_mut(&cookie) {
        // Atomic: two threads reading one socket at once run this at once
        // (after the socket lock is released), and a lost addition would
        // hold a forwarding agent back (ARCHITECTURE.md, "The kernel path").
        // SAFETY: this socket's entry, an aligned u64 in map memory.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                read,
                copied as u64,
            )
        };
    }
    0
}

/// The kernel path's send count, on the `sock_send_length` tracepoint
/// (every socket send through sendmsg(2), write(2) or, since Linux 6.5,
/// splice(2), with what it queued, after the socket's lock is released). Adds what a joined
/// hop's `net` socket sent to the hop's SM_READ count, which the app's
/// sends compare with what was redirected to the agent before they may go
/// straight to `net` ([`forward_send`]). The agent reports that count too,
/// but with a syscall after its send returns: on a busy machine the reply
/// its send caused could reach the app first, and the app's next send would
/// still find bytes unreported and go through the agent again, exchange
/// after exchange. Counted here, inside the send, before the send returns.
///
/// Only what `net` queued counts, so the count never runs ahead of the
/// bytes on `net` (an app send that sees it complete finds them queued).
/// `net`'s sends are only the app's bytes the agent forwards: the app's
/// own sends to `net`'s egress run on the app's socket. A socket whose
/// SM_FWD entry is not its own, or whose app socket closed, counts
/// nothing: SM_READ is keyed by the hop, which a later connection may
/// reuse. Only the program of the generation in SM_SENT_GEN counts, so two
/// attached programs do not count a send twice (the agent writes its
/// generation before it attaches: `agent::capture::sockmap`).
#[btf_tracepoint(function = "sock_send_length")]
pub fn mesh_fwd_sent(ctx: BtfTracePointContext) -> i32 {
    if !this_generation_counts(&SM_SENT_GEN) {
        return 0;
    }
    let sent: i32 = ctx.arg(1);
    if sent <= 0 {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's socket (a BTF pointer).
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // SAFETY: read-only lookup of plain data.
    let Some(key) = (unsafe { SM_NET_HOP.get(&cookie) }).copied() else {
        return 0;
    };
    if key.netns_cookie == 0 {
        return 0;
    }
    // SAFETY: read-only lookup of plain data.
    let Some(f) = (unsafe { SM_FWD.get(&key) }) else {
        return 0;
    };
    if f.net_cookie != cookie || f.app_gone != 0 {
        return 0;
    }
    if let Some(read) = SM_READ.get_ptr_mut(&key) {
        // Atomic, though nothing else adds to it: the agent's reports write
        // it from the sending task (after its send, never during it), and
        // a lost addition would only hold the app's sends back.
        // SAFETY: this hop's entry, an aligned u64 in map memory.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(read, sent as u64)
        };
    }
    0
}

/// Whether this object's count (its [`READ_GEN`]) is the one the count's
/// generation map `gens` (SM_READ_GEN, SM_SENT_GEN) names: of two attached
/// programs of a count, only that one counts.
#[inline(always)]
fn this_generation_counts(gens: &Array<u64>) -> bool {
    // SAFETY: a constant of this object, set by the loader.
    let gen = unsafe { read_volatile(&READ_GEN) };
    gens.get(0).copied() == Some(gen)
}

/// Whether redirecting `size` more bytes would leave more than
/// `hop::BACKLOG_BOUND` unread in the agent's socket. A hop inserted by an
/// older release's sockops has no read count: its agent bounds it.
#[inline(always)]
fn over_bound(key: &HopKey, value: u32, size: u32) -> bool {
    // SAFETY: read-only lookup of plain data.
    let Some(read) = (unsafe { SM_READ.get(key) }) else {
        return false;
    };
    hop::over_bound(value, *read, size)
}

/// The hop key of the sending socket.
#[inline(always)]
fn msg_hop_key(ctx: &SkMsgContext) -> HopKey {
    // SAFETY: helper only reads the context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    hop_key!(ctx.msg, netns_cookie)
}

/// Once a redirected connect is established its local port is known: key the
/// original destination by (netns, client addr, client port) for the agent.
#[inline(always)]
fn publish_conn(ctx: &SockOpsContext) {
    // SAFETY: helpers only read the context; map value is plain data.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_DST.get(&cookie) }).copied() else {
        return;
    };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let ops = ctx.ops;
    // SAFETY: valid context; volatile keeps each field a constant-offset
    // load (the verifier rejects ctx + variable offset, which LLVM would
    // otherwise produce by merging the IPv4 and IPv6 branches).
    // Both are read unconditionally and the values (not pointers) selected.
    let (ip4, ip6) = unsafe { (read_volatile(&(*ops).local_ip4), read_ctx4(&(*ops).local_ip6)) };
    let addr = if ctx.family() == AF_INET {
        Ip6::from_v4_raw(ip4)
    } else {
        Ip6 { words: ip6 }
    };
    let key = ConnKey {
        netns_cookie,
        addr,
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if CONN_ORIG.insert(&key, &orig, 0).is_ok() {
        debug!(
            ctx,
            "sockops: socket {} established from port {}: original destination published", cookie, key.port
        );
    }
    // The app's end of the client hop (app -> 15001): the agent reads it.
    if sockmap_on(netns_cookie) {
        insert_app(ctx, netns_cookie);
    }
    // Ask for the close callback so ORIG_DST is freed with the socket.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context for the whole program run.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // SAFETY: valid context; constant-offset loads (see publish_conn).
    let (l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&l.local_ip4),
            read_volatile(&l.remote_ip4),
            read_ctx4(&l.local_ip6),
            read_ctx4(&l.remote_ip6),
        )
    };
    let (local, remote) = if l.family == AF_INET {
        (Ip6::from_v4_raw(l4), Ip6::from_v4_raw(r4))
    } else {
        (Ip6 { words: l6 }, Ip6 { words: r6 })
    };
    let (lip, rip, lport) = (local.octets(), remote.octets(), l.local_port);
    // SAFETY: read-only lookups.
    if unsafe { POD_IPS.get(&local) }.is_none() {
        debug!(&ctx, "sk_lookup [{:i}]:{}: not a pod IP: pass", lip, lport);
        return SK_PASS;
    }
    // Not captured: the HBONE port; loopback; the pod talking to itself
    // (the kernel routes it locally but does not report it as arriving on
    // `lo`); the node itself (kubelet probes); and the agent's own forwards
    // to the app that carry the client's address (LOCAL_FWD).
    let fwd = SockKey {
        addr: remote,
        port: u16::from_be(l.remote_port),
        _pad: [0; 6],
    };
    let skip = if l.local_port == u32::from(HBONE_PORT) {
        Some("HBONE port")
    } else if l.ingress_ifindex == LOOPBACK_IFINDEX || local == remote {
        Some("loopback or the pod itself")
    } else if unsafe { NODE_ADDRS.get(&remote) }.is_some() {
        Some("from a node address (probe)")
    } else if unsafe { LOCAL_FWD.get(&fwd) }.is_some() {
        Some("the agent's transparent forward")
    } else {
        None
    };
    if let Some(why) = skip {
        debug!(&ctx, "sk_lookup [{:i}]:{} from [{:i}]: {}: pass", lip, lport, rip, why);
        count(stats::INBOUND_SKIPPED);
        return SK_PASS;
    }
    match INBOUND.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            debug!(
                &ctx,
                "sk_lookup [{:i}]:{} from [{:i}]: redirected to the agent (port 15006)", lip, lport, rip
            );
            count(stats::INBOUND_REDIRECTED);
            SK_PASS
        }
        Err(_) => {
            // Enrolled pod without a live agent listener: refuse (RST), never
            // deliver around the mesh.
            debug!(
                &ctx,
                "sk_lookup [{:i}]:{} from [{:i}]: no agent listener: refused", lip, lport, rip
            );
            count(stats::INBOUND_REFUSED);
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
