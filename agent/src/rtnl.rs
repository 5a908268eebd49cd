//! The policy routing a pod netns needs for transparent inbound forwarding,
//! written with plain rtnetlink (no `ip` binary on the node):
//!
//! ```text
//! ip rule add fwmark 1338 lookup 133        (IPv4 and IPv6)
//! ip route add local default dev lo table 133
//! ```
//! The agent connects to the app with the client's address as source (mark
//! 1338); the app's replies inherit the mark (`tcp_fwmark_accept`) and this
//! route delivers them locally, to the agent, instead of out of the pod.
use std::{io, mem::size_of, os::fd::AsRawFd};

use agent_common::{FORWARD_MARK, FORWARD_TABLE};
use socket2::{Domain, Protocol, Socket, Type};

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RULE_PRIORITY: u32 = 32700;
const LOOPBACK_IFINDEX: u32 = 1;

/// Adds the rule and route for both families in the calling thread's netns
/// (run it inside the pod netns). Existing entries are fine.
pub fn add_forward_routing() -> io::Result<()> {
    let sock = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW.cloexec(),
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags(u32)
        let mut rule = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
        attr(&mut rule, FRA_FWMARK, FORWARD_MARK);
        attr(&mut rule, FRA_TABLE, FORWARD_TABLE);
        attr(&mut rule, FRA_PRIORITY, RULE_PRIORITY);
        request(&sock, RTM_NEWRULE, &rule)?;
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
        let mut route = vec![family, 0, 0, 0, 0, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0, 0, 0, 0];
        attr(&mut route, RTA_TABLE, FORWARD_TABLE);
        attr(&mut route, RTA_OIF, LOOPBACK_IFINDEX);
        request(&sock, RTM_NEWROUTE, &route)?;
    }
    Ok(())
}

/// Appends a u32 netlink attribute.
fn attr(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

/// Sends one request and reads its acknowledgement (EEXIST counts as done).
fn request(sock: &Socket, kind: u16, payload: &[u8]) -> io::Result<()> {
    const HDR: usize = 16;
    let len = (HDR + payload.len()) as u32;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    msg.extend_from_slice(payload);
    // SAFETY: a netlink socket with no destination address defaults to the kernel.
    let sent = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: reading into a buffer we own.
    let n = unsafe { libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < HDR + size_of::<i32>() || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("unexpected rtnetlink reply"));
    }
    let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    match -errno {
        0 | libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}
