//! The userspace WireGuard TUN's queueing discipline: `fq_codel` when the kernel has it, so a
//! small packet (a ping, a request, an ACK) of one flow is not queued behind the 64 KiB
//! super-packets of a bulk flow, and a standing queue is cut by CoDel.
//!
//! Why here and not `tc`: the device child sets it once at start over rtnetlink (no CLI
//! dependency); a kernel without `sch_fq_codel` (this development VM's has only `pfifo_fast`,
//! HTB and TBF) answers `ENOENT`, which is logged once and leaves the default queue.
//!
//! Invariants: the request only ever replaces the root qdisc of the one interface given by
//! index; [`request`] is pure (bytes out), [`parse_ack`] refuses anything but a well-formed
//! acknowledgement for the request's sequence number.

use std::io;

/// Why the qdisc could not be set.
#[derive(Debug, thiserror::Error)]
pub enum QdiscError {
    /// The interface has no index (gone, or a bad name).
    #[error("qdisc: no interface {0}")]
    NoInterface(String),
    /// The kernel refused the request (`ENOENT`: it lacks the qdisc).
    #[error("qdisc: the kernel refused {kind}: {source}")]
    Refused {
        /// The qdisc asked for.
        kind: String,
        /// The kernel's errno.
        source: io::Error,
    },
    /// The netlink exchange itself failed.
    #[error("qdisc: netlink: {0}")]
    Netlink(#[from] io::Error),
    /// The answer was not an acknowledgement of the request.
    #[error("qdisc: malformed netlink answer")]
    Malformed,
}

const RTM_NEWQDISC: u16 = 36;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const TCA_KIND: u16 = 1;
/// `TC_H_ROOT`.
const ROOT: u32 = 0xffff_ffff;
/// Longest qdisc name accepted (`IFNAMSIZ`-like bound on what goes in the message).
const MAX_KIND: usize = 15;

/// The `RTM_NEWQDISC` request that makes `kind` the root qdisc of interface `ifindex`
/// (created or replacing what is there), sequence `seq`, acknowledgement asked for.
pub fn request(ifindex: u32, kind: &str, seq: u32) -> Option<Vec<u8>> {
    if kind.is_empty()
        || kind.len() > MAX_KIND
        || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return None;
    }
    let ifindex = i32::try_from(ifindex).ok()?;
    // TCA_KIND: the name, NUL-terminated, padded to 4 bytes.
    let attr_len = 4 + kind.len() + 1;
    let attr_space = (attr_len + 3) & !3;
    let len = 16 + 20 + attr_space;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_NEWQDISC.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct tcmsg: family (AF_UNSPEC) and 3 bytes of padding, ifindex, handle (0: the kernel
    // picks), parent, info.
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&ROOT.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&TCA_KIND.to_ne_bytes());
    m.extend_from_slice(kind.as_bytes());
    m.resize(len, 0);
    Some(m)
}

/// The errno of the acknowledgement of request `seq` in `buf` (0: done).
pub fn parse_ack(buf: &[u8], seq: u32) -> Result<i32, QdiscError> {
    if buf.len() < 20 {
        return Err(QdiscError::Malformed);
    }
    let u32_at = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let len = u32_at(0) as usize;
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if len < 20 || len > buf.len() || kind != NLMSG_ERROR || u32_at(8) != seq {
        return Err(QdiscError::Malformed);
    }
    let errno = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    Ok(-errno)
}

/// Makes `kind` the root qdisc of `iface` (in the calling thread's network namespace).
pub fn set_root(iface: &str, kind: &str) -> Result<(), QdiscError> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    let name = std::ffi::CString::new(iface).map_err(|_| QdiscError::NoInterface(iface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string alive for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(QdiscError::NoInterface(iface.into()));
    }
    let msg = request(ifindex, kind, 1).ok_or(QdiscError::Malformed)?;
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: 3,
        tv_usec: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is a live socket owned by `s`; `tv` outlives the call and its size is
    // passed.
    if unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(io::Error::last_os_error().into());
    }
    s.send(&msg, 0)?;
    let mut buf = Vec::with_capacity(4096);
    let n = s.recv(&mut buf, 0)?;
    match parse_ack(&buf[..n.min(buf.len())], 1)? {
        0 => Ok(()),
        errno => Err(QdiscError::Refused {
            kind: kind.into(),
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_root_replace_with_the_kind() {
        let m = request(7, "fq_codel", 9).unwrap();
        assert_eq!(m.len(), 16 + 20 + 16);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), RTM_NEWQDISC);
        let flags = u16::from_ne_bytes([m[6], m[7]]);
        assert_eq!(
            flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(m[28..32].try_into().unwrap()), ROOT);
        assert_eq!(u16::from_ne_bytes([m[36], m[37]]), 4 + 9);
        assert_eq!(u16::from_ne_bytes([m[38], m[39]]), TCA_KIND);
        assert_eq!(&m[40..49], b"fq_codel\0");
        // Anything but a plain qdisc name is refused before it reaches the kernel.
        assert!(request(7, "", 1).is_none());
        assert!(request(7, "fq codel", 1).is_none());
        assert!(request(7, "a_very_long_qdisc_name", 1).is_none());
    }

    #[test]
    fn acks_are_checked() {
        let ack = |seq: u32, errno: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&(-errno).to_ne_bytes());
            b.resize(36, 0);
            b
        };
        assert_eq!(parse_ack(&ack(1, 0), 1).unwrap(), 0);
        assert_eq!(parse_ack(&ack(1, libc::ENOENT), 1).unwrap(), libc::ENOENT);
        assert!(
            parse_ack(&ack(2, 0), 1).is_err(),
            "another request's answer"
        );
        assert!(parse_ack(&ack(1, 0)[..10], 1).is_err(), "truncated");
        let mut wrong = ack(1, 0);
        wrong[4] = 3;
        assert!(parse_ack(&wrong, 1).is_err(), "not an error/ack message");
    }
}
