//! The TCP backend: one-sided operations emulated over TCP, for hosts
//! without RDMA.
//!
//! Every node runs a [`TcpServer`] that serves the segments it registered;
//! every node's [`TcpTransport`] keeps one connection to each peer it talks
//! to. The frames are those of [`super::wire`].
//!
//! Connection setup, in four steps:
//!
//! 1. The client sends `Hello` with its node id, the node it expects to
//!    reach, and a random nonce.
//! 2. The server responds with `Challenge` with its own nonce and an HMAC-SHA256
//!    over both nonces and both ids, keyed by the group's secret, under the
//!    label `server`. The client checks it (in constant time) before it
//!    proves anything itself.
//! 3. The client sends `Auth`, the same HMAC under the label `client`.
//! 4. The server checks it (in constant time) and sends `Welcome` with the
//!    lengths of its segments, or `Failed(AuthFailed)` and closes.
//!
//! After that the server reads requests one at a time, checks each against
//! the segment it names, executes it, and responds in order. A request that
//! fails a check gets a `Failed` response and a warning in the server's log
//! with the peer's address; the connection stays up. A frame that cannot be
//! decoded (unknown opcode or version, a length beyond the maximum, a frame
//! that stops half way) gets a `Failed` response where possible, logged, and closes the
//! connection, because the byte stream is out of step after it.
//!
//! The client pipelines: a batch given to `submit` is written before any
//! response is read, and responses are matched to requests by position (each
//! carries its request's id, which is checked). Every blocking `read`,
//! `write` and atomic waits for its own response, so those behave exactly as on
//! shared memory; [`TcpTransport::write_nbi`] posts a write and returns once
//! its bytes are handed to the kernel, and `quiet` waits for every posted
//! write. A connection that fails is dropped with every request on it
//! failing; the next operation reconnects, with backoff, and requests are
//! never replayed (an atomic may or may not have happened).
//!
//! Lock order: a transport's peer connections are locked in ascending node
//! id; nothing else is locked while one is held.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use parking_lot::{Mutex, MutexGuard};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::layout::SegmentLayout;
use crate::topology::NodeId;
use crate::transport::shm::Segment;
use crate::transport::wire::{
    Failure, FailureCode, Frame, Header, Opcode, WireError, HEADER_LEN, MAX_PAYLOAD, NONCE_LEN, WRITE_PREFIX,
};
use crate::transport::{check_bounds, Completion, LocalView, Op, Transport, TransportKind};

/// Environment variable that carries the group's secret.
pub const SECRET_ENV: &str = "MESHMEM_SECRET";

/// Shortest secret accepted, in bytes: 128 bits, the HMAC key strength that
/// NIST SP 800-107 asks for at least.
pub const MIN_SECRET_LEN: usize = 16;

/// Request and response bytes a client keeps in flight on one connection
/// beyond its oldest request. It must fit the socket buffers of both ends
/// (Linux starts TCP buffers at 16 KiB to send and 128 KiB to receive,
/// `tcp_wmem`/`tcp_rmem`), so that a client writing a batch and a server
/// writing responses never both block on full buffers.
const WINDOW_BYTES: u64 = 64 << 10;

/// Payloads up to this size are copied into the send buffer with their
/// header; larger ones are sent from where they lie.
const INLINE_PAYLOAD: usize = 16 << 10;

/// Size of a connection's receive buffer.
const RECV_BUFFER: usize = 64 << 10;

/// Idle time after which a connection is checked for a close by the peer
/// before it carries another request.
const STALE_AFTER: Duration = Duration::from_millis(200);

const SERVER_LABEL: &[u8] = b"meshmem tcp v1 server";
const CLIENT_LABEL: &[u8] = b"meshmem tcp v1 client";

type HmacSha256 = Hmac<Sha256>;

/// The group's shared secret. Its bytes are never printed or logged.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes, redacted)", self.0.len())
    }
}

/// Compares in time that depends on the lengths only, like the MAC checks.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl Eq for Secret {}

impl Secret {
    /// Wraps `bytes`, which must be at least [`MIN_SECRET_LEN`] long.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(Error::InvalidConfig {
                name: SECRET_ENV,
                value: format!("<{} bytes>", bytes.len()),
                reason: format!(
                    "a secret needs at least {MIN_SECRET_LEN} bytes; generate one with `openssl rand -hex 32`"
                ),
            });
        }
        Ok(Secret(bytes.into()))
    }

    /// Makes 32 random bytes from the operating system.
    pub fn generate() -> Result<Secret> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| Error::os("getrandom for the group secret", io::Error::other(e.to_string())))?;
        Secret::new(bytes.to_vec())
    }

    /// Reads the secret from `MESHMEM_SECRET`, or `None` when it is unset.
    pub fn from_env() -> Result<Option<Secret>> {
        match std::env::var(SECRET_ENV) {
            Ok(text) => Secret::new(text.into_bytes()).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::InvalidConfig {
                name: SECRET_ENV,
                value: "<not UTF-8>".into(),
                reason: "the secret must be text, such as the hex digits of `openssl rand -hex 32`".into(),
            }),
        }
    }

    /// Formats the secret as hex digits, to pass to child processes in
    /// `MESHMEM_SECRET`.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self, label: &[u8], client: u16, server: u16, client_nonce: &[u8], server_nonce: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(label);
        mac.update(&client.to_le_bytes());
        mac.update(&server.to_le_bytes());
        mac.update(client_nonce);
        mac.update(server_nonce);
        mac
    }

    pub(crate) fn tag(&self, label: &[u8], client: u16, server: u16, cn: &[u8], sn: &[u8]) -> [u8; NONCE_LEN] {
        self.mac(label, client, server, cn, sn).finalize().into_bytes().into()
    }

    /// Checks `tag` in constant time (`verify_slice` compares with `subtle`).
    pub(crate) fn verify(&self, label: &[u8], client: u16, server: u16, cn: &[u8], sn: &[u8], tag: &[u8]) -> bool {
        self.mac(label, client, server, cn, sn).verify_slice(tag).is_ok()
    }
}

fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut out = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut out).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(out)
}

/// Timeouts of a node's TCP endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How long one response, or the rest of a frame once it started, may take.
    pub io: Duration,
    /// How long to keep retrying a connection, with backoff, before the peer
    /// counts as unreachable.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { io: Duration::from_secs(30), connect: Duration::from_secs(10) }
    }
}

/// A byte range a server may serve, and what keeps it alive.
pub struct Served {
    ptr: *mut u8,
    len: u64,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: the range is shared memory that the server only touches through
// raw copies and atomics; `_owner` keeps the mapping alive.
unsafe impl Send for Served {}
// SAFETY: as above.
unsafe impl Sync for Served {}

impl Served {
    /// Serves the whole of `segment`.
    pub fn segment(segment: Arc<Segment>) -> Served {
        Served { ptr: segment.as_ptr(), len: segment.len(), _owner: segment }
    }

    /// Serves `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped and writable while `owner` lives,
    /// and every other user must tolerate concurrent copies and 64-bit
    /// atomics on it, as with any shared memory.
    pub unsafe fn from_raw(ptr: *mut u8, len: u64, owner: Arc<dyn Send + Sync>) -> Served {
        Served { ptr, len, _owner: owner }
    }
}

/// The configuration of a server.
pub struct ServerConfig {
    /// The node whose segments these are.
    pub node: NodeId,
    /// The address to listen on. Port 0 picks a free port; [`TcpServer::local_addr`]
    /// returns it.
    pub bind: SocketAddr,
    pub secret: Secret,
    pub segments: Vec<Served>,
    pub timeouts: Timeouts,
}

impl ServerConfig {
    /// Listens on a free port of 127.0.0.1.
    pub fn loopback(node: NodeId, secret: Secret, segments: Vec<Served>) -> ServerConfig {
        ServerConfig {
            node,
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            secret,
            segments,
            timeouts: Timeouts::default(),
        }
    }
}

struct ServerShared {
    node: NodeId,
    secret: Secret,
    segments: Vec<Served>,
    timeouts: Timeouts,
    stop: AtomicBool,
    /// A clone of every open connection, to shut them down on drop.
    connections: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A node's server: a listening thread and one thread per connection.
/// Dropping it closes every connection and joins the threads.
pub struct TcpServer {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpServer").field("node", &self.shared.node).field("addr", &self.addr).finish()
    }
}

impl TcpServer {
    /// Binds and starts serving. Fails naming the address when it is taken.
    pub fn start(config: ServerConfig) -> Result<TcpServer> {
        let listener = TcpListener::bind(config.bind).map_err(|e| Error::Transport {
            node: config.node,
            reason: format!("cannot listen on {}; pick another address or port, or stop what holds it", config.bind),
            source: Some(e),
        })?;
        let addr = listener.local_addr().map_err(|e| Error::os("getsockname of the TCP server", e))?;
        let shared = Arc::new(ServerShared {
            node: config.node,
            secret: config.secret,
            segments: config.segments,
            timeouts: config.timeouts,
            stop: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("meshmem-tcp-{}", config.node))
            .spawn(move || accept_loop(listener, accepting))
            .map_err(|e| Error::os("spawning the TCP server thread", e))?;
        tracing::info!(node = %config.node, %addr, "TCP server listening");
        Ok(TcpServer { addr, shared, acceptor: Some(acceptor) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);

        // Wake the acceptor with a connection of our own; it finds `stop` set
        // and returns. A failure means it is not blocked in accept any more.
        let wake = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.addr.port()),
            IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.addr.port()),
            _ => self.addr,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }

        // Shutting the sockets down ends every worker's blocking read.
        for stream in self.shared.connections.lock().values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *self.shared.workers.lock());
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ServerShared>) {
    let mut next_id = 0u64;
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(node = %shared.node, error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "unknown".into());
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            shared.connections.lock().insert(id, clone);
        }
        let serving = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("meshmem-tcp-{}-{id}", shared.node)).spawn(move || {
            serve_connection(&serving, stream, &peer);
            serving.connections.lock().remove(&id);
        });
        match spawned {
            Ok(handle) => {
                let mut workers = shared.workers.lock();
                workers.retain(|w| !w.is_finished());
                workers.push(handle);
            }
            Err(e) => {
                tracing::warn!(node = %shared.node, error = %e, "cannot spawn a connection thread; dropping the connection");
                if let Some(stream) = shared.connections.lock().remove(&id) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// The reason reading from a connection stopped.
#[derive(Debug)]
enum ReadFail {
    /// The peer closed the connection after `got` bytes of this read.
    Closed {
        got: usize,
    },
    /// Nothing arrived within the timeout and nothing of this read had.
    Idle,
    /// The timeout passed after part of the read arrived.
    Stalled {
        got: usize,
        need: usize,
    },
    Io(io::Error),
}

impl fmt::Display for ReadFail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadFail::Closed { got: 0 } => f.write_str("the connection was closed"),
            ReadFail::Closed { got } => write!(f, "the connection was closed after {got} bytes of a frame"),
            ReadFail::Idle => f.write_str("no response arrived within the timeout"),
            ReadFail::Stalled { got, need } => write!(f, "the frame stopped after {got} of {need} bytes"),
            ReadFail::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Buffered reading from a socket that has `SO_RCVTIMEO` set, with bulk
/// payloads received straight into their destination.
struct Reader {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader { stream, buf: vec![0u8; RECV_BUFFER].into_boxed_slice(), pos: 0, end: 0 }
    }

    /// Returns whether bytes are buffered or the socket is readable (or
    /// closed) right now.
    fn readable_now(&self) -> bool {
        if self.pos < self.end {
            return true;
        }
        let mut pfd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n != 0
    }

    /// Receives up to `len` bytes at `dst` with one `recv(2)`.
    ///
    /// # Safety
    ///
    /// `dst..dst + len` must be writable.
    unsafe fn recv(&self, dst: *mut u8, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: the caller guarantees the destination range.
            let n = unsafe { libc::recv(self.stream.as_raw_fd(), dst.cast(), len, 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Reads exactly `need` bytes to `dst`. With `idle_ok`, a timeout
    /// before the first byte returns `Idle` (and consumes nothing).
    ///
    /// # Safety
    ///
    /// `dst..dst + need` must be writable and not read by this thread until
    /// the call returns.
    unsafe fn read_raw(&mut self, dst: *mut u8, need: usize, idle_ok: bool) -> Result<(), ReadFail> {
        let buffered = need.min(self.end - self.pos);
        // SAFETY: the source is inside `buf`, the destination is the caller's.
        unsafe { std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.pos), dst, buffered) };
        self.pos += buffered;
        let mut got = buffered;

        while got < need {
            let left = need - got;
            let result = if left >= self.buf.len() / 2 {
                // SAFETY: `dst + got .. dst + need` is the caller's range.
                unsafe { self.recv(dst.add(got), left) }
            } else {
                let (buf, cap) = (self.buf.as_mut_ptr(), self.buf.len());
                // SAFETY: the whole buffer is ours to fill.
                unsafe { self.recv(buf, cap) }.inspect(|&n| {
                    let take = n.min(left);
                    // SAFETY: `take` bytes were received into `buf` and fit
                    // the caller's remaining range.
                    unsafe { std::ptr::copy_nonoverlapping(self.buf.as_ptr(), dst.add(got), take) };
                    self.pos = take;
                    self.end = n;
                })
            };
            match result {
                Ok(0) => return Err(ReadFail::Closed { got }),
                Ok(n) => got += n.min(left),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(if got == 0 && idle_ok { ReadFail::Idle } else { ReadFail::Stalled { got, need } });
                }
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
        Ok(())
    }

    fn read_into(&mut self, dst: &mut [u8], idle_ok: bool) -> Result<(), ReadFail> {
        // SAFETY: `dst` is an exclusive borrow of `dst.len()` bytes.
        unsafe { self.read_raw(dst.as_mut_ptr(), dst.len(), idle_ok) }
    }

    /// Reads and drops `len` bytes: the payload of a rejected write.
    fn discard(&mut self, mut len: usize) -> Result<(), ReadFail> {
        let mut sink = [0u8; 4096];
        while len > 0 {
            let n = len.min(sink.len());
            self.read_into(&mut sink[..n], false)?;
            len -= n;
        }
        Ok(())
    }

    fn read_header(&mut self, idle_ok: bool) -> Result<[u8; HEADER_LEN], ReadFail> {
        let mut head = [0u8; HEADER_LEN];
        self.read_into(&mut head, idle_ok)?;
        Ok(head)
    }
}

/// Sends every byte of `parts` with `sendmsg(2)` and `MSG_NOSIGNAL` (a
/// closed peer is an error, not a `SIGPIPE`).
///
/// # Safety
///
/// Each `(ptr, len)` must be readable for the whole call.
unsafe fn send_parts(stream: &TcpStream, parts: &[(*const u8, usize)]) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| p.1 > 0)
        .map(|&(ptr, len)| libc::iovec { iov_base: ptr as *mut _, iov_len: len })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        // SAFETY: zeroed msghdr is valid; it points at our iovec array.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[first..].as_mut_ptr();
        msg.msg_iovlen = (iov.len() - first) as _;
        // SAFETY: every iovec describes memory the caller keeps readable.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Err(io::Error::new(io::ErrorKind::TimedOut, "send timed out")),
                _ => return Err(e),
            }
        }
        let mut sent = n as usize;
        while first < iov.len() && sent >= iov[first].iov_len {
            sent -= iov[first].iov_len;
            first += 1;
        }
        if first < iov.len() {
            // SAFETY: `sent` is less than this iovec's length.
            iov[first].iov_base = unsafe { (iov[first].iov_base as *mut u8).add(sent) }.cast();
            iov[first].iov_len -= sent;
        }
    }
    Ok(())
}

fn send_bytes(stream: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is borrowed for the call.
    unsafe { send_parts(stream, &[(bytes.as_ptr(), bytes.len())]) }
}

fn send_frame(stream: &TcpStream, frame: &Frame<'_>, id: u64) -> io::Result<()> {
    let mut out = Vec::with_capacity(64);
    frame.encode(id, &mut out);
    send_bytes(stream, &out)
}

fn configure(stream: &TcpStream, timeouts: Timeouts) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeouts.io))?;
    stream.set_write_timeout(Some(timeouts.io))
}

/// Extracts the request id from a header's raw bytes, even when the header
/// does not decode, so a rejection can name the request.
fn raw_id(head: &[u8; HEADER_LEN]) -> u64 {
    u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]))
}

/// Serves one connection until it closes, fails, or the server stops.
fn serve_connection(shared: &ServerShared, stream: TcpStream, peer: &str) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    if let Err(e) = configure(&stream, shared.timeouts) {
        tracing::warn!(node = %shared.node, peer, error = %e, "cannot configure a connection; dropping it");
        return;
    }
    let mut reader = match stream.try_clone() {
        Ok(clone) => Reader::new(clone),
        Err(e) => {
            tracing::warn!(node = %shared.node, peer, error = %e, "cannot duplicate a connection's socket; dropping it");
            return;
        }
    };
    let client = match handshake_server(shared, &stream, &mut reader, peer) {
        Ok(client) => client,
        Err(reason) => {
            tracing::warn!(node = %shared.node, peer, "rejected a connection: {reason}");
            return;
        }
    };
    tracing::debug!(node = %shared.node, peer, client, "connection authenticated");

    let mut server = Serving { shared, stream: &stream, reader, peer, client, out: Vec::with_capacity(64) };
    loop {
        match server.serve_one() {
            Ok(()) => {}
            Err(Stop::Idle) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(Stop::Closed) => {
                tracing::debug!(node = %shared.node, peer, client, "connection closed by the peer");
                return;
            }
            Err(Stop::Fail(reason)) => {
                if !shared.stop.load(Ordering::SeqCst) {
                    tracing::warn!(node = %shared.node, peer, client, "dropping the connection: {reason}");
                }
                return;
            }
        }
    }
}

/// Runs the server's side of the handshake and returns the client's node id.
fn handshake_server(
    shared: &ServerShared,
    stream: &TcpStream,
    reader: &mut Reader,
    peer: &str,
) -> std::result::Result<u16, String> {
    let reject = |code: FailureCode, id: u64, limit: u64| {
        let _ = send_frame(stream, &Frame::Failed(Failure { limit, ..Failure::new(code) }), id);
    };
    let frame_body = |reader: &mut Reader, step: &str| -> std::result::Result<(Header, Vec<u8>), String> {
        let head = reader.read_header(false).map_err(|e| format!("{step}: {e}"))?;
        let header = Header::decode(&head).map_err(|e| {
            reject(FailureCode::for_wire_error(&e), raw_id(&head), wire_limit(&e));
            format!("{step}: {e}")
        })?;
        let mut body = vec![0u8; header.len as usize];
        reader.read_into(&mut body, false).map_err(|e| format!("{step}: {e}"))?;
        Ok((header, body))
    };

    // Step 1: Hello.
    let (header, body) = frame_body(reader, "reading Hello")?;
    let Ok(Frame::Hello { client, server, nonce: client_nonce }) = Frame::decode_body(&header, &body) else {
        reject(FailureCode::UnknownOpcode, header.id, 0);
        return Err(format!("expected Hello, got {:?}", header.opcode));
    };
    if server != shared.node.0 {
        reject(FailureCode::WrongNode, header.id, shared.node.0 as u64);
        return Err(format!("client node {client} asked for node {server}, this is node {}", shared.node));
    }

    // Step 2: Challenge, which proves the server holds the secret.
    let server_nonce = nonce().map_err(|e| format!("getrandom: {e}"))?;
    let mac = shared.secret.tag(SERVER_LABEL, client, server, &client_nonce, &server_nonce);
    send_frame(stream, &Frame::Challenge { server, nonce: server_nonce, mac }, header.id)
        .map_err(|e| format!("sending Challenge: {e}"))?;

    // Steps 3 and 4: the client's proof, then Welcome.
    let (header, body) = frame_body(reader, "reading Auth")?;
    let Ok(Frame::Auth { mac }) = Frame::decode_body(&header, &body) else {
        reject(FailureCode::UnknownOpcode, header.id, 0);
        return Err(format!("expected Auth, got {:?}", header.opcode));
    };
    if !shared.secret.verify(CLIENT_LABEL, client, server, &client_nonce, &server_nonce, &mac) {
        reject(FailureCode::AuthFailed, header.id, 0);
        return Err(format!("client claiming node {client} at {peer} did not prove the group secret"));
    }
    let segments = shared.segments.iter().map(|s| s.len).collect();
    send_frame(stream, &Frame::Welcome { segments }, header.id).map_err(|e| format!("sending Welcome: {e}"))?;
    Ok(client)
}

fn wire_limit(e: &WireError) -> u64 {
    match e {
        WireError::UnsupportedVersion(_) => super::wire::VERSION as u64,
        WireError::TooLong { max, .. } => *max as u64,
        _ => 0,
    }
}

enum Stop {
    Idle,
    Closed,
    Fail(String),
}

impl From<ReadFail> for Stop {
    fn from(e: ReadFail) -> Stop {
        match e {
            ReadFail::Idle => Stop::Idle,
            ReadFail::Closed { got: 0 } => Stop::Closed,
            other => Stop::Fail(other.to_string()),
        }
    }
}

struct Serving<'a> {
    shared: &'a ServerShared,
    stream: &'a TcpStream,
    reader: Reader,
    peer: &'a str,
    client: u16,
    out: Vec<u8>,
}

impl Serving<'_> {
    fn reply(&mut self, frame: Frame<'_>, id: u64) -> std::result::Result<(), Stop> {
        self.out.clear();
        frame.encode(id, &mut self.out);
        send_bytes(self.stream, &self.out).map_err(|e| Stop::Fail(format!("sending a response: {e}")))
    }

    /// Logs a rejected request and sends the rejection; the connection stays up.
    fn reject(&mut self, id: u64, opcode: Opcode, failure: Failure) -> std::result::Result<(), Stop> {
        tracing::warn!(
            node = %self.shared.node,
            peer = self.peer,
            client = self.client,
            ?opcode,
            segment = failure.segment,
            offset = format_args!("{:#x}", failure.offset),
            len = failure.len,
            limit = failure.limit,
            "rejected a request: {}",
            failure.code
        );
        self.reply(Frame::Failed(failure), id)
    }

    /// Checks a request's range and returns its segment.
    fn check(&self, segment: u32, offset: u64, len: u64, atomic: bool) -> std::result::Result<&Served, Failure> {
        let fail = |code, limit| Failure { code, segment, offset, len, limit };
        let served = self
            .shared
            .segments
            .get(segment as usize)
            .ok_or(fail(FailureCode::NoSuchSegment, self.shared.segments.len() as u64))?;
        match offset.checked_add(len) {
            Some(end) if end <= served.len => {}
            _ => return Err(fail(FailureCode::OutOfBounds, served.len)),
        }
        if atomic && offset % 8 != 0 {
            return Err(fail(FailureCode::Unaligned, 8));
        }
        Ok(served)
    }

    fn serve_one(&mut self) -> std::result::Result<(), Stop> {
        let head = self.reader.read_header(true)?;
        let header = match Header::decode(&head) {
            Ok(header) if header.opcode.is_request() => header,
            Ok(header) => {
                let _ = self.reply(Frame::Failed(Failure::new(FailureCode::UnknownOpcode)), header.id);
                return Err(Stop::Fail(format!("{:?} frame where a request was expected", header.opcode)));
            }
            Err(e) => {
                let failure = Failure { limit: wire_limit(&e), ..Failure::new(FailureCode::for_wire_error(&e)) };
                let _ = self.reply(Frame::Failed(failure), raw_id(&head));
                return Err(Stop::Fail(format!("malformed frame: {e}")));
            }
        };
        let mut fixed = [0u8; 32];
        let fixed_len = header.fixed_len() as usize;
        self.reader
            .read_into(&mut fixed[..fixed_len], false)
            .map_err(|e| Stop::Fail(format!("{:?} request: {e}", header.opcode)))?;

        if header.opcode == Opcode::Write {
            let segment = u32::from_le_bytes(fixed[0..4].try_into().unwrap_or_default());
            let offset = u64::from_le_bytes(fixed[4..12].try_into().unwrap_or_default());
            let len = (header.len - WRITE_PREFIX) as usize;
            return match self.check(segment, offset, len as u64, false) {
                Ok(served) => {
                    // SAFETY: `check` put `offset..offset + len` inside the
                    // served range, which stays mapped while the server lives.
                    let dst = unsafe { served.ptr.add(offset as usize) };
                    // SAFETY: the range is writable shared memory; concurrent
                    // users see unspecified bytes, as with any remote put.
                    unsafe { self.reader.read_raw(dst, len, false) }
                        .map_err(|e| Stop::Fail(format!("write payload: {e}")))?;
                    self.reply(Frame::Done { value: 0 }, header.id)
                }
                Err(failure) => {
                    self.reader.discard(len).map_err(|e| Stop::Fail(format!("rejected write payload: {e}")))?;
                    self.reject(header.id, header.opcode, failure)
                }
            };
        }

        let frame = Frame::decode_body(&header, &fixed[..fixed_len]).map_err(|e| {
            let _ = send_frame(self.stream, &Frame::Failed(Failure::new(FailureCode::for_wire_error(&e))), header.id);
            Stop::Fail(format!("malformed frame: {e}"))
        })?;
        match frame {
            Frame::Read { segment, offset, len } => match self.check(segment, offset, len as u64, false) {
                Ok(served) => {
                    let head = Frame::Data { data: &[] }.header(header.id);
                    let head = Header { len, ..head }.encode();
                    // SAFETY: the source range is inside the served mapping
                    // (checked above) and stays mapped during the send.
                    let src = unsafe { served.ptr.add(offset as usize) };
                    // SAFETY: both parts are readable for the call.
                    unsafe { send_parts(self.stream, &[(head.as_ptr(), HEADER_LEN), (src, len as usize)]) }
                        .map_err(|e| Stop::Fail(format!("sending read data: {e}")))
                }
                Err(failure) => self.reject(header.id, header.opcode, failure),
            },
            Frame::FetchAdd { segment, offset, value } => match self.word(segment, offset) {
                Ok(word) => {
                    let previous = word.fetch_add(value, Ordering::AcqRel);
                    self.reply(Frame::Done { value: previous }, header.id)
                }
                Err(failure) => self.reject(header.id, header.opcode, failure),
            },
            Frame::CompareExchange { segment, offset, current, new } => match self.word(segment, offset) {
                Ok(word) => {
                    let (Ok(previous) | Err(previous)) =
                        word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
                    self.reply(Frame::Done { value: previous }, header.id)
                }
                Err(failure) => self.reject(header.id, header.opcode, failure),
            },
            other => Err(Stop::Fail(format!("{:?} frame where a request was expected", other.opcode()))),
        }
    }

    fn word(&self, segment: u32, offset: u64) -> std::result::Result<&AtomicU64, Failure> {
        let served = self.check(segment, offset, 8, true)?;
        // SAFETY: in bounds and 8-byte aligned (checked) in a live mapping
        // whose users touch metadata words only atomically.
        Ok(unsafe { &*(served.ptr.add(offset as usize) as *const AtomicU64) })
    }
}

/// One peer the client can reach.
struct Peer {
    node: NodeId,
    addr: SocketAddr,
    conn: Mutex<Option<Conn>>,
    /// The peer's segment lengths, from its first `Welcome`.
    segments: OnceLock<Vec<u64>>,
}

/// The operation a response completes.
enum Pending {
    /// A posted write; its failure is kept for `quiet`.
    Posted { id: u64 },
    /// Operation `slot` of the current batch; reads carry where their bytes
    /// go. The pointer is valid because a batch drains every one of its
    /// requests (or drops the connection with them) before it returns.
    Slot { id: u64, slot: usize, dst: *mut u8, len: usize, cost: u64 },
}

struct Conn {
    stream: TcpStream,
    reader: Reader,
    out: Vec<u8>,
    outstanding: VecDeque<Pending>,
    inflight: u64,
    next_id: u64,
    last_used: Instant,
    /// Failures of posted writes, reported by the next `quiet`.
    deferred: Vec<Error>,
}

// SAFETY: the raw pointers in `Pending` are only dereferenced by the thread
// that holds the connection's lock during the batch that created them.
unsafe impl Send for Conn {}

/// A request ready to go out.
struct Request<'a> {
    frame: Frame<'a>,
    /// Bytes of a read's response.
    response: u64,
}

/// The TCP transport of one node: connections to the peers' servers.
pub struct TcpTransport {
    me: NodeId,
    secret: Secret,
    timeouts: Timeouts,
    peers: Vec<Option<Peer>>,
    counters: Option<(Arc<Segment>, SegmentLayout)>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peers: Vec<_> = self.peers.iter().flatten().map(|p| (p.node, p.addr)).collect();
        f.debug_struct("TcpTransport").field("node", &self.me).field("peers", &peers).finish()
    }
}

impl TcpTransport {
    /// Creates the transport of node `me`, which reaches each listed node's server at
    /// its address. Connections open on first use.
    pub fn new(
        me: NodeId,
        secret: Secret,
        timeouts: Timeouts,
        peers: impl IntoIterator<Item = (NodeId, SocketAddr)>,
    ) -> Self {
        let mut table: Vec<Option<Peer>> = Vec::new();
        for (node, addr) in peers {
            if table.len() <= node.index() {
                table.resize_with(node.index() + 1, || None);
            }
            table[node.index()] = Some(Peer { node, addr, conn: Mutex::new(None), segments: OnceLock::new() });
        }
        TcpTransport { me, secret, timeouts, peers: table, counters: None }
    }

    /// Counts every operation in the traffic row of `own`, this node's
    /// segment, as the shared-memory backend does.
    pub fn with_counters(mut self, own: Arc<Segment>, layout: SegmentLayout) -> Self {
        self.counters = Some((own, layout));
        self
    }

    fn peer(&self, node: NodeId) -> Result<&Peer> {
        self.peers.get(node.index()).and_then(Option::as_ref).ok_or_else(|| Error::Transport {
            node,
            reason: format!(
                "node {node} has no TCP address on node {}; it is not part of this group's TCP routes",
                self.me
            ),
            source: None,
        })
    }

    #[inline]
    fn count(&self, dest: NodeId, bytes: u64) {
        if let Some((own, layout)) = &self.counters {
            let word = |offset: u64| {
                // SAFETY: the traffic row lies in the header of our own live
                // segment; the words are aligned and only touched atomically.
                unsafe { &*(own.as_ptr().add(offset as usize) as *const AtomicU64) }
            };
            // Relaxed: counters are statistics, read without ordering.
            word(layout.traffic_bytes(dest)).fetch_add(bytes, Ordering::Relaxed);
            word(layout.traffic_ops(dest)).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Locks `peer`'s connection, opening one if there is none.
    fn connection<'p>(&self, peer: &'p Peer) -> Result<MutexGuard<'p, Option<Conn>>> {
        let mut guard = peer.conn.lock();
        if let Some(conn) = guard.as_ref() {
            // A peer that restarted closed our old connection; find out
            // before sending on it, so the request goes to the new one.
            if conn.outstanding.is_empty() && conn.last_used.elapsed() > STALE_AFTER && conn.reader.readable_now() {
                tracing::debug!(node = %self.me, peer = %peer.node, "connection closed while idle; reconnecting");
                *guard = None;
            }
        }
        if guard.is_none() {
            *guard = Some(self.connect(peer)?);
        }
        Ok(guard)
    }

    /// Connects to `peer`, retrying with exponential backoff until the
    /// connect timeout, and authenticates.
    #[cold]
    fn connect(&self, peer: &Peer) -> Result<Conn> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = self.timeouts.connect.saturating_sub(started.elapsed()).max(Duration::from_millis(10));
            match TcpStream::connect_timeout(&peer.addr, left) {
                Ok(stream) => return self.handshake(peer, stream),
                Err(e) if started.elapsed() + delay < self.timeouts.connect => {
                    tracing::debug!(node = %self.me, peer = %peer.node, addr = %peer.addr, attempts, error = %e, "connect failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::warn!(node = %self.me, peer = %peer.node, addr = %peer.addr, attempts, error = %e, "peer unreachable");
                    return Err(Error::Transport {
                        node: peer.node,
                        reason: format!(
                            "cannot connect to node {} at {} after {attempts} attempts over {:.1?}; check that the node is running and that its address is reachable from node {}",
                            peer.node,
                            peer.addr,
                            started.elapsed(),
                            self.me
                        ),
                        source: Some(e),
                    });
                }
            }
        }
    }

    /// Runs the client's side of the handshake (see the module docs).
    fn handshake(&self, peer: &Peer, stream: TcpStream) -> Result<Conn> {
        let fail = |reason: String, source: Option<io::Error>| Error::Transport { node: peer.node, reason, source };
        configure(&stream, self.timeouts)
            .map_err(|e| fail(format!("configuring the connection to {}", peer.addr), Some(e)))?;
        let reader_stream = stream.try_clone().map_err(|e| fail("dup of the socket".into(), Some(e)))?;
        let mut reader = Reader::new(reader_stream);
        let client_nonce = nonce().map_err(|e| fail("getrandom for a nonce".into(), Some(e)))?;
        let (client, server) = (self.me.0, peer.node.0);

        send_frame(&stream, &Frame::Hello { client, server, nonce: client_nonce }, 0)
            .map_err(|e| fail(format!("sending Hello to {}", peer.addr), Some(e)))?;
        let mut body = Vec::new();
        let challenge = self.read_frame(peer, &mut reader, &mut body, "Challenge")?;
        let Frame::Challenge { server: responding, nonce: server_nonce, mac } = challenge else {
            return Err(fail(format!("{} responded to Hello with {challenge:?}", peer.addr), None));
        };
        if responding != server || !self.secret.verify(SERVER_LABEL, client, server, &client_nonce, &server_nonce, &mac) {
            return Err(fail(
                format!(
                    "the server at {} did not prove the group secret; check that every node has the same {SECRET_ENV} and that {} belongs to this group",
                    peer.addr, peer.addr
                ),
                None,
            ));
        }

        let mac = self.secret.tag(CLIENT_LABEL, client, server, &client_nonce, &server_nonce);
        send_frame(&stream, &Frame::Auth { mac }, 0)
            .map_err(|e| fail(format!("sending Auth to {}", peer.addr), Some(e)))?;
        let welcome = self.read_frame(peer, &mut reader, &mut body, "Welcome")?;
        let Frame::Welcome { segments } = welcome else {
            return Err(fail(format!("{} responded to Auth with {welcome:?}", peer.addr), None));
        };
        if let Some(known) = peer.segments.get() {
            if *known != segments {
                tracing::warn!(node = %self.me, peer = %peer.node, "peer's segments changed across a reconnect; keeping the first lengths for bounds checks");
            }
        }
        let _ = peer.segments.set(segments);
        tracing::debug!(node = %self.me, peer = %peer.node, addr = %peer.addr, "connected");
        Ok(Conn {
            stream,
            reader,
            out: Vec::with_capacity(4096),
            outstanding: VecDeque::new(),
            inflight: 0,
            next_id: 1,
            last_used: Instant::now(),
            deferred: Vec::new(),
        })
    }

    /// Reads one whole handshake frame; `Failed` becomes an error.
    fn read_frame<'b>(&self, peer: &Peer, reader: &mut Reader, body: &'b mut Vec<u8>, what: &str) -> Result<Frame<'b>> {
        let head = reader.read_header(false).map_err(|e| read_error(peer, &e, what, self.timeouts.io))?;
        let header = Header::decode(&head).map_err(|e| protocol_error(peer, &e))?;
        body.resize(header.len as usize, 0);
        reader.read_into(body, false).map_err(|e| read_error(peer, &e, what, self.timeouts.io))?;
        match Frame::decode_body(&header, body).map_err(|e| protocol_error(peer, &e))? {
            Frame::Failed(failure) => Err(failure_error(peer, &failure)),
            frame => Ok(frame),
        }
    }

    /// Returns the lengths of `peer`'s segments, connecting first if needed.
    fn segments<'p>(&self, peer: &'p Peer) -> Result<&'p [u64]> {
        if peer.segments.get().is_none() {
            drop(self.connection(peer)?);
        }
        peer.segments.get().map(Vec::as_slice).ok_or_else(|| Error::Transport {
            node: peer.node,
            reason: "no segment lengths after the handshake".into(),
            source: None,
        })
    }

    /// Posts a write and returns once its bytes are handed to the kernel;
    /// `quiet` waits for it to land and reports its failure. Out-of-bounds
    /// ranges fail here, before anything is sent.
    pub fn write_nbi(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()> {
        let peer = self.peer(node)?;
        let segment_len = self.segments(peer)?.first().copied().unwrap_or(0);
        check_bounds(node, offset, src.len() as u64, segment_len)?;
        let mut guard = self.connection(peer)?;
        let result = (|| {
            let conn = guard.as_mut().ok_or_else(|| broken(peer))?;
            for (i, chunk) in src.chunks(MAX_PAYLOAD as usize).enumerate() {
                let at = offset + (i * MAX_PAYLOAD as usize) as u64;
                let id = next_id(conn);
                let request = Request { frame: Frame::Write { segment: 0, offset: at, data: chunk }, response: 0 };
                self.issue(peer, conn, &request, Pending::Posted { id }, &mut [])?;
            }
            self.flush(peer, conn)
        })();
        self.count(node, src.len() as u64);
        self.settle(peer, &mut guard, result)
    }

    /// Drops the connection after a failure that left it out of step.
    fn settle<T>(&self, peer: &Peer, guard: &mut Option<Conn>, result: Result<T>) -> Result<T> {
        if result.is_err() {
            if let Some(conn) = guard.take() {
                if !conn.outstanding.is_empty() {
                    tracing::warn!(node = %self.me, peer = %peer.node, lost = conn.outstanding.len(), "dropping a connection with requests in flight");
                }
            }
        }
        result
    }

    /// Queues one request, first draining responses until it fits the window.
    fn issue(
        &self,
        peer: &Peer,
        conn: &mut Conn,
        request: &Request<'_>,
        pending: Pending,
        results: &mut [Result<u64>],
    ) -> Result<()> {
        let payload = match request.frame {
            Frame::Write { data, .. } => data,
            _ => &[],
        };
        let cost = (HEADER_LEN + 32 + payload.len()) as u64 + request.response;
        while !conn.outstanding.is_empty() && conn.inflight + cost > WINDOW_BYTES {
            self.flush(peer, conn)?;
            self.complete_one(peer, conn, results)?;
        }
        let id = match pending {
            Pending::Posted { id } | Pending::Slot { id, .. } => id,
        };
        request.frame.encode_head(id, &mut conn.out);
        if payload.len() <= INLINE_PAYLOAD {
            conn.out.extend_from_slice(payload);
        } else {
            // SAFETY: both buffers are borrowed for the call.
            unsafe {
                send_parts(&conn.stream, &[(conn.out.as_ptr(), conn.out.len()), (payload.as_ptr(), payload.len())])
            }
            .map_err(|e| send_error(peer, e))?;
            conn.out.clear();
        }
        conn.inflight += cost;
        conn.outstanding.push_back(match pending {
            Pending::Slot { id, slot, dst, len, .. } => Pending::Slot { id, slot, dst, len, cost },
            posted => posted,
        });
        Ok(())
    }

    fn flush(&self, peer: &Peer, conn: &mut Conn) -> Result<()> {
        if !conn.out.is_empty() {
            send_bytes(&conn.stream, &conn.out).map_err(|e| send_error(peer, e))?;
            conn.out.clear();
        }
        conn.last_used = Instant::now();
        Ok(())
    }

    /// Reads the oldest request's response and completes it.
    fn complete_one(&self, peer: &Peer, conn: &mut Conn, results: &mut [Result<u64>]) -> Result<()> {
        let Some(pending) = conn.outstanding.pop_front() else { return Ok(()) };
        let (id, cost) = match &pending {
            Pending::Posted { id } => (*id, (HEADER_LEN + 32) as u64),
            Pending::Slot { id, cost, .. } => (*id, *cost),
        };
        conn.inflight = conn.inflight.saturating_sub(cost);
        let head = conn.reader.read_header(false).map_err(|e| read_error(peer, &e, "a response", self.timeouts.io))?;
        let header = Header::decode(&head).map_err(|e| protocol_error(peer, &e))?;
        if header.id != id {
            return Err(Error::Transport {
                node: peer.node,
                reason: format!(
                    "{} responded to request {} where {id} was next; the connection is out of step",
                    peer.addr, header.id
                ),
                source: None,
            });
        }

        let outcome = match header.opcode {
            Opcode::Data => {
                let Pending::Slot { dst, len, .. } = pending else {
                    return Err(unexpected(peer, "data for a write"));
                };
                if header.len as usize != len {
                    return Err(unexpected(peer, "data of another length than requested"));
                }
                // SAFETY: `dst..dst + len` is the batch's read buffer, which
                // outlives this call (see `Pending`).
                unsafe { conn.reader.read_raw(dst, len, false) }
                    .map_err(|e| read_error(peer, &e, "read data", self.timeouts.io))?;
                Ok(0)
            }
            Opcode::Done | Opcode::Failed => {
                let mut body = [0u8; 32];
                let body = &mut body[..header.len as usize];
                conn.reader.read_into(body, false).map_err(|e| read_error(peer, &e, "a response", self.timeouts.io))?;
                match Frame::decode_body(&header, body).map_err(|e| protocol_error(peer, &e))? {
                    Frame::Done { value } => Ok(value),
                    Frame::Failed(failure) => Err(failure_error(peer, &failure)),
                    _ => return Err(unexpected(peer, "a response that is neither Done nor Failed")),
                }
            }
            _ => return Err(unexpected(peer, "a frame that is not a response")),
        };
        match pending {
            Pending::Posted { .. } => {
                if let Err(e) = outcome {
                    conn.deferred.push(e);
                }
            }
            Pending::Slot { slot, .. } => {
                if let Some(result) = results.get_mut(slot) {
                    if result.is_ok() {
                        *result = outcome;
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs a batch on one peer: issues every request, then completes them.
    fn run_on(
        &self,
        peer: &Peer,
        conn: &mut Conn,
        ops: &mut [(usize, &mut Op<'_>)],
        results: &mut [Result<u64>],
    ) -> Result<()> {
        for (slot, op) in ops.iter_mut() {
            let slot = *slot;
            match op {
                Op::Read { offset, dst, .. } => {
                    let base = dst.as_mut_ptr();
                    for (i, chunk) in dst.chunks_mut(MAX_PAYLOAD as usize).enumerate() {
                        let at = *offset + (i * MAX_PAYLOAD as usize) as u64;
                        let id = next_id(conn);
                        let len = chunk.len();
                        let request = Request {
                            frame: Frame::Read { segment: 0, offset: at, len: len as u32 },
                            response: len as u64,
                        };
                        // SAFETY: the chunk starts inside `dst`.
                        let dst = unsafe { base.add(i * MAX_PAYLOAD as usize) };
                        self.issue(peer, conn, &request, Pending::Slot { id, slot, dst, len, cost: 0 }, results)?;
                    }
                }
                Op::Write { offset, src, .. } => {
                    for (i, chunk) in src.chunks(MAX_PAYLOAD as usize).enumerate() {
                        let at = *offset + (i * MAX_PAYLOAD as usize) as u64;
                        let id = next_id(conn);
                        let request =
                            Request { frame: Frame::Write { segment: 0, offset: at, data: chunk }, response: 0 };
                        self.issue(
                            peer,
                            conn,
                            &request,
                            Pending::Slot { id, slot, dst: std::ptr::null_mut(), len: 0, cost: 0 },
                            results,
                        )?;
                    }
                }
                Op::FetchAdd { offset, value, .. } => {
                    let id = next_id(conn);
                    let request =
                        Request { frame: Frame::FetchAdd { segment: 0, offset: *offset, value: *value }, response: 0 };
                    self.issue(
                        peer,
                        conn,
                        &request,
                        Pending::Slot { id, slot, dst: std::ptr::null_mut(), len: 0, cost: 0 },
                        results,
                    )?;
                }
                Op::CompareExchange { offset, current, new, .. } => {
                    let id = next_id(conn);
                    let request = Request {
                        frame: Frame::CompareExchange { segment: 0, offset: *offset, current: *current, new: *new },
                        response: 0,
                    };
                    self.issue(
                        peer,
                        conn,
                        &request,
                        Pending::Slot { id, slot, dst: std::ptr::null_mut(), len: 0, cost: 0 },
                        results,
                    )?;
                }
            }
        }
        self.flush(peer, conn)?;
        while !conn.outstanding.is_empty() {
            self.complete_one(peer, conn, results)?;
        }
        Ok(())
    }

    fn single(&self, mut op: Op<'_>) -> Result<u64> {
        self.submit(std::slice::from_mut(&mut op)).pop().unwrap_or(Ok(0))
    }
}

fn next_id(conn: &mut Conn) -> u64 {
    let id = conn.next_id;
    conn.next_id = conn.next_id.wrapping_add(1);
    id
}

fn op_node(op: &Op<'_>) -> NodeId {
    match op {
        Op::Read { node, .. }
        | Op::Write { node, .. }
        | Op::FetchAdd { node, .. }
        | Op::CompareExchange { node, .. } => *node,
    }
}

/// Checks an operation against the segment lengths the peer announced.
fn check_op(op: &Op<'_>, segment_len: u64) -> Result<u64> {
    let node = op_node(op);
    match op {
        Op::Read { offset, dst, .. } => {
            check_bounds(node, *offset, dst.len() as u64, segment_len).map(|_| dst.len() as u64)
        }
        Op::Write { offset, src, .. } => {
            check_bounds(node, *offset, src.len() as u64, segment_len).map(|_| src.len() as u64)
        }
        Op::FetchAdd { offset, .. } | Op::CompareExchange { offset, .. } => {
            check_bounds(node, *offset, 8, segment_len)?;
            if offset % 8 != 0 {
                return Err(Error::UnalignedOffset { node, offset: *offset });
            }
            Ok(8)
        }
    }
}

fn broken(peer: &Peer) -> Error {
    Error::Transport { node: peer.node, reason: format!("the connection to {} is closed", peer.addr), source: None }
}

fn unexpected(peer: &Peer, what: &str) -> Error {
    Error::Transport {
        node: peer.node,
        reason: format!("{} sent {what}; the connection is out of step and was dropped", peer.addr),
        source: None,
    }
}

fn send_error(peer: &Peer, e: io::Error) -> Error {
    Error::Transport {
        node: peer.node,
        reason: format!("sending to node {} at {} failed; the node may have exited", peer.node, peer.addr),
        source: Some(e),
    }
}

#[cold]
fn read_error(peer: &Peer, e: &ReadFail, what: &str, timeout: Duration) -> Error {
    let reason = match e {
        ReadFail::Idle | ReadFail::Stalled { .. } => format!(
            "node {} at {} did not send {what} within {timeout:?} ({e}); the node may be hung or overloaded",
            peer.node, peer.addr
        ),
        ReadFail::Closed { .. } => format!(
            "node {} at {} closed the connection while {what} was expected ({e}); the node may have exited or rejected this one",
            peer.node, peer.addr
        ),
        ReadFail::Io(_) => format!("receiving {what} from node {} at {} failed", peer.node, peer.addr),
    };
    let source = match e {
        ReadFail::Io(e) => Some(io::Error::new(e.kind(), e.to_string())),
        _ => None,
    };
    Error::Transport { node: peer.node, reason, source }
}

#[cold]
fn protocol_error(peer: &Peer, e: &WireError) -> Error {
    Error::Transport {
        node: peer.node,
        reason: format!("node {} at {} sent a malformed frame: {e}", peer.node, peer.addr),
        source: None,
    }
}

/// Turns a server's rejection into the error the same check gives locally.
#[cold]
fn failure_error(peer: &Peer, failure: &Failure) -> Error {
    let node = peer.node;
    match failure.code {
        FailureCode::OutOfBounds => Error::OutOfBounds { node, offset: failure.offset, len: failure.len, segment_len: failure.limit },
        FailureCode::Unaligned => Error::UnalignedOffset { node, offset: failure.offset },
        FailureCode::AuthFailed => Error::Transport {
            node,
            reason: format!(
                "node {node} at {} rejected this node's proof of the group secret; start every node with the same {SECRET_ENV}",
                peer.addr
            ),
            source: None,
        },
        FailureCode::WrongNode => Error::Transport {
            node,
            reason: format!("{} is node {}, not node {node}; check the group's address list", peer.addr, failure.limit),
            source: None,
        },
        FailureCode::UnsupportedVersion => Error::Transport {
            node,
            reason: format!("node {node} at {} speaks protocol version {}; run the same meshmem release on every host", peer.addr, failure.limit),
            source: None,
        },
        code => Error::Transport {
            node,
            reason: format!(
                "node {node} at {} rejected a request: {code} (segment {}, offset {:#x}, {} bytes, limit {:#x})",
                peer.addr, failure.segment, failure.offset, failure.len, failure.limit
            ),
            source: None,
        },
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn local_node(&self) -> NodeId {
        self.me
    }

    fn segment_len(&self, node: NodeId) -> Result<u64> {
        let peer = self.peer(node)?;
        Ok(self.segments(peer)?.first().copied().unwrap_or(0))
    }

    fn read(&self, node: NodeId, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.single(Op::Read { node, offset, dst }).map(|_| ())
    }

    fn write(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()> {
        self.single(Op::Write { node, offset, src }).map(|_| ())
    }

    fn fetch_add_u64(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        self.single(Op::FetchAdd { node, offset, value })
    }

    fn compare_exchange_u64(&self, node: NodeId, offset: u64, current: u64, new: u64) -> Result<u64> {
        self.single(Op::CompareExchange { node, offset, current, new })
    }

    /// Waits until every posted write has its response, and returns the first
    /// failure among them (the others are logged).
    fn quiet(&self) -> Result<()> {
        let mut first = None;
        for peer in self.peers.iter().flatten() {
            let mut guard = peer.conn.lock();
            let Some(conn) = guard.as_mut() else { continue };
            let drained = (|| {
                self.flush(peer, conn)?;
                while !conn.outstanding.is_empty() {
                    self.complete_one(peer, conn, &mut [])?;
                }
                Ok(())
            })();
            let mut errors: Vec<Error> = std::mem::take(&mut conn.deferred);
            if let Err(e) = self.settle(peer, &mut guard, drained) {
                errors.insert(0, e);
            }
            for e in errors {
                if first.is_none() {
                    first = Some(e);
                } else {
                    tracing::warn!(node = %self.me, peer = %peer.node, error = %e, "posted write failed");
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn local_view(&self, _node: NodeId) -> Option<LocalView> {
        None
    }

    /// Issues the batch to every peer it names before reading any response,
    /// so the requests to one peer overlap with each other and with those to
    /// other peers.
    fn submit(&self, ops: &mut [Op<'_>]) -> Completion {
        let mut results: Vec<Result<u64>> = (0..ops.len()).map(|_| Ok(0)).collect();

        // Phase 1: check every operation locally and group it by peer.
        let mut by_peer: Vec<(NodeId, Vec<(usize, &mut Op<'_>)>)> = Vec::new();
        for (slot, op) in ops.iter_mut().enumerate() {
            let node = op_node(op);
            let checked = self.peer(node).and_then(|peer| {
                let len = self.segments(peer)?.first().copied().unwrap_or(0);
                check_op(op, len)
            });
            match checked {
                Ok(bytes) => {
                    self.count(node, bytes);
                    match by_peer.iter_mut().find(|(n, _)| *n == node) {
                        Some((_, list)) => list.push((slot, op)),
                        None => by_peer.push((node, vec![(slot, op)])),
                    }
                }
                Err(e) => results[slot] = Err(e),
            }
        }
        // Ascending node order is the lock order.
        by_peer.sort_by_key(|(node, _)| *node);

        // Phase 2: run each peer's share.
        // NOTE: peers are served one after another. Responses from one peer
        // are read before requests to the next are sent, so a batch that
        // spans peers overlaps only within each peer.
        for (node, mut list) in by_peer {
            let Ok(peer) = self.peer(node) else { continue };
            let outcome = self.connection(peer).and_then(|mut guard| {
                let result = match guard.as_mut() {
                    Some(conn) => self.run_on(peer, conn, &mut list, &mut results),
                    None => Err(broken(peer)),
                };
                self.settle(peer, &mut guard, result)
            });
            if let Err(e) = outcome {
                let reason = e.to_string();
                for (slot, _) in &list {
                    if results[*slot].is_ok() {
                        results[*slot] = Err(Error::Transport { node, reason: reason.clone(), source: None });
                    }
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = 1 << 16;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef-test".to_vec()).unwrap()
    }

    fn quick() -> Timeouts {
        Timeouts { io: Duration::from_millis(400), connect: Duration::from_millis(300) }
    }

    /// Starts a server for node 1 over a fresh segment and returns both.
    fn server() -> (TcpServer, Arc<Segment>) {
        let segment = Arc::new(Segment::create(NodeId(1), SEGMENT).unwrap());
        let mut config = ServerConfig::loopback(NodeId(1), secret(), vec![Served::segment(segment.clone())]);
        config.timeouts = quick();
        (TcpServer::start(config).unwrap(), segment)
    }

    fn client(addr: SocketAddr, secret: Secret) -> TcpTransport {
        TcpTransport::new(NodeId(0), secret, quick(), [(NodeId(1), addr)])
    }

    fn byte(segment: &Segment, offset: u64) -> u8 {
        // SAFETY: a byte inside the live mapping; tests read it while no
        // request is in flight.
        unsafe { *segment.as_ptr().add(offset as usize) }
    }

    /// A raw connection that has passed the handshake, to send frames the
    /// transport never would.
    struct Raw {
        stream: TcpStream,
        reader: Reader,
    }

    impl Raw {
        fn connect(addr: SocketAddr, secret: &Secret) -> Raw {
            let stream = TcpStream::connect(addr).unwrap();
            configure(&stream, quick()).unwrap();
            let mut raw = Raw { reader: Reader::new(stream.try_clone().unwrap()), stream };
            let client_nonce = [7u8; NONCE_LEN];
            raw.send(&Frame::Hello { client: 0, server: 1, nonce: client_nonce });
            let (_, body) = raw.recv().unwrap();
            let header = Header::decode(body[..HEADER_LEN].try_into().unwrap()).unwrap();
            let Frame::Challenge { nonce, .. } = Frame::decode_body(&header, &body[HEADER_LEN..]).unwrap() else {
                panic!()
            };
            let mac = secret.tag(CLIENT_LABEL, 0, 1, &client_nonce, &nonce);
            raw.send(&Frame::Auth { mac });
            raw
        }

        fn send(&mut self, frame: &Frame<'_>) {
            send_frame(&self.stream, frame, 5).unwrap();
        }

        /// Reads one frame and returns its opcode and raw bytes.
        fn recv(&mut self) -> std::result::Result<(Opcode, Vec<u8>), ReadFail> {
            let head = self.reader.read_header(false)?;
            let header = Header::decode(&head).unwrap();
            let mut bytes = head.to_vec();
            bytes.resize(HEADER_LEN + header.len as usize, 0);
            self.reader.read_into(&mut bytes[HEADER_LEN..], false)?;
            Ok((header.opcode, bytes))
        }

        fn failure(&mut self) -> Failure {
            let (opcode, bytes) = self.recv().unwrap();
            assert_eq!(opcode, Opcode::Failed);
            match Frame::decode(&bytes).unwrap().0 {
                Frame::Failed(failure) => failure,
                other => panic!("expected Failed, got {other:?}"),
            }
        }

        fn authenticated(addr: SocketAddr) -> Raw {
            let mut raw = Raw::connect(addr, &secret());
            assert_eq!(raw.recv().unwrap().0, Opcode::Welcome);
            raw
        }

        /// Waits (up to a few I/O timeouts) for the server to close.
        fn assert_closed(&mut self) {
            for _ in 0..5 {
                match self.recv() {
                    Err(ReadFail::Idle | ReadFail::Stalled { .. }) => continue,
                    outcome => {
                        assert!(matches!(outcome, Err(ReadFail::Closed { .. } | ReadFail::Io(_))), "{outcome:?}");
                        return;
                    }
                }
            }
            panic!("the server kept the connection open");
        }
    }

    /// Checks that the server still serves a well-behaved client.
    fn still_serves(addr: SocketAddr) {
        let t = client(addr, secret());
        t.write(NodeId(1), 64, &[9; 8]).unwrap();
        let mut back = [0u8; 8];
        t.read(NodeId(1), 64, &mut back).unwrap();
        assert_eq!(back, [9; 8]);
    }

    #[test]
    fn operations_round_trip() {
        let (server, _segment) = server();
        let t = client(server.local_addr(), secret());
        assert_eq!(t.segment_len(NodeId(1)).unwrap(), SEGMENT);
        t.write(NodeId(1), 100, b"hello").unwrap();
        let mut back = [0u8; 5];
        t.read(NodeId(1), 100, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(t.fetch_add_u64(NodeId(1), 8, 5).unwrap(), 0);
        assert_eq!(t.compare_exchange_u64(NodeId(1), 8, 5, 9).unwrap(), 5);
        assert_eq!(t.compare_exchange_u64(NodeId(1), 8, 5, 1).unwrap(), 9);
        t.quiet().unwrap();
    }

    #[test]
    fn transfers_larger_than_a_frame_are_split() {
        let len = MAX_PAYLOAD as usize * 2 + 12345;
        let segment = Arc::new(Segment::create(NodeId(1), len as u64 + 64).unwrap());
        let config = ServerConfig::loopback(NodeId(1), secret(), vec![Served::segment(segment.clone())]);
        let server = TcpServer::start(config).unwrap();
        let t = TcpTransport::new(NodeId(0), secret(), Timeouts::default(), [(NodeId(1), server.local_addr())]);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        t.write(NodeId(1), 64, &data).unwrap();
        let mut back = vec![0u8; len];
        t.read(NodeId(1), 64, &mut back).unwrap();
        assert!(back == data, "bytes differ after a split transfer");
    }

    #[test]
    fn batches_pipeline_and_report_each_outcome() {
        let (server, _segment) = server();
        let t = client(server.local_addr(), secret());
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        let mut ops = vec![
            Op::Write { node: NodeId(1), offset: 200, src: &[1, 2, 3, 4] },
            Op::Read { node: NodeId(1), offset: 200, dst: &mut a },
            Op::Read { node: NodeId(1), offset: SEGMENT - 2, dst: &mut b },
            Op::FetchAdd { node: NodeId(1), offset: 16, value: 3 },
            Op::FetchAdd { node: NodeId(1), offset: 16, value: 3 },
            Op::CompareExchange { node: NodeId(1), offset: 17, current: 0, new: 1 },
            Op::Read { node: NodeId(7), offset: 0, dst: &mut [] },
        ];
        let results = t.submit(&mut ops);
        drop(ops);
        assert_eq!(results[0].as_ref().unwrap(), &0);
        assert_eq!(a, [1, 2, 3, 4]);
        assert!(matches!(results[2], Err(Error::OutOfBounds { .. })), "{:?}", results[2]);
        assert_eq!((results[3].as_ref().unwrap(), results[4].as_ref().unwrap()), (&0, &3));
        assert!(matches!(results[5], Err(Error::UnalignedOffset { .. })), "{:?}", results[5]);
        assert!(results[6].as_ref().unwrap_err().to_string().contains("no TCP address"));

        let many: Vec<[u8; 8]> = (0..2000u64).map(|i| i.to_le_bytes()).collect();
        let mut ops: Vec<Op<'_>> = many
            .iter()
            .enumerate()
            .map(|(i, w)| Op::Write { node: NodeId(1), offset: 1024 + i as u64 * 8, src: w })
            .collect();
        assert!(t.submit(&mut ops).iter().all(Result::is_ok));
        let mut back = vec![0u8; 2000 * 8];
        t.read(NodeId(1), 1024, &mut back).unwrap();
        assert!(back.chunks(8).enumerate().all(|(i, w)| w == (i as u64).to_le_bytes()));
    }

    #[test]
    fn posted_writes_complete_by_quiet() {
        let (server, segment) = server();
        let t = client(server.local_addr(), secret());
        for i in 0..100u64 {
            t.write_nbi(NodeId(1), 512 + i, &[i as u8]).unwrap();
        }
        t.quiet().unwrap();
        assert_eq!(byte(&segment, 512 + 99), 99);
        assert!(matches!(t.write_nbi(NodeId(1), SEGMENT, &[1]), Err(Error::OutOfBounds { .. })));
    }

    #[test]
    fn handshake_rejects_wrong_secret_both_ways() {
        let (server, _segment) = server();
        let other = Secret::new(b"another secret, 16+ bytes".to_vec()).unwrap();
        let err = client(server.local_addr(), other.clone()).read(NodeId(1), 0, &mut [0; 8]).unwrap_err();
        assert!(err.to_string().contains("did not prove the group secret"), "{err}");

        // A client that ignores the server's proof still cannot get in.
        let mut raw = Raw::connect(server.local_addr(), &other);
        assert_eq!(raw.failure().code, FailureCode::AuthFailed);
        raw.assert_closed();
        still_serves(server.local_addr());
    }

    #[test]
    fn secret_debug_hides_bytes() {
        let s = secret();
        assert!(!format!("{s:?}").contains("0123"));
        assert!(Secret::new(b"short".to_vec()).unwrap_err().to_string().contains("at least 16 bytes"));
        assert_eq!(s.to_hex().len(), 2 * 21);
    }

    #[test]
    fn server_rejects_out_of_bounds_requests() {
        let (server, segment) = server();
        let mut raw = Raw::authenticated(server.local_addr());
        raw.send(&Frame::Read { segment: 0, offset: SEGMENT - 4, len: 8 });
        let failure = raw.failure();
        assert_eq!(
            (failure.code, failure.offset, failure.len, failure.limit),
            (FailureCode::OutOfBounds, SEGMENT - 4, 8, SEGMENT)
        );
        raw.send(&Frame::Write { segment: 0, offset: u64::MAX - 1, data: &[0xaa; 4] });
        assert_eq!(raw.failure().code, FailureCode::OutOfBounds);
        raw.send(&Frame::Write { segment: 0, offset: SEGMENT - 2, data: &[0xaa; 4] });
        assert_eq!(raw.failure().code, FailureCode::OutOfBounds);
        raw.send(&Frame::Write { segment: 3, offset: 0, data: &[0xaa; 4] });
        assert_eq!(raw.failure().code, FailureCode::NoSuchSegment);
        raw.send(&Frame::FetchAdd { segment: 0, offset: 4, value: 1 });
        assert_eq!(raw.failure().code, FailureCode::Unaligned);
        assert_eq!(byte(&segment, SEGMENT - 2), 0, "a rejected write changed the segment");

        // The connection stays usable after rejections.
        raw.send(&Frame::Write { segment: 0, offset: 8, data: &[1; 8] });
        assert_eq!(raw.recv().unwrap().0, Opcode::Done);
    }

    #[test]
    fn server_closes_only_malformed_connections() {
        let (server, _segment) = server();
        let addr = server.local_addr();
        let header = |len: u32, version: u8, opcode: u8| {
            let mut h = Header { len, opcode: Opcode::Read, id: 3 }.encode();
            h[4] = version;
            h[5] = opcode;
            h
        };

        let mut raw = Raw::authenticated(addr);
        send_bytes(&raw.stream, &header(u32::MAX, 1, Opcode::Write as u8)).unwrap();
        let failure = raw.failure();
        assert_eq!((failure.code, failure.limit), (FailureCode::TooLong, super::super::wire::MAX_BODY as u64));
        raw.assert_closed();

        let mut raw = Raw::authenticated(addr);
        send_bytes(&raw.stream, &header(16, 9, Opcode::Read as u8)).unwrap();
        assert_eq!(raw.failure().code, FailureCode::UnsupportedVersion);
        raw.assert_closed();

        let mut raw = Raw::authenticated(addr);
        send_bytes(&raw.stream, &header(16, 1, 0x7e)).unwrap();
        assert_eq!(raw.failure().code, FailureCode::UnknownOpcode);
        raw.assert_closed();

        let mut raw = Raw::authenticated(addr);
        raw.send(&Frame::Done { value: 1 });
        assert_eq!(raw.failure().code, FailureCode::UnknownOpcode);
        raw.assert_closed();

        // A frame cut short, then silence: dropped after the I/O timeout.
        let mut raw = Raw::authenticated(addr);
        let mut frame = Vec::new();
        Frame::Write { segment: 0, offset: 0, data: &[1; 100] }.encode(1, &mut frame);
        send_bytes(&raw.stream, &frame[..40]).unwrap();
        raw.assert_closed();

        // A frame cut short by a close.
        let raw = Raw::authenticated(addr);
        send_bytes(&raw.stream, &frame[..10]).unwrap();
        drop(raw);

        still_serves(addr);
    }

    /// Accepts one connection, runs the real handshake, then hands the
    /// connection to `then`.
    fn fake_server(then: impl FnOnce(TcpStream, Reader) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let shared = ServerShared {
                node: NodeId(1),
                secret: secret(),
                segments: vec![Served::segment(Arc::new(Segment::create(NodeId(1), 4096).unwrap()))],
                timeouts: quick(),
                stop: AtomicBool::new(false),
                connections: Mutex::new(HashMap::new()),
                workers: Mutex::new(Vec::new()),
            };
            let (stream, _) = listener.accept().unwrap();
            configure(&stream, quick()).unwrap();
            let mut reader = Reader::new(stream.try_clone().unwrap());
            handshake_server(&shared, &stream, &mut reader, "test").unwrap();
            then(stream, reader);
        });
        (addr, handle)
    }

    #[test]
    fn client_times_out_on_silent_peer() {
        let (addr, handle) = fake_server(|stream, mut reader| {
            let _ = reader.read_header(false);
            std::thread::sleep(Duration::from_millis(900));
            drop(stream);
        });
        let t = client(addr, secret());
        let started = Instant::now();
        let err = t.fetch_add_u64(NodeId(1), 0, 1).unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(850), "took {:?}", started.elapsed());
        let text = err.to_string();
        assert!(text.contains("node 1"), "{text}");
        assert!(text.contains("did not send a response within"), "{text}");
        handle.join().unwrap();
    }

    #[test]
    fn client_reports_close_mid_request() {
        let (addr, handle) = fake_server(|stream, mut reader| {
            let _ = reader.read_header(false);
            drop(stream);
        });
        let t = client(addr, secret());
        let err = t.read(NodeId(1), 0, &mut [0; 8]).unwrap_err();
        assert!(err.to_string().contains("closed the connection"), "{err}");
        handle.join().unwrap();
    }

    #[test]
    fn client_names_unreachable_peer() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let t = client(port, secret());
        let err = t.read(NodeId(1), 0, &mut [0; 8]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("cannot connect to node 1 at {port}")), "{text}");
        assert!(text.contains("attempts"), "{text}");
    }

    #[test]
    fn client_reconnects_to_restarted_server() {
        let (server, _segment) = server();
        let addr = server.local_addr();
        let t = client(addr, secret());
        t.write(NodeId(1), 0, &[1; 8]).unwrap();
        drop(server);

        let segment = Arc::new(Segment::create(NodeId(1), SEGMENT).unwrap());
        let mut config = ServerConfig::loopback(NodeId(1), secret(), vec![Served::segment(segment)]);
        config.bind = addr;
        let _server = TcpServer::start(config).unwrap();
        std::thread::sleep(STALE_AFTER + Duration::from_millis(50));
        let mut back = [9u8; 8];
        t.read(NodeId(1), 0, &mut back).unwrap();
        assert_eq!(back, [0; 8]);
    }

    #[test]
    fn server_reports_taken_port() {
        let (server, _segment) = server();
        let mut config = ServerConfig::loopback(NodeId(1), secret(), vec![]);
        config.bind = server.local_addr();
        let err = TcpServer::start(config).unwrap_err();
        assert!(err.to_string().contains(&format!("cannot listen on {}", server.local_addr())), "{err}");
    }

    #[test]
    fn server_rejects_wrong_node() {
        let (server, _segment) = server();
        let t = TcpTransport::new(NodeId(0), secret(), quick(), [(NodeId(2), server.local_addr())]);
        let err = t.read(NodeId(2), 0, &mut [0; 8]).unwrap_err();
        assert!(err.to_string().contains("is node 1, not node 2"), "{err}");
    }
}
