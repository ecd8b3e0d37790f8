//! meshmem pools the memory of a group of nodes arranged as a 3D mesh into
//! one global address space.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
pub mod launch;
pub mod topology;

pub use error::{Error, Result};
pub use topology::{Coord, Mesh3d, NodeId};
