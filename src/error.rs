//! The one error type of the crate. Each variant names the offending value
//! and the limit it broke, and keeps the OS error as its source.

use std::io;
use std::path::PathBuf;

use crate::launch::{signal_name, NodeExit};
use crate::topology::{Coord, Mesh3d, NodeId};

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in meshmem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid mesh `{text}`: {reason}")]
    InvalidMesh { text: String, reason: String },

    #[error("node {node} is outside the mesh {mesh} of {nodes} nodes; valid ids are 0 to {}", nodes - 1)]
    NodeOutOfRange { node: u32, nodes: usize, mesh: Mesh3d },

    #[error("coordinate {coord} is outside the mesh {mesh}")]
    CoordOutOfRange { coord: Coord, mesh: Mesh3d },

    #[error("invalid configuration: {name} = `{value}`: {reason}")]
    InvalidConfig { name: &'static str, value: String, reason: String },

    #[error("the mesh {mesh} has {mesh_nodes} nodes but the group has {group_size}; start one process per node or change the mesh")]
    MeshSizeMismatch { mesh: Mesh3d, mesh_nodes: usize, group_size: usize },

    #[error("node {node} disagrees on {field}: node 0 has `{expected}`, node {node} has `{found}`; start every node with the same configuration")]
    ConfigMismatch { node: NodeId, field: &'static str, expected: String, found: String },

    #[error("cannot reserve the window at {base:#x} ({len:#x} bytes): {source}; another mapping occupies that range in this process; pick another base with MESHMEM_WINDOW_BASE or a smaller window")]
    WindowUnavailable { base: u64, len: u64, #[source] source: io::Error },

    #[error("joining group `{group}` failed: {reason}")]
    Join { group: String, reason: String, #[source] source: Option<io::Error> },

    #[error("out of memory on node {node}: requested {requested} bytes, {free} bytes free")]
    OutOfMemory { node: NodeId, requested: u64, free: u64 },

    #[error("out of address space in the arena of node {node}: requested {requested} bytes; raise MESHMEM_WINDOW_SIZE")]
    OutOfAddressSpace { node: NodeId, requested: u64 },

    #[error("invalid layout of {size} bytes aligned to {align}: {reason}")]
    InvalidLayout { size: usize, align: usize, reason: String },

    #[error("address {addr:#x} was already freed")]
    DoubleFree { addr: u64 },

    #[error("address {addr:#x} was not returned by alloc on this pool: {reason}")]
    InvalidFree { addr: u64, reason: String },

    #[error("address range {addr:#x}..{end:#x} is not inside an allocation of this pool: {reason}")]
    InvalidAddress { addr: u64, end: u64, reason: String },

    #[error("offset {offset:#x} + {len:#x} bytes is beyond the segment of {segment_len:#x} bytes on node {node}")]
    OutOfBounds { node: NodeId, offset: u64, len: u64, segment_len: u64 },

    #[error("address {addr:#x} is not aligned to 8 bytes, as 64-bit atomics require")]
    Unaligned { addr: u64 },

    #[error("offset {offset:#x} on node {node} is not aligned to 8 bytes, as 64-bit atomics require")]
    UnalignedOffset { node: NodeId, offset: u64 },

    #[error("segment of node {node} is corrupt: {reason}")]
    Corrupt { node: NodeId, reason: String },

    #[error("transport to node {node} failed: {reason}")]
    Transport { node: NodeId, reason: String, #[source] source: Option<io::Error> },

    #[error("collective `{op}` failed: {reason}")]
    Collective { op: &'static str, reason: String, #[source] source: Option<io::Error> },

    #[error("launch failed: {reason}")]
    Launch { reason: String, #[source] source: Option<io::Error> },

    #[error("cannot start node {node} {coord} as `{}`: {source}; check that it is a program for this machine and that process limits allow another process", program.display())]
    Spawn { node: NodeId, coord: Coord, program: PathBuf, #[source] source: io::Error },

    #[error("node {node} {coord} {exit}")]
    NodeFailed { node: NodeId, coord: Coord, exit: NodeExit },

    #[error("the launcher received {}; every node was stopped", signal_name(*signal))]
    Interrupted { signal: i32 },

    #[error("{what} failed: {source}")]
    Os { what: String, #[source] source: io::Error },
}

impl Error {
    /// Wraps an OS error with what was being done.
    pub(crate) fn os(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Os { what: what.into(), source: source.into() }
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Os { what: "system call".into(), source: e.into() }
    }
}
