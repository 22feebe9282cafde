//! Per-packet encrypt and decrypt cost of boringtun's and gotatun's (Mullvad's maintained
//! fork of boringtun) `noise::Tunn`, side by side, one core, after a handshake between two
//! tunnels in memory; both on `ring`'s ChaCha20-Poly1305. Its own workspace, so Rudder's
//! builds and CI never compile gotatun:
//! `cd benches/wg-forks && cargo run --release -- [PACKET_BYTES] [PACKETS]` (defaults 1420,
//! 200000). Issue 19's choice of boringtun rests on these figures (docs/ARCHITECTURE.md).
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1420);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    for round in 0..3 {
        let (be, bd) = boring(size, n);
        let (ge, gd) = gota(size, n);
        println!(
            "round {round}: {size} B x {n}: boringtun encrypt {be:.0} ns/pkt ({:.2} Gbit/s) decrypt {bd:.0} ns/pkt; \
             gotatun encrypt {ge:.0} ns/pkt ({:.2} Gbit/s) decrypt {gd:.0} ns/pkt",
            size as f64 * 8.0 / be,
            size as f64 * 8.0 / ge
        );
    }
}

/// An IPv4 packet of `size` bytes (the tunnels look at the version nibble only).
fn ip_packet(size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

fn boring(size: usize, n: usize) -> (f64, f64) {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    let a_s = StaticSecret::from([1u8; 32]);
    let b_s = StaticSecret::from([2u8; 32]);
    let (a_p, b_p) = (PublicKey::from(&a_s), PublicKey::from(&b_s));
    let mut a = Tunn::new(a_s, b_p, None, None, 1, None);
    let mut b = Tunn::new(b_s, a_p, None, None, 2, None);
    let mut buf = vec![0u8; 65536];
    let mut buf2 = vec![0u8; 65536];
    let init = match a.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no init"),
    };
    let resp = match b.decapsulate(None, &init, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no resp"),
    };
    let ka = match a.decapsulate(None, &resp, &mut buf) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no keepalive"),
    };
    let _ = b.decapsulate(None, &ka, &mut buf);
    let pkt = ip_packet(size);
    let mut enc = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        match a.encapsulate(&pkt, &mut buf) {
            TunnResult::WriteToNetwork(p) => enc.push(p.len()),
            _ => panic!("encapsulate"),
        }
    }
    let e = t.elapsed().as_nanos() as f64 / n as f64;
    // Decrypt a fresh run (each needs its own counter).
    let mut wire = Vec::with_capacity(n);
    for _ in 0..n.min(50_000) {
        if let TunnResult::WriteToNetwork(p) = a.encapsulate(&pkt, &mut buf) {
            wire.push(p.to_vec());
        }
    }
    let t = Instant::now();
    for w in &wire {
        match b.decapsulate(None, w, &mut buf2) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p.len(), size),
            _ => panic!("decapsulate"),
        }
    }
    let d = t.elapsed().as_nanos() as f64 / wire.len() as f64;
    std::hint::black_box(enc);
    (e, d)
}

fn gota(size: usize, n: usize) -> (f64, f64) {
    use bytes::BytesMut;
    use gotatun::noise::index_table::IndexTable;
    use gotatun::noise::rate_limiter::RateLimiter;
    use gotatun::noise::{Tunn, TunnResult};
    use gotatun::packet::{Packet, WgKind};
    use std::sync::Arc;
    let a_s = x25519_dalek::StaticSecret::from([1u8; 32]);
    let b_s = x25519_dalek::StaticSecret::from([2u8; 32]);
    let (a_p, b_p) = (
        x25519_dalek::PublicKey::from(&a_s),
        x25519_dalek::PublicKey::from(&b_s),
    );
    let mut a = Tunn::new(
        a_s,
        b_p,
        None,
        None,
        IndexTable::from_os_rng(),
        Arc::new(RateLimiter::new(&a_p, 100)),
    );
    let mut b = Tunn::new(
        b_s,
        a_p,
        None,
        None,
        IndexTable::from_os_rng(),
        Arc::new(RateLimiter::new(&b_p, 100)),
    );
    let init = a.format_handshake_initiation(false).expect("init");
    let TunnResult::WriteToNetwork(WgKind::HandshakeResp(resp)) =
        b.handle_incoming_packet(WgKind::HandshakeInit(init))
    else {
        panic!("no resp")
    };
    let TunnResult::WriteToNetwork(WgKind::Data(ka)) =
        a.handle_incoming_packet(WgKind::HandshakeResp(resp))
    else {
        panic!("no keepalive")
    };
    let _ = b.handle_incoming_packet(WgKind::Data(ka));
    let pkt = ip_packet(size);
    let mut enc = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        // The copy into a packet buffer is the same one boringtun makes into its output.
        let p = Packet::from_bytes(BytesMut::from(&pkt[..]));
        match a.encapsulate_with_session(p) {
            Ok(w) => enc.push(w.into_bytes().len()),
            Err(_) => panic!("encapsulate"),
        }
    }
    let e = t.elapsed().as_nanos() as f64 / n as f64;
    let mut wire = Vec::with_capacity(n);
    for _ in 0..n.min(50_000) {
        let p = Packet::from_bytes(BytesMut::from(&pkt[..]));
        wire.push(a.encapsulate_with_session(p).ok().expect("encapsulate"));
    }
    let t = Instant::now();
    let m = wire.len();
    for w in wire {
        match b.decapsulate_with_session(w) {
            Ok(p) => assert_eq!(p.len(), size),
            Err(e) => panic!("decapsulate {e:?}"),
        }
    }
    let d = t.elapsed().as_nanos() as f64 / m as f64;
    std::hint::black_box(enc);
    (e, d)
}
