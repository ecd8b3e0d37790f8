//! Backends that carry bytes and atomics to `(node, segment offset)`.
//!
//! Every backend offers the same one-sided operation set, modelled on
//! OpenSHMEM: `read`, `write`, `fetch_add_u64`, `compare_exchange_u64`,
//! batched submission, and `quiet`, which returns once every operation this
//! node issued is complete and visible to every other node. A backend that
//! can map a node's segment into this process also returns a [`LocalView`],
//! which turns remote access into plain loads and stores.
//!
//! Backends check every offset and length against the destination's segment
//! and every atomic's alignment, and report a violation as an error naming the
//! node, offset, length and segment size. They count every operation by
//! destination in the sender's segment header, where `Pool::stats` reads it.

#[cfg(feature = "tcp")]
pub mod hosts;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod rendezvous;
pub mod select;
pub mod shm;
#[cfg(feature = "tcp")]
pub mod tcp;
pub mod wire;

use std::fmt;

use crate::error::{Error, Result};
use crate::topology::NodeId;

/// Which backend carries a pair's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// Shared memory between processes of one host.
    Shm,
    /// One-sided operations emulated over TCP between hosts.
    Tcp,
    /// ibverbs RC queue pairs between hosts with RDMA devices.
    Rdma,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportKind::Shm => f.write_str("shm"),
            TransportKind::Tcp => f.write_str("tcp"),
            TransportKind::Rdma => f.write_str("rdma"),
        }
    }
}

/// A node's segment mapped into this process.
#[derive(Clone, Copy, Debug)]
pub struct LocalView {
    pub ptr: *mut u8,
    pub len: u64,
}

/// One operation of a batch.
#[derive(Debug)]
pub enum Op<'a> {
    Read { node: NodeId, offset: u64, dst: &'a mut [u8] },
    Write { node: NodeId, offset: u64, src: &'a [u8] },
    FetchAdd { node: NodeId, offset: u64, value: u64 },
    CompareExchange { node: NodeId, offset: u64, current: u64, new: u64 },
}

/// The outcome of each operation of a submitted batch, in order: the
/// previous word for atomics, 0 for reads and writes.
pub type Completion = Vec<Result<u64>>;

/// A one-sided backend.
pub trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;

    /// The node this process is.
    fn local_node(&self) -> NodeId;

    /// Length in bytes of `node`'s segment.
    fn segment_len(&self, node: NodeId) -> Result<u64>;

    /// Copies `dst.len()` bytes from `node`'s segment at `offset`.
    fn read(&self, node: NodeId, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Copies `src` into `node`'s segment at `offset`.
    fn write(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()>;

    /// Adds `value` to the 64-bit word at `offset` and returns its old value.
    fn fetch_add_u64(&self, node: NodeId, offset: u64, value: u64) -> Result<u64>;

    /// Replaces the word at `offset` with `new` if it holds `current`, and
    /// returns the word it held (equal to `current` on success).
    fn compare_exchange_u64(&self, node: NodeId, offset: u64, current: u64, new: u64)
        -> Result<u64>;

    /// Waits until every operation issued by this node is complete and
    /// visible to all nodes.
    fn quiet(&self) -> Result<()>;

    /// `node`'s segment mapped into this process, if this backend can.
    fn local_view(&self, node: NodeId) -> Option<LocalView>;

    /// Counts a copy of `bytes` bytes that this node made directly between
    /// the local views of `from` and `to`, as a read and a write.
    fn count_copy(&self, from: NodeId, to: NodeId, bytes: u64) {
        let _ = (from, to, bytes);
    }

    /// A descriptor of `node`'s segment that this process may `mmap` onto
    /// the window, if this backend has one.
    fn mappable_fd(&self, node: NodeId) -> Option<std::os::fd::RawFd> {
        let _ = node;
        None
    }

    /// Issues a batch and returns each operation's outcome once all are
    /// complete. Backends with queues override this to overlap them.
    fn submit(&self, ops: &mut [Op<'_>]) -> Completion {
        ops.iter_mut()
            .map(|op| match op {
                Op::Read { node, offset, dst } => self.read(*node, *offset, dst).map(|_| 0),
                Op::Write { node, offset, src } => self.write(*node, *offset, src).map(|_| 0),
                Op::FetchAdd { node, offset, value } => self.fetch_add_u64(*node, *offset, *value),
                Op::CompareExchange { node, offset, current, new } => {
                    self.compare_exchange_u64(*node, *offset, *current, *new)
                }
            })
            .collect()
    }
}

/// Checks that `len` bytes at `offset` fit a segment of `segment_len` bytes.
#[inline]
pub(crate) fn check_bounds(node: NodeId, offset: u64, len: u64, segment_len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= segment_len => Ok(()),
        _ => Err(Error::OutOfBounds { node, offset, len, segment_len }),
    }
}
