//! meshmem pools the memory of a group of node processes arranged as a 3D
//! mesh into one global address space.
//!
//! Each node contributes a segment of memory; one allocator hands out
//! global addresses whose pages may live on any node; a page table records
//! where each page lives; transports carry the bytes. On one host the
//! shared-memory transport maps every page into every process at the same
//! address, so a [`GlobalAddr`] is a plain pointer there.
//!
//! Layers, each knowing only those below it: [`topology`], [`transport`],
//! [`frames`], [`space`], [`alloc`], [`pool`].
#![deny(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod coherence;
pub mod config;
pub mod error;
mod fault;
pub mod frames;
pub mod launch;
pub mod layout;
pub mod pool;
mod replica;
pub mod space;
pub mod topology;
pub mod transport;

pub use alloc::{Advice, GlobalAlloc, Placement};
pub use coherence::AdviceSet;
pub use config::Config;
pub use error::{Error, Result};
pub use pool::{GlobalSlice, NodeStats, Pool, PoolAllocator, Stats};
pub use space::GlobalAddr;
pub use topology::{Coord, LinkModel, Mesh3d, NodeId, TrafficEstimate};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
