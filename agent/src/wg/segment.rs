//! TCP segmentation of a TUN "super-packet" (TSO done in userspace), the first brick of a
//! WireGuard data path with TUN offloads.
//!
//! Why: a profile of the boringtun child under one iperf3 stream (perf, both hosts) spends about
//! 80 % of its time in the kernel, one syscall per 1420-byte packet: `write` to the TUN device
//! (which runs the inner packet's whole receive path, ~39 %) and `sendto` on the UDP socket
//! (~28 %); ChaCha20-Poly1305 is ~14 %. With `IFF_VNET_HDR` and `TUNSETOFFLOAD` (TSO4 + CSUM)
//! the kernel hands the TUN reader up to 64 KiB of one TCP flow at a time, behind a
//! `virtio_net_hdr`; cutting it into MTU-sized packets here, and encrypting those as a batch
//! (sent with one `UDP_SEGMENT` `sendmsg`), replaces ~45 reads and ~45 sends by one of each.
//! This module is that cut, pure over byte buffers.
//!
//! Invariants: every packet out is a complete IPv4/TCP packet no larger than the caller's MTU,
//! with a correct IPv4 header checksum and a full TCP checksum (the kernel leaves a partial
//! one with `NEEDS_CSUM`); sequence numbers advance by the segment size, IP ids by one; FIN and
//! PSH only on the last segment, CWR only on the first. Anything malformed, oversized, of
//! another protocol or of a GSO type not offered (UDP, TCPv6) is refused with an error naming
//! what, never passed on half-parsed.

/// Size of the `virtio_net_hdr` before each packet (the TUN default, without
/// `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_ECN: u8 = 0x80;
/// The largest packet a TUN read can hold (IPv4's limit).
pub const MAX_PACKET: usize = 65535;
/// At most this many segments from one super-packet (64 KiB / 576 rounds to 114).
pub const MAX_SEGMENTS: usize = 128;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a super-packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Shorter than a `virtio_net_hdr`.
    #[error("segment: {0}-byte read is shorter than the virtio header")]
    ShortVnetHeader(usize),
    /// Larger than any IPv4 packet.
    #[error("segment: {0}-byte packet is larger than {MAX_PACKET}")]
    Oversized(usize),
    /// The IPv4 header is missing, truncated or inconsistent.
    #[error("segment: bad IPv4 header: {0}")]
    BadIp(&'static str),
    /// The TCP header is missing or truncated.
    #[error("segment: bad TCP header: {0}")]
    BadTcp(&'static str),
    /// The checksum location is outside the packet.
    #[error("segment: checksum at {start}+{offset} is outside the {len}-byte packet")]
    BadChecksumOffset {
        /// `csum_start`.
        start: usize,
        /// `csum_offset`.
        offset: usize,
        /// The packet's length.
        len: usize,
    },
    /// A GSO type this path does not offer to the kernel.
    #[error("segment: GSO type {0:#x} is not supported (only TCPv4)")]
    UnsupportedGso(u8),
    /// Segments would exceed the MTU or be too many.
    #[error("segment: gso_size {gso_size} with {headers} bytes of headers does not fit MTU {mtu} in at most {MAX_SEGMENTS} segments")]
    BadGsoSize {
        /// `gso_size`.
        gso_size: usize,
        /// IPv4 + TCP header bytes.
        headers: usize,
        /// The MTU asked for.
        mtu: usize,
    },
}

/// The `virtio_net_hdr` fields this path reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `flags` (`NEEDS_CSUM`).
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `gso_size`: payload bytes per segment.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the header at the start of a TUN read (little-endian, as the kernel writes it
    /// for a little-endian host).
    pub fn parse(read: &[u8]) -> Result<VnetHdr, SegmentError> {
        let h = read
            .get(..VNET_HDR_LEN)
            .ok_or(SegmentError::ShortVnetHeader(read.len()))?;
        let u = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
}

/// Cuts one TUN read (`virtio_net_hdr` + IPv4 packet) into packets of at most `mtu` bytes,
/// appended to `out`, each ready to encrypt. A read without GSO comes out as one packet (its
/// checksum completed if the kernel left it partial).
pub fn segment(read: &[u8], mtu: usize, out: &mut Vec<Vec<u8>>) -> Result<(), SegmentError> {
    let hdr = VnetHdr::parse(read)?;
    let pkt = &read[VNET_HDR_LEN..];
    if pkt.len() > MAX_PACKET {
        return Err(SegmentError::Oversized(pkt.len()));
    }
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            let mut p = pkt.to_vec();
            if hdr.flags & F_NEEDS_CSUM != 0 {
                finish_checksum(
                    &mut p,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
            }
            out.push(p);
            Ok(())
        }
        GSO_TCPV4 => segment_tcp4(pkt, usize::from(hdr.gso_size), mtu, out),
        other => Err(SegmentError::UnsupportedGso(other)),
    }
}

/// The lengths of the IPv4 and TCP headers of `pkt`, checked.
fn tcp4_headers(pkt: &[u8]) -> Result<(usize, usize), SegmentError> {
    let v_ihl = *pkt.first().ok_or(SegmentError::BadIp("empty packet"))?;
    if v_ihl >> 4 != 4 {
        return Err(SegmentError::BadIp("not version 4"));
    }
    let ihl = usize::from(v_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(SegmentError::BadIp("header length below 20"));
    }
    if pkt.len() < ihl {
        return Err(SegmentError::BadIp("truncated header"));
    }
    if pkt[9] != 6 {
        return Err(SegmentError::BadIp("not TCP"));
    }
    let tcp = pkt
        .get(ihl..ihl + 20)
        .ok_or(SegmentError::BadTcp("truncated header"))?;
    let thl = usize::from(tcp[12] >> 4) * 4;
    if thl < 20 {
        return Err(SegmentError::BadTcp("data offset below 20"));
    }
    if pkt.len() < ihl + thl {
        return Err(SegmentError::BadTcp("truncated options"));
    }
    Ok((ihl, thl))
}

fn segment_tcp4(
    pkt: &[u8],
    gso_size: usize,
    mtu: usize,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), SegmentError> {
    let (ihl, thl) = tcp4_headers(pkt)?;
    let headers = ihl + thl;
    let payload = &pkt[headers..];
    let too_big = || SegmentError::BadGsoSize {
        gso_size,
        headers,
        mtu,
    };
    if gso_size == 0 || headers + gso_size > mtu {
        return Err(too_big());
    }
    if payload.len().div_ceil(gso_size) > MAX_SEGMENTS {
        return Err(too_big());
    }
    let id = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let flags = pkt[ihl + 13];
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(gso_size).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut p = Vec::with_capacity(headers + chunk.len());
        p.extend_from_slice(&pkt[..headers]);
        p.extend_from_slice(chunk);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let ip_sum = checksum(&p[..ihl], 0);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let s = seq.wrapping_add((i * gso_size) as u32);
        p[ihl + 4..ihl + 8].copy_from_slice(&s.to_be_bytes());
        let mut f = flags;
        if i + 1 < n {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        p[ihl + 13] = f;
        p[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
        let tcp_sum = checksum(&p[ihl..], pseudo_header_sum(&p, ihl));
        p[ihl + 16..ihl + 18].copy_from_slice(&tcp_sum.to_be_bytes());
        out.push(p);
    }
    Ok(())
}

/// Completes a partial checksum: the field at `start + offset` holds the pseudo-header's sum;
/// the ones' complement of the sum over `start..` goes there.
fn finish_checksum(p: &mut [u8], start: usize, offset: usize) -> Result<(), SegmentError> {
    let at = start + offset;
    if start > p.len() || at + 2 > p.len() {
        return Err(SegmentError::BadChecksumOffset {
            start,
            offset,
            len: p.len(),
        });
    }
    let partial = u16::from_be_bytes([p[at], p[at + 1]]);
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = checksum(&p[start..], u32::from(partial));
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The IPv4 pseudo-header's sum for the TCP segment that starts at `ihl` in `p`.
fn pseudo_header_sum(p: &[u8], ihl: usize) -> u32 {
    let word = |i: usize| u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    word(12) + word(14) + word(16) + word(18) + u32::from(p[9]) + (p.len() - ihl) as u32
}

/// The Internet checksum (RFC 1071) of `data`, starting from `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    // 32-bit big-endian words summed into 64 bits fold to the same ones' complement sum as
    // 16-bit ones (the carries come around either way), at half the additions.
    let mut sum = u64::from(initial);
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    match words.remainder() {
        [a, b, c] => sum += (u64::from(*a) << 8) + u64::from(*b) + (u64::from(*c) << 8),
        [a, b] => sum += (u64::from(*a) << 8) + u64::from(*b),
        [a] => sum += u64::from(*a) << 8,
        _ => {}
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/TCP packet 10.0.0.1:1000 -> 10.0.0.2:2000 with `payload`, flags, seq 1000, id 7,
    /// and correct checksums.
    fn tcp4(payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let s = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&s.to_be_bytes());
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[40..].copy_from_slice(payload);
        let s = checksum(&p[20..], pseudo_header_sum(&p, 20));
        p[36..38].copy_from_slice(&s.to_be_bytes());
        p
    }

    fn vnet(flags: u8, gso_type: u8, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type, 40, 0];
        for v in [gso_size, start, offset] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    fn read(h: Vec<u8>, p: &[u8]) -> Vec<u8> {
        let mut r = h;
        r.extend_from_slice(p);
        r
    }

    /// Checks a packet the way a receiver would: both checksums verify to zero.
    fn valid(p: &[u8]) -> bool {
        checksum(&p[..20], 0) == 0 && checksum(&p[20..], pseudo_header_sum(p, 20)) == 0
    }

    #[test]
    fn plain_packet_passes_unchanged() {
        let p = tcp4(b"hello", TCP_PSH);
        let mut out = Vec::new();
        segment(&read(vnet(0, GSO_NONE, 0, 0, 0), &p), 1420, &mut out).unwrap();
        assert_eq!(out, vec![p]);
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut p = tcp4(b"odd length!", TCP_PSH);
        // What the kernel hands over with NEEDS_CSUM: the pseudo-header's folded sum, not
        // complemented, in the checksum field.
        let mut s = pseudo_header_sum(&p, 20);
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        p[36..38].copy_from_slice(&(s as u16).to_be_bytes());
        assert!(!valid(&p));
        let mut out = Vec::new();
        segment(
            &read(vnet(F_NEEDS_CSUM, GSO_NONE, 0, 20, 16), &p),
            1420,
            &mut out,
        )
        .unwrap();
        assert!(valid(&out[0]), "{:?}", out[0]);
    }

    #[test]
    fn super_packet_is_cut_into_valid_segments() {
        let cases: &[(usize, u16, usize)] = &[
            // payload, gso_size, segments
            (3000, 1000, 3),
            (3001, 1000, 4),
            (1380, 1380, 1),
            (65535 - 40, 1380, 48),
            (0, 1380, 1),
        ];
        for &(len, gso, n) in cases {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let p = tcp4(&payload, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
            let mut out = Vec::new();
            segment(
                &read(vnet(F_NEEDS_CSUM, GSO_TCPV4, gso, 20, 16), &p),
                1420,
                &mut out,
            )
            .unwrap();
            assert_eq!(out.len(), n, "{len}/{gso}");
            let mut joined = Vec::new();
            for (i, s) in out.iter().enumerate() {
                assert!(s.len() <= 1420);
                assert!(valid(s), "segment {i} of {len}/{gso}");
                assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
                let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
                assert_eq!(seq, 1000 + (i * usize::from(gso)) as u32);
                let last = i + 1 == n;
                assert_eq!(s[33] & (TCP_FIN | TCP_PSH) != 0, last, "FIN/PSH on {i}");
                assert_eq!(s[33] & TCP_CWR != 0, i == 0, "CWR on {i}");
                assert_eq!(s[33] & 0x10, 0x10, "ACK kept on {i}");
                joined.extend_from_slice(&s[40..]);
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn malformed_and_oversized_are_refused() {
        let ok = tcp4(&[1u8; 3000], 0x10);
        let tso = |g| vnet(F_NEEDS_CSUM, GSO_TCPV4, g, 20, 16);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = ok.clone();
            f(&mut p);
            p
        };
        // A data offset of 60 bytes in a 44-byte packet.
        let mut short_options = ok[..44].to_vec();
        short_options[32] = 15 << 4;
        let cases: Vec<(&str, Vec<u8>, usize)> = vec![
            ("short vnet header", vec![0u8; 9], 1420),
            (
                "oversized",
                read(tso(1000), &vec![0u8; MAX_PACKET + 1]),
                1420,
            ),
            ("empty packet", tso(1000), 1420),
            ("IPv6", read(tso(1000), &with(&|p| p[0] = 0x60)), 1420),
            (
                "ihl below 20",
                read(tso(1000), &with(&|p| p[0] = 0x44)),
                1420,
            ),
            ("UDP", read(tso(1000), &with(&|p| p[9] = 17)), 1420),
            ("truncated TCP", read(tso(1000), &ok[..30]), 1420),
            (
                "TCP data offset below 20",
                read(tso(1000), &with(&|p| p[32] = 4 << 4)),
                1420,
            ),
            (
                "TCP options beyond the packet",
                read(tso(1000), &short_options),
                1420,
            ),
            ("gso_size 0", read(tso(0), &ok), 1420),
            ("segment above the MTU", read(tso(1400), &ok), 1420),
            ("too many segments", read(tso(1), &ok), 1420),
            (
                "UDP GSO",
                read(vnet(F_NEEDS_CSUM, 5, 1000, 20, 6), &ok),
                1420,
            ),
            (
                "TCPv6 GSO",
                read(vnet(F_NEEDS_CSUM, 4, 1000, 40, 16), &ok),
                1420,
            ),
            (
                "checksum outside the packet",
                read(vnet(F_NEEDS_CSUM, GSO_NONE, 0, 3030, 16), &ok),
                1420,
            ),
        ];
        for (name, r, mtu) in cases {
            let mut out = Vec::new();
            assert!(segment(&r, mtu, &mut out).is_err(), "{name} was accepted");
            assert!(out.is_empty(), "{name} produced packets");
        }
        let e = segment(&read(tso(1), &ok), 1420, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().starts_with("segment: gso_size 1"), "{e}");
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0x220d
        );
    }

    #[test]
    fn checksum_matches_a_16_bit_sum_at_every_length() {
        fn naive(data: &[u8], initial: u32) -> u16 {
            let mut sum = u64::from(initial);
            for w in data.chunks(2) {
                sum += u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0));
            }
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            !(sum as u16)
        }
        let data: Vec<u8> = (0..3000u32)
            .map(|i| (i * 7919 % 251) as u8 ^ 0xa5)
            .collect();
        for len in (0..64).chain([1419, 1420, 1421, 1422, 2999, 3000]) {
            for initial in [0, 0x1_2345, 0xffff] {
                assert_eq!(
                    checksum(&data[..len], initial),
                    naive(&data[..len], initial),
                    "len {len}"
                );
            }
        }
    }
}
