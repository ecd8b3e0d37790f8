//! The TCP backend against a plain TCP socket on loopback, in one run:
//! 1 MiB reads and writes against a request/response copy of the same
//! bytes over a plain socket, and 8-byte reads against a plain 8-byte
//! request/response round trip.
//!
//! `cargo bench --bench tcp`; BENCHMARKS-net.md records the ratios.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshmem::transport::shm::Segment;
use meshmem::transport::tcp::{Secret, Served, ServerConfig, TcpServer, TcpTransport, Timeouts};
use meshmem::transport::Transport;
use meshmem::NodeId;

const BULK: usize = 1 << 20;

/// A plain server: each request is an opcode byte and a little-endian u32
/// length. Opcode 0 sends back that many bytes; opcode 1 receives that many
/// bytes and sends back one byte.
fn plain_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept the benchmark client");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let mut memory = vec![3u8; BULK];
        let mut request = [0u8; 5];
        while stream.read_exact(&mut request).is_ok() {
            let len = u32::from_le_bytes([request[1], request[2], request[3], request[4]]) as usize;
            let done = if request[0] == 0 {
                stream.write_all(&memory[..len])
            } else {
                stream.read_exact(&mut memory[..len]).and_then(|_| stream.write_all(&[1]))
            };
            if done.is_err() {
                return;
            }
        }
    });
    addr
}

struct Plain(TcpStream);

impl Plain {
    fn read(&mut self, dst: &mut [u8]) {
        let mut request = [0u8; 5];
        request[1..].copy_from_slice(&(dst.len() as u32).to_le_bytes());
        self.0.write_all(&request).expect("send a plain read request");
        self.0.read_exact(dst).expect("receive plain read data");
    }

    fn write(&mut self, src: &[u8]) {
        let mut request = [1u8; 5];
        request[1..].copy_from_slice(&(src.len() as u32).to_le_bytes());
        self.0.write_all(&request).expect("send a plain write request");
        self.0.write_all(src).expect("send plain write data");
        self.0.read_exact(&mut [0u8; 1]).expect("receive the plain write ack");
    }
}

fn tcp(c: &mut Criterion) {
    let secret = Secret::new(b"benchmark secret of 32 bytes....".to_vec()).expect("secret");
    let segment = Arc::new(Segment::create(NodeId(1), 4 * BULK as u64).expect("segment"));
    let server = TcpServer::start(ServerConfig::loopback(NodeId(1), secret.clone(), vec![Served::segment(segment)]))
        .expect("start the TCP server");
    let transport = TcpTransport::new(NodeId(0), secret, Timeouts::default(), [(NodeId(1), server.local_addr())]);
    let plain_stream = TcpStream::connect(plain_server()).expect("connect to the plain server");
    plain_stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut plain = Plain(plain_stream);

    let src = vec![7u8; BULK];
    let mut dst = vec![0u8; BULK];
    transport.write(NodeId(1), 0, &src).expect("warm up the connection");

    let mut group = c.benchmark_group("tcp_1MiB");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.bench_function(BenchmarkId::new("plain", "read"), |b| b.iter(|| plain.read(black_box(&mut dst))));
    group.bench_function(BenchmarkId::new("meshmem", "read"), |b| {
        b.iter(|| transport.read(NodeId(1), 0, black_box(&mut dst)).expect("read"))
    });
    group.bench_function(BenchmarkId::new("plain", "write"), |b| b.iter(|| plain.write(black_box(&src))));
    group.bench_function(BenchmarkId::new("meshmem", "write"), |b| {
        b.iter(|| transport.write(NodeId(1), 0, black_box(&src)).expect("write"))
    });
    group.finish();

    let mut group = c.benchmark_group("tcp_8B_read");
    let mut word = [0u8; 8];
    group.bench_function("plain", |b| b.iter(|| plain.read(black_box(&mut word))));
    group.bench_function("meshmem", |b| b.iter(|| transport.read(NodeId(1), 64, black_box(&mut word)).expect("read")));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(3));
    targets = tcp
}
criterion_main!(benches);
