//! Framing of batched UDP I/O for the userspace WireGuard data path ([`super::device`]), pure
//! over lengths and byte buffers.
//!
//! Why: one `sendmsg` with `UDP_SEGMENT` sends many datagrams to one peer, and one `recvmsg`
//! on a `UDP_GRO` socket returns many; the kernel only accepts (and only hands back) a batch
//! whose datagrams all have one size, except a shorter last one, and whose total fits one
//! 64 KiB UDP payload. This module cuts a run of encrypted datagrams into such batches and
//! cuts a coalesced receive back into datagrams.
//!
//! Invariants: every batch of [`gso_batches`] is non-empty, holds at most [`MAX_GSO_SEGMENTS`]
//! datagrams and at most [`MAX_GSO_BYTES`] bytes, has all datagrams but the last of the first
//! one's size and a last one no larger; batches cover the input in order, each datagram once.
//! [`gro_split`] refuses a zero segment size and never yields an empty datagram.

use std::ops::Range;

/// Most datagrams in one `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS` before 6.1;
/// later kernels allow 128, this stays with the older figure so one code path fits both).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes in one `UDP_SEGMENT` send: an IPv4 UDP datagram's payload limit
/// (65535 less 20 bytes of IPv4 and 8 of UDP header).
pub const MAX_GSO_BYTES: usize = 65507;

/// Why a received buffer could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The kernel reported a segment size of zero.
    #[error("batch: GRO segment size 0 for a {0}-byte receive")]
    ZeroSegment(usize),
}

/// Cuts datagrams of lengths `lens` (in send order, all to one peer) into `UDP_SEGMENT`
/// batches: index ranges into `lens`. A zero-length datagram is sent alone.
pub fn gso_batches(lens: &[usize]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < lens.len() {
        let size = lens[start];
        let mut end = start + 1;
        let mut total = size;
        if size > 0 {
            while end < lens.len()
                && end - start < MAX_GSO_SEGMENTS
                && lens[end] <= size
                && lens[end] > 0
                && total + lens[end] <= MAX_GSO_BYTES
            {
                total += lens[end];
                end += 1;
                // A shorter datagram ends the batch: only the last may be short.
                if lens[end - 1] < size {
                    break;
                }
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The datagrams of one receive of `len` bytes, coalesced by GRO into segments of `segment`
/// bytes (the last may be shorter), as ranges into the buffer. `segment` is `None` when the
/// kernel attached no `UDP_GRO` control message: one datagram.
pub fn gro_split(len: usize, segment: Option<usize>) -> Result<Vec<Range<usize>>, BatchError> {
    let Some(seg) = segment else {
        return Ok((len > 0).then_some(0..len).into_iter().collect());
    };
    if seg == 0 {
        return Err(BatchError::ZeroSegment(len));
    }
    Ok((0..len)
        .step_by(seg)
        .map(|s| s..(s + seg).min(len))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks every invariant of `gso_batches` on `lens`.
    fn check(lens: &[usize]) -> Vec<Range<usize>> {
        let b = gso_batches(lens);
        let mut next = 0;
        for r in &b {
            assert_eq!(r.start, next, "{lens:?}: batches in order, no gap");
            assert!(!r.is_empty(), "{lens:?}: empty batch");
            assert!(r.len() <= MAX_GSO_SEGMENTS, "{lens:?}: too many segments");
            let d = &lens[r.clone()];
            if d.len() > 1 {
                assert!(
                    d.iter().sum::<usize>() <= MAX_GSO_BYTES,
                    "{lens:?}: too big"
                );
                let (last, rest) = d.split_last().unwrap();
                assert!(rest.iter().all(|l| *l == d[0]), "{lens:?}: unequal sizes");
                assert!(*last <= d[0], "{lens:?}: last larger");
            }
            next = r.end;
        }
        assert_eq!(next, lens.len(), "{lens:?}: all covered");
        b
    }

    #[test]
    fn gso_batches_cases() {
        assert!(gso_batches(&[]).is_empty());
        assert_eq!(check(&[1452]), vec![0..1]);
        // A TSO super-packet: 44 full segments and a short tail, in one batch.
        let mut tso = vec![1452; 44];
        tso.push(600);
        assert_eq!(check(&tso), vec![0..45]);
        // 46 full 1452-byte datagrams exceed 65507 bytes: two batches.
        let b = check(&[1452; 46]);
        assert_eq!(b, vec![0..45, 45..46]);
        // More than 64 small ones.
        assert_eq!(check(&[100; 130]), vec![0..64, 64..128, 128..130]);
        // A larger one after a smaller one starts a new batch, and a short one ends one.
        assert_eq!(
            check(&[500, 500, 800, 800, 300, 800]),
            vec![0..2, 2..5, 5..6]
        );
        // Empty datagrams go alone.
        assert_eq!(check(&[0, 100, 0, 0]), vec![0..1, 1..2, 2..3, 3..4]);
        // A datagram too large to batch goes alone.
        assert_eq!(check(&[65507, 65507, 10]), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn gso_batches_invariants_on_mixed_runs() {
        let mut seed = 7u64;
        for _ in 0..500 {
            let n = (seed % 200) as usize;
            let lens: Vec<usize> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    [1452, 1452, 1452, 700, 92, 0, 9000][(seed >> 33) as usize % 7]
                })
                .collect();
            check(&lens);
        }
    }

    #[test]
    fn gro_split_cases() {
        assert!(gro_split(0, None).unwrap().is_empty());
        assert_eq!(gro_split(148, None).unwrap(), vec![0..148]);
        assert_eq!(
            gro_split(1452 * 3 + 100, Some(1452)).unwrap(),
            vec![0..1452, 1452..2904, 2904..4356, 4356..4456]
        );
        assert_eq!(gro_split(1452, Some(1452)).unwrap(), vec![0..1452]);
        assert!(gro_split(0, Some(1452)).unwrap().is_empty());
        assert_eq!(gro_split(10, Some(0)), Err(BatchError::ZeroSegment(10)));
    }
}
