//! Brings `lo` up in the sandbox's network namespace with one rtnetlink
//! request, so the sandbox needs no `ip` binary.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// The loopback device's index, the first device of every network
/// namespace.
const LOOPBACK_IFINDEX: i32 = 1;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFF_UP: u32 = 1;
const NLMSG_HEADER_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// `RTM_NEWLINK` for `ifindex`, setting `IFF_UP`: a 16-byte `nlmsghdr`
/// and a 16-byte `ifinfomsg`, in host byte order.
fn set_up_request(ifindex: i32, seq: u32) -> [u8; NLMSG_HEADER_LEN + IFINFOMSG_LEN] {
    let mut m = [0u8; NLMSG_HEADER_LEN + IFINFOMSG_LEN];
    let len = u32::try_from(m.len()).unwrap_or(u32::MAX);
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel. ifi_family AF_UNSPEC, padding, ifi_type 0.
    m[20..24].copy_from_slice(&ifindex.to_ne_bytes());
    m[24..28].copy_from_slice(&IFF_UP.to_ne_bytes());
    m[28..32].copy_from_slice(&IFF_UP.to_ne_bytes());
    m
}

/// The errno of an `NLMSG_ERROR` acknowledgement (0: success).
fn ack_errno(reply: &[u8], seq: u32) -> Result<i32, String> {
    let field = |range: std::ops::Range<usize>| reply.get(range).ok_or("short netlink reply");
    let kind = u16::from_ne_bytes(field(4..6)?.try_into().map_err(|_| "bad reply")?);
    let reply_seq = u32::from_ne_bytes(field(8..12)?.try_into().map_err(|_| "bad reply")?);
    if kind != NLMSG_ERROR || reply_seq != seq {
        return Err(format!("unexpected netlink reply (type {kind}, sequence {reply_seq})"));
    }
    let error = i32::from_ne_bytes(field(16..20)?.try_into().map_err(|_| "bad reply")?);
    Ok(-error)
}

/// Sets `lo` up in the calling process's network namespace.
pub(super) fn loopback_up() -> Result<(), String> {
    let fail = |e: nix::Error| format!("cannot bring lo up in the sandbox's network namespace: {e}");
    let sock =
        socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)
            .map_err(fail)?;
    let seq = 1;
    sendto(
        sock.as_raw_fd(),
        &set_up_request(LOOPBACK_IFINDEX, seq),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(fail)?;
    let mut reply = [0u8; 512];
    let n = recv(sock.as_raw_fd(), &mut reply, MsgFlags::empty()).map_err(fail)?;
    match ack_errno(&reply[..n], seq)? {
        0 => Ok(()),
        errno => Err(fail(nix::Error::from_raw(errno))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let m = set_up_request(1, 7);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32, "nlmsg_len");
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 16, "RTM_NEWLINK");
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 5, "NLM_F_REQUEST | NLM_F_ACK");
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7, "nlmsg_seq");
        assert_eq!(&m[12..20], &[0; 8], "nlmsg_pid, ifi_family, padding, ifi_type");
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 1, "ifi_index");
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().unwrap()), 1, "ifi_flags IFF_UP");
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().unwrap()), 1, "ifi_change IFF_UP");
    }

    #[test]
    fn acknowledgements_are_read() {
        let mut reply = [0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(ack_errno(&reply, 7), Ok(0));
        reply[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(ack_errno(&reply, 7), Ok(1));
        assert!(ack_errno(&reply, 8).is_err());
        assert!(ack_errno(&reply[..10], 7).is_err());
    }
}
