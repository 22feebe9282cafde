//! Embedded DNS answer latency on 127.0.0.1. One client sends a UDP query, waits for the reply,
//! and repeats, 20,000 times for each of `SERVICE` (its VIP), `tasks.SERVICE` (10 tasks,
//! shuffled per answer) and a name the server forwards to a fake upstream on 127.0.0.1. The view
//! holds 1,000 services. Prints p50, p99 and max per kind; the round trip includes the client's
//! own send and receive.
//!
//! Run with `cargo bench -p rudder-agent --bench dns`; without `--bench` it does nothing.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rudder_agent::dns::{DnsServer, DnsView, ServiceRecord};

const QUERIES: usize = 20_000;
const WARMUP: usize = 1_000;
const SERVICES: u32 = 1_000;
const TASKS: u32 = 10;

fn view() -> DnsView {
    let addr = |n: u32| Ipv4Addr::from(0x0a00_0000 + n);
    DnsView {
        services: (0..SERVICES)
            .map(|i| {
                let rec = ServiceRecord {
                    vip: Some(addr(i * 100)),
                    tasks: (1..=TASKS).map(|t| addr(i * 100 + t)).collect(),
                };
                (format!("svc-{i:04}"), rec)
            })
            .collect(),
    }
}

/// Answers every query with one A record, as a host resolver with the name cached would.
async fn fake_upstream(sock: tokio::net::UdpSocket) {
    let mut buf = vec![0; 4096];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        let Ok(req) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut m = Message::response(req.metadata.id, req.metadata.op_code);
        m.metadata.recursion_desired = req.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.queries = req.queries.clone();
        m.add_answer(Record::from_rdata(
            req.queries[0].name().clone(),
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
    }
}

/// Round-trip times of `n` sequential queries for `name`, each with its own id.
fn measure(client: &UdpSocket, server: SocketAddr, name: &str, n: usize) -> Vec<Duration> {
    let mut req = Message::query();
    req.metadata.recursion_desired = true;
    req.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut packet = req.to_vec().unwrap();
    let mut buf = vec![0; 65535];
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let id = (i as u16).wrapping_mul(40503);
        packet[..2].copy_from_slice(&id.to_be_bytes());
        let start = Instant::now();
        client.send_to(&packet, server).unwrap();
        let len = client.recv(&mut buf).expect("no reply within 5 s");
        times.push(start.elapsed());
        assert_eq!(buf[..2], id.to_be_bytes(), "{name}: reply to another query");
        if i == 0 {
            let reply = Message::from_vec(&buf[..len]).unwrap();
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "{name}"
            );
            assert!(!reply.answers.is_empty(), "{name}: no answers");
        }
    }
    times
}

fn report(label: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "dns {label:<16} p50 {:>6.1} µs   p99 {:>6.1} µs   max {:>7.1} µs   ({} queries)",
        us(at(0.50)),
        us(at(0.99)),
        us(*times.last().unwrap()),
        times.len()
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // One worker for the server and the fake upstream; the client blocks on the main thread, so
    // the two cores of a small host are each busy with one side.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(async {
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(fake_upstream(up));
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), vec![up_addr])
            .await
            .unwrap();
        server.set_view(view());
        server
    });
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let addr = server.local_addr();
    for (label, name) in [
        ("SERVICE", "svc-0500"),
        ("tasks.SERVICE", "tasks.svc-0500"),
        ("forwarded", "example.com"),
    ] {
        measure(&client, addr, name, WARMUP);
        report(label, measure(&client, addr, name, QUERIES));
    }
    drop(server);
}
