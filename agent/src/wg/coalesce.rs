//! TCP coalescing of decrypted packets into TUN super-packets (GRO done in userspace): the
//! receive half of the offload data path whose send half is [`super::segment`].
//!
//! Why: writing to the TUN device runs the inner packet's whole receive path in the writer's
//! syscall, and it was the largest single cost of the userspace child in the profile (~39 %).
//! With `IFF_VNET_HDR`, consecutive segments of one TCP flow can go to the kernel as one
//! packet of up to 64 KiB behind a `virtio_net_hdr` (`GSO_TCPV4`, `NEEDS_CSUM`), so the stack
//! runs once per ~45 segments, as it does for a NIC with GRO.
//!
//! Invariants: only what Linux's own GRO would merge is merged — IPv4 without options, same
//! addresses, ports, TOS, TTL and DF (set), identical TCP options, contiguous sequence
//! numbers, only ACK (PSH allowed on the last), every segment but the last exactly the
//! first's size; a merged packet never exceeds 65535 bytes or [`super::segment::MAX_SEGMENTS`]
//! segments. Packets are never reordered: anything that does not extend the current run ends
//! it and is written as it came (with an empty header, so the kernel checks it as usual).

use super::segment::{checksum, MAX_PACKET, MAX_SEGMENTS, VNET_HDR_LEN};

const F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const IP_DF: u8 = 0x40;

/// One TUN write: a `virtio_net_hdr` followed by the packet.
pub type TunWrite = Vec<u8>;

/// The TCP/IPv4 facts that decide whether two packets belong to one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    /// IPv4 header length (20: no options).
    ihl: usize,
    /// TCP header length.
    thl: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// Parses `p` as a mergeable TCP/IPv4 segment, or `None` if it is anything else (which is
/// then passed through untouched).
fn parse(p: &[u8]) -> Option<Seg> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total != p.len() || p[6] & IP_DF == 0 || p[6] & 0x3f != 0 || p[7] != 0 {
        return None;
    }
    let thl = usize::from(p[32] >> 4) * 4;
    if thl < 20 || p.len() < 20 + thl {
        return None;
    }
    let flags = p[33];
    if flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let payload = p.len() - 20 - thl;
    if payload == 0 {
        return None;
    }
    // Merged packets go up with NEEDS_CSUM, which the kernel trusts: so only packets whose
    // own checksums verify are merged; a bad one passes alone and the kernel drops it.
    if checksum(&p[..20], 0) != 0 || checksum(&p[20..], pseudo_sum(p)) != 0 {
        return None;
    }
    Some(Seg {
        ihl: 20,
        thl,
        seq: u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
        flags,
        payload,
    })
}

/// Whether `next` (parsed as `n`) extends the run that starts with `first` (parsed as `f`)
/// and so far ends at sequence `end`, holding `count` segments and `len` bytes.
fn extends(
    first: &[u8],
    f: &Seg,
    end: u32,
    count: usize,
    len: usize,
    next: &[u8],
    n: &Seg,
) -> bool {
    // Same flow and the same IP fields the merged packet keeps: TOS, TTL, addresses, ports.
    first[1] == next[1]
        && first[8] == next[8]
        && first[12..20] == next[12..20]
        && first[20..24] == next[20..24]
        // Same TCP header length, ack, window and options (timestamps included, as Linux).
        && f.thl == n.thl
        && first[28..32] == next[28..32]
        && first[34..36] == next[34..36]
        && first[40..20 + f.thl] == next[40..20 + n.thl]
        && n.seq == end
        && n.payload <= f.payload
        && count < MAX_SEGMENTS
        && len + n.payload <= MAX_PACKET
}

/// Coalesces `packets` (decrypted IPv4 packets, in arrival order) into TUN writes.
pub fn coalesce<P: AsRef<[u8]>>(packets: &[P]) -> Vec<TunWrite> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < packets.len() {
        let first = packets[i].as_ref();
        let Some(f) = parse(first) else {
            out.push(plain(first));
            i += 1;
            continue;
        };
        let mut merged = first.to_vec();
        let mut end = f.seq.wrapping_add(f.payload as u32);
        let mut count = 1;
        let mut flags = f.flags;
        let mut j = i + 1;
        // A run ends after a PSH or a short segment.
        let mut open = f.flags & TCP_PSH == 0;
        while open && j < packets.len() {
            let next = packets[j].as_ref();
            let Some(n) = parse(next) else { break };
            if !extends(first, &f, end, count, merged.len(), next, &n) {
                break;
            }
            merged.extend_from_slice(&next[20 + n.thl..]);
            end = end.wrapping_add(n.payload as u32);
            count += 1;
            flags |= n.flags;
            open = n.flags & TCP_PSH == 0 && n.payload == f.payload;
            j += 1;
        }
        if count == 1 {
            out.push(plain(first));
        } else {
            out.push(gso_write(merged, &f, flags));
        }
        i = j;
    }
    out
}

/// The IPv4 pseudo-header's sum for the TCP segment of `p` (no IP options).
fn pseudo_sum(p: &[u8]) -> u32 {
    let word = |i: usize| u32::from(u16::from_be_bytes([p[i], p[i + 1]]));
    word(12) + word(14) + word(16) + word(18) + 6 + (p.len() - 20) as u32
}

/// A packet as it came, behind an empty header.
fn plain(p: &[u8]) -> TunWrite {
    let mut w = vec![0u8; VNET_HDR_LEN];
    w.extend_from_slice(p);
    w
}

/// The merged packet's header fixes and its `virtio_net_hdr`.
fn gso_write(mut p: Vec<u8>, f: &Seg, flags: u8) -> TunWrite {
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let ip_sum = checksum(&p[..f.ihl], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    p[f.ihl + 13] = flags;
    // NEEDS_CSUM: the checksum field holds the pseudo-header's folded sum; the kernel (or the
    // device the packet leaves by) completes it per segment.
    let mut sum = pseudo_sum(&p);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[f.ihl + 16..f.ihl + 18].copy_from_slice(&(sum as u16).to_be_bytes());
    let hdr_len = (f.ihl + f.thl) as u16;
    let mut w = Vec::with_capacity(VNET_HDR_LEN + p.len());
    w.push(F_NEEDS_CSUM);
    w.push(GSO_TCPV4);
    w.extend_from_slice(&hdr_len.to_le_bytes());
    w.extend_from_slice(&(f.payload as u16).to_le_bytes());
    w.extend_from_slice(&(f.ihl as u16).to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(&p);
    w
}

#[cfg(test)]
mod tests {
    use super::super::segment::segment;
    use super::*;

    /// A TCP/IPv4 packet of flow `port`, seq `seq`, `len` payload bytes, DF, ACK + `flags`.
    fn pkt(port: u16, seq: u32, len: usize, flags: u8) -> Vec<u8> {
        let total = 40 + len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = IP_DF;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[20..22].copy_from_slice(&port.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = TCP_ACK | flags;
        for (k, b) in p[40..].iter_mut().enumerate() {
            *b = (seq as usize + k) as u8;
        }
        fix(&mut p);
        p
    }

    /// Recomputes both checksums after a test changed a field.
    fn fix(p: &mut [u8]) {
        p[10..12].copy_from_slice(&[0, 0]);
        let s = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&s.to_be_bytes());
        p[36..38].copy_from_slice(&[0, 0]);
        let s = checksum(&p[20..], pseudo_sum(p));
        p[36..38].copy_from_slice(&s.to_be_bytes());
    }

    fn summary(w: &[TunWrite]) -> Vec<(u8, usize)> {
        w.iter().map(|w| (w[1], w.len() - VNET_HDR_LEN)).collect()
    }

    #[test]
    fn runs_are_merged_and_anything_else_passes_in_order() {
        let a = |seq, len, flags| pkt(1000, seq, len, flags);
        /// Name, packets in, (GSO type, packet length) of each write out.
        type Case = (&'static str, Vec<Vec<u8>>, Vec<(u8, usize)>);
        let cases: Vec<Case> = vec![
            (
                "three full segments and a short last one",
                vec![
                    a(0, 1000, 0),
                    a(1000, 1000, 0),
                    a(2000, 1000, 0),
                    a(3000, 10, 0),
                ],
                vec![(GSO_TCPV4, 40 + 3010)],
            ),
            (
                "a single packet stays plain",
                vec![a(0, 1000, 0)],
                vec![(0, 1040)],
            ),
            (
                "a gap in sequence ends the run",
                vec![a(0, 1000, 0), a(1000, 1000, 0), a(3000, 1000, 0)],
                vec![(GSO_TCPV4, 2040), (0, 1040)],
            ),
            (
                "PSH ends the run, included",
                vec![a(0, 1000, 0), a(1000, 1000, TCP_PSH), a(2000, 1000, 0)],
                vec![(GSO_TCPV4, 2040), (0, 1040)],
            ),
            (
                "a short segment ends the run",
                vec![a(0, 1000, 0), a(1000, 500, 0), a(1500, 1000, 0)],
                vec![(GSO_TCPV4, 1540), (0, 1040)],
            ),
            (
                "a larger segment does not join",
                vec![a(0, 500, 0), a(500, 1000, 0)],
                vec![(0, 540), (0, 1040)],
            ),
            (
                "another flow interleaved is not merged across",
                vec![a(0, 1000, 0), pkt(2000, 0, 1000, 0), a(1000, 1000, 0)],
                vec![(0, 1040), (0, 1040), (0, 1040)],
            ),
            (
                "SYN, FIN and bare ACKs pass through",
                vec![pkt(1, 0, 0, 0), a(0, 100, 0x01), a(100, 100, 0x02)],
                vec![(0, 40), (0, 140), (0, 140)],
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(summary(&coalesce(&input)), want, "{name}");
        }
    }

    #[test]
    fn options_and_ip_fields_must_match() {
        let changed = |at: usize, v: u8| {
            let mut p = pkt(1000, 1000, 1000, 0);
            p[at] = v;
            fix(&mut p);
            vec![pkt(1000, 0, 1000, 0), p]
        };
        // The control: unchanged, the two merge.
        assert_eq!(coalesce(&changed(8, 64)).len(), 1);
        assert_eq!(coalesce(&changed(8, 63)).len(), 2, "TTL");
        assert_eq!(coalesce(&changed(6, 0)).len(), 2, "no DF");
        assert_eq!(coalesce(&changed(34, 9)).len(), 2, "window");
        assert_eq!(coalesce(&changed(1, 4)).len(), 2, "TOS");
        // A bad TCP checksum is never merged (the kernel would trust the merged one).
        let mut bad = pkt(1000, 1000, 1000, 0);
        bad[45] ^= 1;
        assert_eq!(coalesce(&[pkt(1000, 0, 1000, 0), bad]).len(), 2, "checksum");
        let mut e = pkt(1000, 0, 1000, 0);
        e[0] = 0x46; // IP options
        assert_eq!(summary(&coalesce(&[e.clone()])), vec![(0, e.len())]);
        // Truncated or lying about its length: passed through, never parsed further.
        let mut f = pkt(1000, 0, 1000, 0);
        f.truncate(30);
        assert_eq!(summary(&coalesce(&[f])), vec![(0, 30)]);
    }

    #[test]
    fn merged_packet_cut_again_gives_back_the_segments() {
        // What the kernel would do to a coalesced write if it had to resegment it: the
        // segmentation of the send path gives back the original packets' payloads, with valid
        // checksums and contiguous sequence numbers.
        let input: Vec<Vec<u8>> = (0..40)
            .map(|k| pkt(1000, k * 1380, 1380, 0))
            .chain([pkt(1000, 40 * 1380, 77, TCP_PSH)])
            .collect();
        let w = coalesce(&input);
        assert_eq!(w.len(), 1);
        assert!(w[0].len() - VNET_HDR_LEN <= MAX_PACKET);
        let mut again = Vec::new();
        segment(&w[0], 1420, &mut again).unwrap();
        assert_eq!(again.len(), input.len());
        for (a, b) in again.iter().zip(&input) {
            assert_eq!(a[24..28], b[24..28], "seq");
            assert_eq!(a[40..], b[40..], "payload");
            assert_eq!(checksum(&a[..20], 0), 0, "ip checksum");
        }
        assert_eq!(again.last().unwrap()[33] & TCP_PSH, TCP_PSH);
    }

    #[test]
    fn merge_stops_at_64k() {
        let input: Vec<Vec<u8>> = (0..60).map(|k| pkt(1000, k * 1380, 1380, 0)).collect();
        let w = coalesce(&input);
        assert!(w.len() >= 2);
        assert!(w.iter().all(|w| w.len() - VNET_HDR_LEN <= MAX_PACKET));
        let bytes: usize = w.iter().map(|w| w.len() - VNET_HDR_LEN).sum();
        assert_eq!(bytes, 60 * 1380 + w.len() * 40);
    }
}
