//! A TCP server and client in two network namespaces, one per simulated
//! host, so the TCP backend runs over a real link between "hosts".
//!
//! The test runs this test binary again inside each namespace (`ip netns
//! exec`), selecting the role with `MESHMEM_NETNS_ROLE`. It needs root;
//! without it the test prints why it did not run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meshmem::launch::netns::SimulatedHosts;
use meshmem::transport::shm::Segment;
use meshmem::transport::tcp::{Secret, Served, ServerConfig, TcpServer, TcpTransport, Timeouts};
use meshmem::transport::Transport;
use meshmem::NodeId;

const ROLE: &str = "MESHMEM_NETNS_ROLE";
const ADDR: &str = "MESHMEM_NETNS_ADDR";
const SEGMENT: u64 = 1 << 20;

fn secret() -> Secret {
    Secret::new(b"namespace test secret".to_vec()).expect("a valid secret")
}

/// Kills and reaps a child on every exit path of the test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn child(hosts: &SimulatedHosts, host: usize, role: &str, addr: SocketAddr) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = hosts.command(host, exe);
    command.args(["--exact", "tcp_crosses_simulated_hosts", "--nocapture"]).env(ROLE, role).env(ADDR, addr.to_string());
    command
}

/// Serves a segment at `ADDR` and prints `ready` once it listens.
fn serve() {
    let addr: SocketAddr = std::env::var(ADDR).expect("address").parse().expect("a socket address");
    let segment = Arc::new(Segment::create(NodeId(1), SEGMENT).expect("segment"));
    let mut config = ServerConfig::loopback(NodeId(1), secret(), vec![Served::segment(segment)]);
    config.bind = addr;
    let _server = TcpServer::start(config).expect("start the server");
    println!("ready");
    std::thread::sleep(Duration::from_secs(60));
}

/// Writes, reads back and updates words on the server at `ADDR`.
fn client() {
    let addr: SocketAddr = std::env::var(ADDR).expect("address").parse().expect("a socket address");
    let timeouts = Timeouts { io: Duration::from_secs(5), connect: Duration::from_secs(5) };
    let t = TcpTransport::new(NodeId(0), secret(), timeouts, [(NodeId(1), addr)]);
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    t.write(NodeId(1), 4096, &data).expect("write across hosts");
    let mut back = vec![0u8; data.len()];
    t.read(NodeId(1), 4096, &mut back).expect("read across hosts");
    assert!(back == data, "bytes differ after crossing hosts");
    assert_eq!(t.fetch_add_u64(NodeId(1), 0, 7).expect("fetch_add across hosts"), 0);
    assert_eq!(t.compare_exchange_u64(NodeId(1), 0, 7, 1).expect("compare_exchange across hosts"), 7);
    println!("client done");
}

#[test]
fn tcp_crosses_simulated_hosts() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => return serve(),
        Ok("client") => return client(),
        _ => {}
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("tcp_crosses_simulated_hosts NOT RUN: creating network namespaces needs root");
        return;
    }
    let hosts = SimulatedHosts::create(2).expect("create two simulated hosts");
    let addr = SocketAddr::new(hosts.address(1), 7411);

    let mut server = Reaped(child(&hosts, 1, "server", addr).stdout(Stdio::piped()).spawn().expect("spawn the server"));
    // The child's test harness prints its own lines before `ready`.
    let mut stdout = BufReader::new(server.0.stdout.take().expect("the server's stdout"));
    let mut printed = String::new();
    while !printed.contains("ready") {
        let before = printed.len();
        stdout.read_line(&mut printed).expect("read the server's output");
        assert!(printed.len() > before, "the server exited before it was ready: {printed:?}");
    }

    let status = child(&hosts, 0, "client", addr).status().expect("run the client");
    assert!(status.success(), "the client in host 0 failed: {status}");
    drop(server);
    drop(stdout);

    // The namespaces are gone once the set is dropped.
    let names: Vec<String> = (0..2).map(|k| hosts.namespace(k)).collect();
    drop(hosts);
    let list = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(!list.contains(&name), "namespace {name} was left behind");
    }
}
