//! The rendezvous of a group on one host, and the control channel that
//! carries its collectives afterwards.
//!
//! Node 0 listens on an abstract Unix-domain socket named after the group id
//! (abstract names vanish with the socket, so a crashed run leaves nothing
//! behind). Every other node connects and the join runs in four steps:
//!
//! 1. The peer sends its segment's file descriptor (`SCM_RIGHTS`) and a
//!    `Hello` with its rank and its view of the geometry. Node 0 checks the
//!    peer's user with `SO_PEERCRED` and every field against its own.
//! 2. Once all peers are in, node 0 reserves the window and sends each peer a
//!    `Welcome` with the window base and every node's segment descriptor.
//! 3. Each peer maps the window at that base and answers with an `Ack`,
//!    carrying its error if it could not.
//! 4. Node 0 sends `Go` when every peer acknowledged, or the first failure to
//!    all, so every node returns the same outcome from `join`.
//!
//! The connections stay open as a star around node 0; collectives (barrier,
//! broadcast, all-gather) are gathered at node 0 and answered to all. A
//! closed connection is a node that left or died, and fails the collective
//! with the node's id. A group that spans hosts runs the same star over the
//! authenticated TCP connections of its rendezvous at node 0
//! ([`Group::over_tcp`]).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::topology::NodeId;

/// The geometry a node joins with; node 0 checks every field of every peer
/// against its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub rank: u16,
    pub size: u16,
    pub mesh: String,
    pub page_size: u64,
    pub window_size: u64,
    pub segment_len: u64,
    pub pid: u32,
}

impl Hello {
    /// Describes this process's node of a group with `resolved`'s geometry
    /// and a segment of `segment_len` bytes.
    pub(crate) fn new(resolved: &crate::config::Resolved, segment_len: u64) -> Hello {
        Hello {
            protocol: PROTOCOL,
            rank: resolved.rank,
            size: resolved.size,
            mesh: resolved.mesh.to_string(),
            page_size: resolved.page_size,
            window_size: resolved.window_size,
            segment_len,
            pid: std::process::id(),
        }
    }
}

/// Version of the handshake messages.
pub const PROTOCOL: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Hello(Hello),
    Welcome { window_base: u64, pids: Vec<u32> },
    Reject { reason: String },
    Ack { error: Option<String> },
    Go,
}

/// Largest control frame accepted; larger lengths mean a corrupt stream.
const MAX_FRAME: u64 = 1 << 30;

/// Most file descriptors sent in one message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;

/// What a completed join returns.
pub struct Joined {
    pub group: Group,
    pub window_base: u64,
    /// Every node's segment, by rank; `None` at this node's own rank.
    pub segments: Vec<Option<OwnedFd>>,
    pub pids: Vec<u32>,
}

/// The open control connections of a group.
pub struct Group {
    name: String,
    rank: u16,
    size: u16,
    /// At node 0 the stream to each peer (index = rank, `None` at 0); at a
    /// peer the single stream to node 0, at index 0.
    streams: Mutex<(u64, Vec<Option<Link>>)>,
}

/// One connection of the collectives' star.
enum Link {
    /// Between processes of one host.
    Unix(UnixStream),
    /// Between hosts, authenticated by the rendezvous that opened it.
    Tcp(TcpStream),
}

impl Read for &Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Unix(s) => (&*s).read(buf),
            Link::Tcp(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Unix(s) => (&*s).write(buf),
            Link::Tcp(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn unix_links(streams: Vec<Option<UnixStream>>) -> Vec<Option<Link>> {
    streams.into_iter().map(|s| s.map(Link::Unix)).collect()
}

fn socket_name(group: &str) -> Vec<u8> {
    format!("meshmem/{group}").into_bytes()
}

fn join_error(group: &str, reason: impl Into<String>, source: Option<io::Error>) -> Error {
    Error::Join { group: group.to_string(), reason: reason.into(), source }
}

/// Joins `group` as `hello.rank`, offering `segment`. `reserve_window` is
/// called with `None` at node 0, which returns the base it reserved, and
/// with node 0's base at every peer, which must reserve exactly that.
pub fn join(
    group: &str,
    hello: &Hello,
    segment: BorrowedFd<'_>,
    timeout: Duration,
    reserve_window: impl FnOnce(Option<u64>) -> Result<u64>,
) -> Result<Joined> {
    if hello.rank == 0 {
        serve(group, hello, segment, timeout, reserve_window)
    } else {
        connect(group, hello, segment, timeout, reserve_window)
    }
}

fn serve(
    group: &str,
    hello: &Hello,
    segment: BorrowedFd<'_>,
    timeout: Duration,
    reserve_window: impl FnOnce(Option<u64>) -> Result<u64>,
) -> Result<Joined> {
    let size = hello.size as usize;
    let mut streams: Vec<Option<UnixStream>> = (0..size).map(|_| None).collect();
    let mut segments: Vec<Option<OwnedFd>> = (0..size).map(|_| None).collect();
    let mut pids = vec![0u32; size];
    pids[0] = hello.pid;

    if size > 1 {
        let listener = listen(group)?;
        let deadline = Instant::now() + timeout;

        // Step 1: take every peer's hello and segment.
        let mut joined = 1;
        while joined < size {
            let stream = match accept_until(&listener, deadline) {
                Ok(stream) => stream,
                Err(e) => {
                    let missing: Vec<String> =
                        (1..size).filter(|&r| streams[r].is_none()).map(|r| r.to_string()).collect();
                    let reason = format!(
                        "timed out after {:?} waiting for nodes {} to connect; start one process per node with the same MESHMEM_GROUP",
                        timeout,
                        missing.join(", ")
                    );
                    reject_all(&mut streams, &reason);
                    return Err(join_error(group, reason, Some(e)));
                }
            };
            stream.set_read_timeout(Some(timeout)).ok();
            match admit(group, hello, &stream) {
                Ok((peer, fd)) => {
                    let rank = peer.rank as usize;
                    if streams[rank].is_some() {
                        let reason = format!("two processes joined as node {rank}; give each process its own RANK");
                        send_message(&stream, &Message::Reject { reason: reason.clone() }).ok();
                        reject_all(&mut streams, &reason);
                        reject_latecomers(&listener, size - joined - 1, deadline, &reason);
                        return Err(join_error(group, reason, None));
                    }
                    pids[rank] = peer.pid;
                    segments[rank] = Some(fd);
                    streams[rank] = Some(stream);
                    joined += 1;
                }
                Err(e) => {
                    let reason = e.to_string();
                    send_message(&stream, &Message::Reject { reason: reason.clone() }).ok();
                    reject_all(&mut streams, &reason);
                    let waiting = size - joined - 1;
                    reject_latecomers(&listener, waiting, deadline, &reason);
                    return Err(e);
                }
            }
        }
    }

    // Step 2: reserve the window and welcome every peer.
    let window_base = match reserve_window(None) {
        Ok(base) => base,
        Err(e) => {
            reject_all(&mut streams, &e.to_string());
            return Err(e);
        }
    };
    for rank in 1..size {
        let stream = streams[rank].as_ref().expect("every peer joined");
        let fds: Vec<RawFd> = (0..size)
            .filter(|&r| r != rank)
            .map(|r| match &segments[r] {
                Some(fd) => fd.as_raw_fd(),
                None => segment.as_raw_fd(),
            })
            .collect();
        let welcome = Message::Welcome { window_base, pids: pids.clone() };
        send_message(stream, &welcome)
            .and_then(|_| send_fds(stream, &fds))
            .map_err(|e| join_error(group, format!("sending the welcome to node {rank} failed"), Some(e)))?;
    }

    // Step 3: collect the acknowledgements.
    let mut failure = None;
    for rank in 1..size {
        let stream = streams[rank].as_ref().expect("every peer joined");
        match recv_message(stream) {
            Ok(Message::Ack { error: None }) => {}
            Ok(Message::Ack { error: Some(error) }) => {
                failure.get_or_insert(format!("node {rank} could not join: {error}"));
            }
            Ok(other) => {
                failure.get_or_insert(format!("node {rank} sent {other:?} instead of an acknowledgement"));
            }
            Err(e) => {
                failure.get_or_insert(format!("node {rank} did not acknowledge the welcome: {e}"));
            }
        }
    }

    // Step 4: tell everyone the outcome.
    if let Some(reason) = failure {
        reject_all(&mut streams, &reason);
        return Err(join_error(group, reason, None));
    }
    for stream in streams.iter().flatten() {
        send_message(stream, &Message::Go)
            .map_err(|e| join_error(group, "sending the go-ahead failed", Some(e)))?;
        stream.set_read_timeout(None).ok();
    }
    Ok(Joined {
        group: Group { name: group.to_string(), rank: 0, size: size as u16, streams: Mutex::new((0, unix_links(streams))) },
        window_base,
        segments,
        pids,
    })
}

/// Checks a connecting peer and takes its hello and segment.
fn admit(group: &str, ours: &Hello, stream: &UnixStream) -> Result<(Hello, OwnedFd)> {
    let credentials = socket::getsockopt(stream, socket::sockopt::PeerCredentials)
        .map_err(|e| join_error(group, "reading the peer's credentials (SO_PEERCRED) failed", Some(e.into())))?;
    let uid = nix::unistd::getuid().as_raw();
    if credentials.uid() != uid {
        return Err(join_error(
            group,
            format!(
                "process {} of user {} tried to join a group of user {uid}; only the same user may join",
                credentials.pid(),
                credentials.uid()
            ),
            None,
        ));
    }

    let mut fds = recv_fds(stream, 1)
        .map_err(|e| join_error(group, "receiving a peer's segment failed", Some(e)))?;
    let hello = match recv_message(stream) {
        Ok(Message::Hello(hello)) => hello,
        Ok(other) => return Err(join_error(group, format!("expected a hello, got {other:?}"), None)),
        Err(e) => return Err(join_error(group, "receiving a peer's hello failed", Some(e))),
    };
    let fd = fds.pop().ok_or_else(|| join_error(group, format!("node {} sent no segment", hello.rank), None))?;
    check_hello(ours, &hello)?;
    Ok((hello, fd))
}

/// Compares a peer's hello field by field with node 0's.
pub fn check_hello(ours: &Hello, theirs: &Hello) -> Result<()> {
    let node = NodeId(theirs.rank);
    let mismatch = |field: &'static str, expected: String, found: String| {
        Err(Error::ConfigMismatch { node, field, expected, found })
    };
    if theirs.protocol != ours.protocol {
        return mismatch("protocol version", ours.protocol.to_string(), theirs.protocol.to_string());
    }
    if theirs.size != ours.size {
        return mismatch("group size", ours.size.to_string(), theirs.size.to_string());
    }
    if theirs.rank == 0 || theirs.rank >= ours.size {
        return mismatch("rank", format!("1 to {}", ours.size - 1), theirs.rank.to_string());
    }
    if theirs.mesh != ours.mesh {
        return mismatch("mesh", ours.mesh.clone(), theirs.mesh.clone());
    }
    if theirs.page_size != ours.page_size {
        return mismatch("page size", ours.page_size.to_string(), theirs.page_size.to_string());
    }
    if theirs.window_size != ours.window_size {
        return mismatch("window size", ours.window_size.to_string(), theirs.window_size.to_string());
    }
    if theirs.segment_len != ours.segment_len {
        return mismatch("node capacity (segment length)", ours.segment_len.to_string(), theirs.segment_len.to_string());
    }
    Ok(())
}

/// Tells up to `count` nodes that have yet to connect why the join failed,
/// so that every node reports the same reason. Waits a few seconds at most.
fn reject_latecomers(listener: &OwnedFd, count: usize, deadline: Instant, reason: &str) {
    let deadline = deadline.min(Instant::now() + Duration::from_secs(5));
    for _ in 0..count {
        match accept_until(listener, deadline) {
            Ok(stream) => {
                // Take its hello first, so that it is reading when the
                // rejection arrives rather than writing into a closed socket.
                stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
                let _ = recv_fds(&stream, 1).and_then(|_| recv_message(&stream));
                send_message(&stream, &Message::Reject { reason: reason.to_string() }).ok();
            }
            Err(_) => return,
        }
    }
}

fn reject_all(streams: &mut [Option<UnixStream>], reason: &str) {
    for stream in streams.iter().flatten() {
        // The peer may be gone already; its own join then fails on the
        // closed connection, which is the outcome we want.
        send_message(stream, &Message::Reject { reason: reason.to_string() }).ok();
    }
}

fn connect(
    group: &str,
    hello: &Hello,
    segment: BorrowedFd<'_>,
    timeout: Duration,
    reserve_window: impl FnOnce(Option<u64>) -> Result<u64>,
) -> Result<Joined> {
    let deadline = Instant::now() + timeout;
    let stream = connect_until(group, deadline, timeout)?;
    stream.set_read_timeout(Some(timeout)).ok();
    let rank = hello.rank as usize;
    let size = hello.size as usize;
    let fail = |reason: String, source: Option<io::Error>| join_error(group, reason, source);

    // Step 1: offer our segment and geometry.
    send_fds(&stream, &[segment.as_raw_fd()])
        .and_then(|_| send_message(&stream, &Message::Hello(hello.clone())))
        .map_err(|e| fail("sending the hello to node 0 failed".into(), Some(e)))?;

    // Step 2: wait for the welcome and the other nodes' segments.
    let (window_base, pids) = match recv_message(&stream) {
        Ok(Message::Welcome { window_base, pids }) => (window_base, pids),
        Ok(Message::Reject { reason }) => return Err(fail(format!("node 0 rejected the join: {reason}"), None)),
        Ok(other) => return Err(fail(format!("expected a welcome, got {other:?}"), None)),
        Err(e) => return Err(fail("node 0 closed the connection before welcoming this node".into(), Some(e))),
    };
    let fds = recv_fds(&stream, size - 1).map_err(|e| fail("receiving the segments failed".into(), Some(e)))?;
    if fds.len() != size - 1 {
        return Err(fail(format!("node 0 sent {} segments, expected {}", fds.len(), size - 1), None));
    }
    let mut others = fds.into_iter();
    let segments: Vec<Option<OwnedFd>> =
        (0..size).map(|r| if r == rank { None } else { others.next() }).collect();

    // Step 3: reserve the window where node 0 put it, and report back.
    let reserved = reserve_window(Some(window_base));
    let ack = Message::Ack { error: reserved.as_ref().err().map(|e| e.to_string()) };
    send_message(&stream, &ack).map_err(|e| fail("acknowledging the welcome failed".into(), Some(e)))?;
    reserved?;

    // Step 4: wait for every other node.
    match recv_message(&stream) {
        Ok(Message::Go) => {}
        Ok(Message::Reject { reason }) => return Err(fail(reason, None)),
        Ok(other) => return Err(fail(format!("expected the go-ahead, got {other:?}"), None)),
        Err(e) => return Err(fail("node 0 closed the connection before the go-ahead".into(), Some(e))),
    }
    stream.set_read_timeout(None).ok();
    let mut streams: Vec<Option<UnixStream>> = (0..size).map(|_| None).collect();
    streams[0] = Some(stream);
    Ok(Joined {
        group: Group {
            name: group.to_string(),
            rank: hello.rank,
            size: hello.size,
            streams: Mutex::new((0, unix_links(streams))),
        },
        window_base,
        segments,
        pids,
    })
}

fn listen(group: &str) -> Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| join_error(group, "creating the rendezvous socket failed", Some(e.into())))?;
    let addr = UnixAddr::new_abstract(&socket_name(group))
        .map_err(|e| join_error(group, "the group id is too long for a socket name", Some(e.into())))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| {
        let reason = if e == nix::errno::Errno::EADDRINUSE {
            "another group with this id is running on this host; give this run its own MESHMEM_GROUP".to_string()
        } else {
            "binding the rendezvous socket failed".to_string()
        };
        join_error(group, reason, Some(e.into()))
    })?;
    socket::listen(&fd, socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN))
        .map_err(|e| join_error(group, "listening on the rendezvous socket failed", Some(e.into())))?;
    Ok(fd)
}

fn accept_until(listener: &OwnedFd, deadline: Instant) -> io::Result<UnixStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        let mut poll = [nix::poll::PollFd::new(listener_fd(listener), nix::poll::PollFlags::POLLIN)];
        let wait = nix::poll::PollTimeout::try_from(left.min(Duration::from_millis(1000))).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut poll, wait) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn listener_fd(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

fn connect_until(group: &str, deadline: Instant, timeout: Duration) -> Result<UnixStream> {
    let addr = UnixAddr::new_abstract(&socket_name(group))
        .map_err(|e| join_error(group, "the group id is too long for a socket name", Some(e.into())))?;
    loop {
        let fd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| join_error(group, "creating a socket failed", Some(e.into())))?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT | nix::errno::Errno::EAGAIN)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(join_error(
                    group,
                    format!("node 0 did not accept a connection within {timeout:?}; is node 0 running with the same MESHMEM_GROUP?"),
                    Some(e.into()),
                ))
            }
        }
    }
}

fn send_fds(stream: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let chunks: Vec<&[RawFd]> = if fds.is_empty() { vec![&[][..]] } else { fds.chunks(FDS_PER_MESSAGE).collect() };
    for chunk in chunks {
        let count = [chunk.len() as u8];
        let iov = [IoSlice::new(&count)];
        let cmsgs = if chunk.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(chunk)] };
        socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    }
    Ok(())
}

fn recv_fds(stream: &UnixStream, expected: usize) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::with_capacity(expected);
    loop {
        let mut count = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut count)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let msg = socket::recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        if msg.bytes == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel installed these descriptors for us; we are
                // their only owner.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let sent = count[0] as usize;
        if sent < FDS_PER_MESSAGE || fds.len() >= expected {
            return Ok(fds);
        }
    }
}

fn send_frame(mut stream: impl Write, payload: &[u8]) -> io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    stream.write_all(&len)?;
    stream.write_all(payload)
}

fn recv_frame(mut stream: impl Read) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control frame of {len} bytes exceeds the limit of {MAX_FRAME}"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

fn send_message(stream: &UnixStream, message: &Message) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    send_frame(stream, &bytes)
}

fn recv_message(stream: &UnixStream) -> io::Result<Message> {
    let bytes = recv_frame(stream)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl Group {
    /// Runs the collectives of `name` over TCP connections that the caller
    /// opened and authenticated: at node 0 one per peer (index = rank,
    /// `None` at 0), at a peer the one to node 0, at index 0.
    pub fn over_tcp(name: &str, rank: u16, size: u16, streams: Vec<Option<TcpStream>>) -> Group {
        for stream in streams.iter().flatten() {
            // Collectives are small request-reply exchanges; Nagle's delay
            // would add to every one. Failing to set it only costs latency.
            stream.set_nodelay(true).ok();
            stream.set_read_timeout(None).ok();
        }
        let streams = streams.into_iter().map(|s| s.map(Link::Tcp)).collect();
        Group { name: name.to_string(), rank, size, streams: Mutex::new((0, streams)) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gathers `data` from every node at every node, in rank order. Every
    /// node must call the same collectives in the same order.
    pub fn all_gather(&self, op: &'static str, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut guard = self.streams.lock();
        let (seq, streams) = &mut *guard;
        *seq += 1;
        let fail = |reason: String, source: Option<io::Error>| Error::Collective { op, reason, source };
        let mut request = Vec::with_capacity(data.len() + 16 + op.len());
        request.extend_from_slice(&seq.to_le_bytes());
        request.push(op.len() as u8);
        request.extend_from_slice(op.as_bytes());
        request.extend_from_slice(data);

        if self.size == 1 {
            return Ok(vec![data.to_vec()]);
        }

        if self.rank != 0 {
            let stream = streams[0].as_ref().expect("a peer keeps its stream to node 0");
            send_frame(stream, &request).map_err(|e| fail("node 0 is unreachable; it left or died".into(), Some(e)))?;
            let reply = recv_frame(stream).map_err(|e| fail("node 0 closed the connection; it left or died".into(), Some(e)))?;
            return decode_reply(&reply).map_err(|reason| fail(reason, None));
        }

        let mut parts = vec![data.to_vec()];
        let mut failure: Option<String> = None;
        for rank in 1..self.size as usize {
            let stream = streams[rank].as_ref().expect("node 0 keeps a stream to every peer");
            match recv_frame(stream) {
                Ok(frame) => match split_request(&frame) {
                    Some((their_seq, their_op, payload)) if their_seq == *seq && their_op == op.as_bytes() => {
                        parts.push(payload.to_vec())
                    }
                    Some((their_seq, their_op, _)) => {
                        failure.get_or_insert(format!(
                            "node {rank} called `{}` as collective {their_seq} while node 0 called `{op}` as collective {seq}; every node must call the same collectives in the same order",
                            String::from_utf8_lossy(their_op)
                        ));
                        parts.push(Vec::new());
                    }
                    None => {
                        failure.get_or_insert(format!("node {rank} sent a malformed collective request"));
                        parts.push(Vec::new());
                    }
                },
                Err(e) => {
                    failure.get_or_insert(format!("node {rank} closed the connection; it left or died ({e})"));
                    parts.push(Vec::new());
                }
            }
        }

        let reply = match &failure {
            None => encode_reply(&parts),
            Some(reason) => {
                let mut reply = u64::MAX.to_le_bytes().to_vec();
                reply.extend_from_slice(reason.as_bytes());
                reply
            }
        };
        for stream in streams.iter().flatten() {
            // A peer that died is already named in `failure`.
            send_frame(stream, &reply).ok();
        }
        match failure {
            Some(reason) => Err(fail(reason, None)),
            None => Ok(parts),
        }
    }
}

fn split_request(frame: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let seq = u64::from_le_bytes(frame.get(..8)?.try_into().ok()?);
    let op_len = *frame.get(8)? as usize;
    let op = frame.get(9..9 + op_len)?;
    Some((seq, op, frame.get(9 + op_len..)?))
}

fn encode_reply(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut reply = (parts.len() as u64).to_le_bytes().to_vec();
    for part in parts {
        reply.extend_from_slice(&(part.len() as u64).to_le_bytes());
        reply.extend_from_slice(part);
    }
    reply
}

fn decode_reply(reply: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let malformed = || "node 0 sent a malformed collective reply".to_string();
    let count = u64::from_le_bytes(reply.get(..8).ok_or_else(malformed)?.try_into().unwrap());
    if count == u64::MAX {
        return Err(String::from_utf8_lossy(&reply[8..]).into_owned());
    }
    let mut parts = Vec::new();
    let mut at = 8usize;
    for _ in 0..count {
        let len = u64::from_le_bytes(reply.get(at..at + 8).ok_or_else(malformed)?.try_into().unwrap()) as usize;
        at += 8;
        parts.push(reply.get(at..at.checked_add(len).ok_or_else(malformed)?).ok_or_else(malformed)?.to_vec());
        at += len;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(rank: u16) -> Hello {
        Hello {
            protocol: PROTOCOL,
            rank,
            size: 4,
            mesh: "2x2x1".into(),
            page_size: 4096,
            window_size: 1 << 30,
            segment_len: 1 << 20,
            pid: 1,
        }
    }

    #[test]
    fn mismatched_fields_are_named() {
        let ours = hello(0);
        let mut theirs = hello(2);
        assert!(check_hello(&ours, &theirs).is_ok());
        theirs.page_size = 8192;
        let err = check_hello(&ours, &theirs).unwrap_err().to_string();
        assert!(err.contains("page size") && err.contains("4096") && err.contains("8192"), "{err}");
        let mut theirs = hello(2);
        theirs.mesh = "4x1x1".into();
        let err = check_hello(&ours, &theirs).unwrap_err().to_string();
        assert!(err.contains("mesh") && err.contains("4x1x1") && err.contains("node 2"), "{err}");
    }

    #[test]
    fn reply_round_trips() {
        let parts = vec![b"a".to_vec(), Vec::new(), b"xyz".to_vec()];
        assert_eq!(decode_reply(&encode_reply(&parts)).unwrap(), parts);
        assert!(decode_reply(&[1, 0]).is_err());
        let mut truncated = encode_reply(&parts);
        truncated.pop();
        assert!(decode_reply(&truncated).is_err());
    }
}
