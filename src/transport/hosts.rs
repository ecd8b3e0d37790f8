//! The rendezvous of a group that spans hosts: an all-gather of node
//! descriptors, either over a small authenticated TCP service at node 0
//! (torchrun's `MASTER_ADDR`/`MASTER_PORT` convention) or through an
//! all-gather the caller already has (`torch.distributed`, MPI).
//!
//! A [`Descriptor`] carries what the other nodes need to reach a node: its
//! host identity, its geometry (checked against node 0's, field by field,
//! with the one-host rendezvous's rules), its TCP endpoint and its RDMA
//! endpoint. Every node checks the gathered table the same way, so the
//! callback path gets the same checks as the TCP path.
//!
//! The TCP service, in three steps per connection:
//!
//! 1. The node sends its rank and a nonce. Node 0 responds with its own nonce
//!    and an HMAC-SHA256 over both, keyed by the group secret. The node checks
//!    it and sends its own HMAC, which node 0 checks in constant time.
//! 2. The node sends its descriptor; node 0 checks the geometry.
//! 3. Once every rank is in, node 0 sends the whole table to each, or the
//!    first failure to all, so every node returns the same outcome.
//!
//! A connection that fails authentication or sends a malformed message is
//! logged with its address and dropped; node 0 keeps waiting for the others
//! until the join timeout.
//!
//! Messages are a 4-byte little-endian length and that many bytes of JSON,
//! at most `MAX_MESSAGE` bytes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::topology::NodeId;
use crate::transport::rendezvous::{check_hello, Hello};
use crate::transport::tcp::Secret;
use crate::transport::wire::NONCE_LEN;

/// Largest message accepted: a table of thousands of nodes fits easily.
const MAX_MESSAGE: u32 = 16 << 20;

const SERVER_LABEL: &[u8] = b"meshmem rendezvous v1 server";
const CLIENT_LABEL: &[u8] = b"meshmem rendezvous v1 client";

/// Everything the other nodes need to know about one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub hello: Hello,
    /// The host identity (`select::host_id`).
    pub host: String,
    /// The address of this node's TCP server, if it runs one.
    pub tcp: Option<SocketAddr>,
    /// This node's RDMA endpoint (`rdma::Endpoint::encode`), if it has one.
    pub rdma: Option<Vec<u8>>,
    /// The window base; set by node 0 only.
    pub window_base: Option<u64>,
    /// The group id every host's one-host rendezvous is named after; set by
    /// node 0 only.
    #[serde(default)]
    pub group: Option<String>,
    /// The address of node 0's listener for the collectives' star. Only
    /// node 0 sets it, and only when the descriptors travel through the
    /// caller's all-gather.
    #[serde(default)]
    pub collectives: Option<SocketAddr>,
}

impl Descriptor {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8], from: NodeId) -> Result<Descriptor> {
        serde_json::from_slice(bytes).map_err(|e| Error::Join {
            group: String::new(),
            reason: format!("node {from}'s descriptor is malformed: {e}"),
            source: None,
        })
    }
}

/// Decodes a gathered table and checks it: one descriptor per rank, in rank
/// order, every geometry field equal to node 0's.
pub fn check_table(table: &[Vec<u8>], size: u16) -> Result<Vec<Descriptor>> {
    if table.len() != size as usize {
        return Err(Error::Join {
            group: String::new(),
            reason: format!("the all-gather returned {} descriptors for a group of {size}", table.len()),
            source: None,
        });
    }
    let table: Vec<Descriptor> =
        table.iter().enumerate().map(|(i, b)| Descriptor::decode(b, NodeId(i as u16))).collect::<Result<_>>()?;
    for (rank, descriptor) in table.iter().enumerate() {
        if descriptor.hello.rank as usize != rank {
            return Err(Error::ConfigMismatch {
                node: NodeId(rank as u16),
                field: "rank",
                expected: rank.to_string(),
                found: descriptor.hello.rank.to_string(),
            });
        }
        if rank > 0 {
            check_hello(&table[0].hello, &descriptor.hello)?;
        }
    }
    Ok(table)
}

/// The settings of the TCP rendezvous.
#[derive(Clone, Debug)]
pub struct RendezvousConfig {
    /// Node 0's address: `MASTER_ADDR:MASTER_PORT`.
    pub addr: SocketAddr,
    pub secret: Secret,
    pub rank: u16,
    pub size: u16,
    pub timeout: Duration,
}

fn join_error(reason: impl Into<String>, source: Option<io::Error>) -> Error {
    Error::Join { group: String::new(), reason: reason.into(), source }
}

fn send(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut message = Vec::with_capacity(4 + bytes.len());
    message.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    message.extend_from_slice(bytes);
    stream.write_all(&message)
}

fn receive(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the maximum of {MAX_MESSAGE}"),
        ));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Messages of the rendezvous.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Hello { rank: u16, nonce: [u8; NONCE_LEN] },
    Challenge { nonce: [u8; NONCE_LEN], mac: [u8; NONCE_LEN] },
    Auth { mac: [u8; NONCE_LEN] },
    Descriptor(Vec<u8>),
    Table(Vec<Vec<u8>>),
    Reject(String),
}

fn send_message(stream: &mut TcpStream, message: &Message) -> io::Result<()> {
    send(stream, &serde_json::to_vec(message).map_err(io::Error::other)?)
}

fn receive_message(stream: &mut TcpStream) -> io::Result<Message> {
    serde_json::from_slice(&receive(stream)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut out).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(out)
}

/// Node 0's listening socket, bound before the other nodes start connecting.
pub struct RendezvousServer {
    listener: TcpListener,
    config: RendezvousConfig,
}

impl RendezvousServer {
    /// Binds node 0's address. A port in use is reported with what to do.
    pub fn bind(config: RendezvousConfig) -> Result<RendezvousServer> {
        let listener = TcpListener::bind(config.addr).map_err(|e| {
            join_error(
                format!(
                    "node 0 cannot listen on MASTER_ADDR:MASTER_PORT = {}; another process holds the port, so pick a free MASTER_PORT",
                    config.addr
                ),
                Some(e),
            )
        })?;
        listener.set_nonblocking(true).map_err(|e| join_error("making the rendezvous socket non-blocking", Some(e)))?;
        Ok(RendezvousServer { listener, config })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| join_error("getsockname of the rendezvous socket", Some(e)))
    }

    /// Waits for every other rank, checks their descriptors against `mine`,
    /// and returns the table in rank order, after sending it to all.
    pub fn gather(self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.gather_connected(mine).map(|(table, _)| table)
    }

    /// As [`gather`](Self::gather), and also returns the authenticated
    /// connection to each rank (index = rank, `None` at 0), which the group
    /// keeps for its collectives.
    pub fn gather_connected(self, mine: &[u8]) -> Result<(Vec<Vec<u8>>, Vec<Option<TcpStream>>)> {
        let size = self.config.size as usize;
        let deadline = Instant::now() + self.config.timeout;
        let mut table: Vec<Option<Vec<u8>>> = vec![None; size];
        table[0] = Some(mine.to_vec());
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        let ours = Descriptor::decode(mine, NodeId(0))?;

        while table.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                let missing: Vec<_> = table.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(r, _)| r).collect();
                let reason = format!("ranks {missing:?} did not join within {:?}", self.config.timeout);
                broadcast_reject(&mut streams, &reason);
                return Err(join_error(reason, None));
            }
            let (mut stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(join_error("accept on the rendezvous socket failed", Some(e))),
            };
            match self.admit(&mut stream) {
                Ok((rank, bytes)) => {
                    let checked = Descriptor::decode(&bytes, NodeId(rank))
                        .and_then(|theirs| check_hello(&ours.hello, &theirs.hello));
                    if let Err(e) = checked {
                        let reason = e.to_string();
                        tracing::warn!(%peer, rank, "rendezvous rejected a node: {reason}");
                        let _ = send_message(&mut stream, &Message::Reject(reason));
                        streams[rank as usize] = None;
                        broadcast_reject(&mut streams, &e.to_string());
                        return Err(e);
                    }
                    tracing::debug!(%peer, rank, "rendezvous admitted a node");
                    table[rank as usize] = Some(bytes);
                    streams[rank as usize] = Some(stream);
                }
                Err(reason) => {
                    tracing::warn!(%peer, "rendezvous dropped a connection: {reason}");
                    let _ = send_message(&mut stream, &Message::Reject(reason));
                }
            }
        }

        let table: Vec<Vec<u8>> = table.into_iter().flatten().collect();
        for stream in streams.iter_mut().flatten() {
            send_message(stream, &Message::Table(table.clone()))
                .map_err(|e| join_error("sending the table to a node failed", Some(e)))?;
        }
        Ok((table, streams))
    }

    /// Authenticates one connection and returns its rank and descriptor.
    // NOTE: connections are admitted one at a time, so a client that
    // connects and stays silent delays the others by up to the 10 s read
    // timeout per attempt.
    fn admit(&self, stream: &mut TcpStream) -> std::result::Result<(u16, Vec<u8>), String> {
        let step = |e: io::Error| format!("{e}");
        stream.set_nonblocking(false).map_err(step)?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(step)?;
        let Message::Hello { rank, nonce: client_nonce } = receive_message(stream).map_err(step)? else {
            return Err("expected Hello".into());
        };
        if rank == 0 || rank >= self.config.size {
            return Err(format!("rank {rank} is outside 1 to {}", self.config.size - 1));
        }
        let server_nonce = nonce().map_err(step)?;
        let mac = self.config.secret.tag(SERVER_LABEL, rank, 0, &client_nonce, &server_nonce);
        send_message(stream, &Message::Challenge { nonce: server_nonce, mac }).map_err(step)?;
        let Message::Auth { mac } = receive_message(stream).map_err(step)? else {
            return Err("expected Auth".into());
        };
        if !self.config.secret.verify(CLIENT_LABEL, rank, 0, &client_nonce, &server_nonce, &mac) {
            return Err(format!("a node claiming rank {rank} did not prove the group secret"));
        }
        let Message::Descriptor(bytes) = receive_message(stream).map_err(step)? else {
            return Err("expected Descriptor".into());
        };
        stream.set_read_timeout(None).map_err(step)?;
        Ok((rank, bytes))
    }
}

fn broadcast_reject(streams: &mut [Option<TcpStream>], reason: &str) {
    for stream in streams.iter_mut().flatten() {
        let _ = send_message(stream, &Message::Reject(reason.to_string()));
    }
}

/// Joins node 0's rendezvous as a rank other than 0, retrying the connection
/// until the timeout, and returns the table.
pub fn join(config: &RendezvousConfig, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    join_connected(config, mine).map(|(table, _)| table)
}

/// As [`join`], and also returns the authenticated connection to node 0.
pub fn join_connected(config: &RendezvousConfig, mine: &[u8]) -> Result<(Vec<Vec<u8>>, TcpStream)> {
    let deadline = Instant::now() + config.timeout;
    let mut delay = Duration::from_millis(10);
    let mut stream = loop {
        match TcpStream::connect_timeout(&config.addr, Duration::from_secs(1)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() + delay < deadline => {
                tracing::debug!(addr = %config.addr, error = %e, "rendezvous not reachable yet; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(join_error(
                    format!(
                        "cannot reach node 0's rendezvous at MASTER_ADDR:MASTER_PORT = {} within {:?}; check that node 0 is running and the address is right",
                        config.addr, config.timeout
                    ),
                    Some(e),
                ))
            }
        }
    };
    let io = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| join_error(format!("{what} with node 0 at {} failed", config.addr), Some(e))
    };
    stream.set_read_timeout(Some(config.timeout)).map_err(io("configuring the connection"))?;

    let client_nonce = nonce().map_err(io("getrandom"))?;
    send_message(&mut stream, &Message::Hello { rank: config.rank, nonce: client_nonce })
        .map_err(io("sending Hello"))?;
    let (server_nonce, mac) = match receive_message(&mut stream).map_err(io("receiving Challenge"))? {
        Message::Challenge { nonce, mac } => (nonce, mac),
        Message::Reject(reason) => return Err(join_error(format!("node 0 rejected this node: {reason}"), None)),
        other => return Err(join_error(format!("node 0 sent {other:?} instead of Challenge"), None)),
    };
    if !config.secret.verify(SERVER_LABEL, config.rank, 0, &client_nonce, &server_nonce, &mac) {
        return Err(join_error(
            format!(
                "the rendezvous at {} did not prove the group secret; start every node with the same MESHMEM_SECRET",
                config.addr
            ),
            None,
        ));
    }
    let mac = config.secret.tag(CLIENT_LABEL, config.rank, 0, &client_nonce, &server_nonce);
    send_message(&mut stream, &Message::Auth { mac }).map_err(io("sending Auth"))?;
    send_message(&mut stream, &Message::Descriptor(mine.to_vec())).map_err(io("sending the descriptor"))?;
    match receive_message(&mut stream) {
        Ok(Message::Table(table)) => Ok((table, stream)),
        Ok(Message::Reject(reason)) => Err(join_error(format!("node 0 rejected the join: {reason}"), None)),
        Ok(other) => Err(join_error(format!("node 0 sent {other:?} instead of the table"), None)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(join_error(
            format!(
                "node 0 at {} closed the connection; it rejected this node (check MESHMEM_SECRET) or exited",
                config.addr
            ),
            Some(e),
        )),
        Err(e) => Err(io("receiving the table")(e)),
    }
}

/// Gathers every node's descriptor: node 0 serves, the others join.
pub fn all_gather(config: &RendezvousConfig, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    if config.rank == 0 {
        RendezvousServer::bind(config.clone())?.gather(mine)
    } else {
        join(config, mine)
    }
}

/// As [`all_gather`], and also returns the authenticated connections of the
/// star around node 0: at node 0 one per rank (`None` at 0), elsewhere the
/// one to node 0 at index 0.
pub fn all_gather_connected(config: &RendezvousConfig, mine: &[u8]) -> Result<(Vec<Vec<u8>>, Vec<Option<TcpStream>>)> {
    if config.rank == 0 {
        RendezvousServer::bind(config.clone())?.gather_connected(mine)
    } else {
        let (table, stream) = join_connected(config, mine)?;
        let mut streams: Vec<Option<TcpStream>> = (0..config.size).map(|_| None).collect();
        streams[0] = Some(stream);
        Ok((table, streams))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn secret() -> Secret {
        Secret::new(b"rendezvous test secret".to_vec()).unwrap()
    }

    fn descriptor(rank: u16, mesh: &str) -> Vec<u8> {
        Descriptor {
            hello: Hello {
                protocol: 1,
                rank,
                size: 3,
                mesh: mesh.into(),
                page_size: 4096,
                window_size: 1 << 30,
                segment_len: 1 << 20,
                pid: rank as u32,
            },
            host: format!("host-{}", rank % 2),
            tcp: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4000 + rank)),
            rdma: None,
            window_base: (rank == 0).then_some(0x7000_0000_0000),
            group: None,
            collectives: None,
        }
        .encode()
    }

    fn config(addr: SocketAddr, rank: u16, secret: Secret) -> RendezvousConfig {
        RendezvousConfig { addr, secret, rank, size: 3, timeout: Duration::from_secs(5) }
    }

    fn loopback() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }

    /// Runs node 0 and ranks 1 and 2 (with the given meshes) in threads.
    fn run(meshes: [&'static str; 3], bad_client: bool) -> Vec<Result<Vec<Vec<u8>>>> {
        let server = RendezvousServer::bind(config(loopback(), 0, secret())).unwrap();
        let addr = server.local_addr().unwrap();
        if bad_client {
            let server_thread = std::thread::spawn(move || server.gather(&descriptor(0, meshes[0])));
            let wrong = Secret::new(b"not the group's secret".to_vec()).unwrap();
            let err = join(&config(addr, 1, wrong), &descriptor(1, meshes[1])).unwrap_err().to_string();
            assert!(err.contains("did not prove the group secret"), "{err}");
            let peers: Vec<_> = (1..3)
                .map(|r| {
                    std::thread::spawn(move || join(&config(addr, r, secret()), &descriptor(r, meshes[r as usize])))
                })
                .collect();
            let mut out = vec![server_thread.join().unwrap()];
            out.extend(peers.into_iter().map(|p| p.join().unwrap()));
            return out;
        }
        let peers: Vec<_> = (1..3)
            .map(|r| std::thread::spawn(move || join(&config(addr, r, secret()), &descriptor(r, meshes[r as usize]))))
            .collect();
        let mut out = vec![server.gather(&descriptor(0, meshes[0]))];
        out.extend(peers.into_iter().map(|p| p.join().unwrap()));
        out
    }

    #[test]
    fn rendezvous_gathers_every_descriptor() {
        let results = run(["2x1x1", "2x1x1", "2x1x1"], false);
        for result in results {
            let table = check_table(&result.unwrap(), 3).unwrap();
            assert_eq!(table.len(), 3);
            assert_eq!(table[2].host, "host-0");
            assert_eq!(table[0].window_base, Some(0x7000_0000_0000));
        }
    }

    #[test]
    fn rendezvous_survives_a_wrong_secret() {
        for result in run(["2x1x1", "2x1x1", "2x1x1"], true) {
            assert_eq!(result.unwrap().len(), 3);
        }
    }

    #[test]
    fn rendezvous_rejects_disagreeing_meshes_everywhere() {
        let results = run(["2x1x1", "2x1x1", "3x1x1"], false);
        let failures = results.iter().filter(|r| r.is_err()).count();
        assert!(failures >= 2, "{results:?}");
        let text = results.into_iter().find_map(Result::err).unwrap().to_string();
        assert!(text.contains("mesh"), "{text}");
    }

    #[test]
    fn rendezvous_reports_a_taken_port() {
        let taken = TcpListener::bind(loopback()).unwrap();
        let err = RendezvousServer::bind(config(taken.local_addr().unwrap(), 0, secret())).err().unwrap().to_string();
        assert!(err.contains("pick a free MASTER_PORT"), "{err}");
    }

    #[test]
    fn check_table_catches_callback_mistakes() {
        let good = vec![descriptor(0, "2x1x1"), descriptor(1, "2x1x1"), descriptor(2, "2x1x1")];
        assert!(check_table(&good, 3).is_ok());
        assert!(check_table(&good[..2], 3).unwrap_err().to_string().contains("returned 2 descriptors"));
        let swapped = vec![good[0].clone(), good[2].clone(), good[1].clone()];
        assert!(matches!(check_table(&swapped, 3), Err(Error::ConfigMismatch { field: "rank", .. })));
        let mut page = good.clone();
        page[1] =
            String::from_utf8(page[1].clone()).unwrap().replace("\"page_size\":4096", "\"page_size\":8192").into();
        let err = check_table(&page, 3).unwrap_err().to_string();
        assert!(err.contains("page size"), "{err}");
        assert!(check_table(&[b"{".to_vec(), good[1].clone(), good[2].clone()], 3).is_err());
    }

    #[test]
    fn descriptors_round_trip_with_and_without_rdma() {
        let plain = Descriptor::decode(&descriptor(0, "2x1x1"), NodeId(0)).unwrap();
        let with_rdma = Descriptor {
            rdma: Some((0..=255).collect()),
            group: Some("group".into()),
            collectives: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5000)),
            ..plain.clone()
        };
        for original in [plain, with_rdma] {
            let bytes = original.encode();
            assert_eq!(Descriptor::decode(&bytes, NodeId(0)).unwrap(), original);
            for cut in 0..bytes.len() {
                assert!(Descriptor::decode(&bytes[..cut], NodeId(0)).is_err(), "accepted a cut at {cut}");
            }
        }
    }

    #[test]
    fn malformed_descriptors_are_errors() {
        let text = String::from_utf8(descriptor(1, "2x1x1")).unwrap();
        let cases = [
            text.replace("\"rdma\":null", "\"rdma\":[256]"),
            text.replace("\"rdma\":null", "\"rdma\":\"bytes\""),
            text.replace("\"rdma\":null", "\"rdma\":[-1]"),
            text.replace("\"rank\":1", "\"rank\":70000"),
            text.replace("\"tcp\":\"127.0.0.1:4001\"", "\"tcp\":\"not an address\""),
            "[]".into(),
            "\u{0}\u{ff}".into(),
        ];
        for case in cases {
            assert_ne!(case, text);
            let err = Descriptor::decode(case.as_bytes(), NodeId(1)).unwrap_err().to_string();
            assert!(err.contains("node 1's descriptor is malformed"), "{case}: {err}");
        }
        let old = text.replace(",\"group\":null,\"collectives\":null", "");
        assert_ne!(old, text);
        assert!(Descriptor::decode(old.as_bytes(), NodeId(1)).is_ok(), "{old}");
    }
}
