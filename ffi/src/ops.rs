//! Mesh queries, allocation, one-sided operations, collectives and
//! statistics on a joined pool.
//!
//! Every function checks its handle first, then each pointer and length,
//! and only then calls the pool, so bad arguments change nothing.

use std::alloc::Layout;
use std::ffi::c_void;

use meshmem_core::{Advice, Coord, GlobalAddr, NodeId, Placement, Pool};

use crate::join::{pool, meshmem_pool};
use crate::meshmem_status::*;
use crate::{call, out, Failure, Outcome};

/// Placement kind: on the calling node.
pub const MESHMEM_PLACE_LOCAL: u32 = 0;
/// Placement kind: on `node`; fails rather than fall back to another node.
pub const MESHMEM_PLACE_NODE: u32 = 1;
/// Placement kind: on the node fewest hops from `coord` with free capacity.
pub const MESHMEM_PLACE_NEAREST: u32 = 2;
/// Placement kind: round robin over `nodes` (all nodes when `nodes` is NULL),
/// `pages_per_stripe` pages at a time.
pub const MESHMEM_PLACE_INTERLEAVE: u32 = 3;
/// Placement kind: on the node with the most free frames, page by page.
pub const MESHMEM_PLACE_BALANCED: u32 = 4;

/// Advice kind: one copy at the home.
pub const MESHMEM_ADVICE_NONE: u32 = 0;
/// Advice kind: readers may hold replicas; a write invalidates them.
pub const MESHMEM_ADVICE_READ_MOSTLY: u32 = 1;
/// Advice kind: keep the home on `node`.
pub const MESHMEM_ADVICE_PREFERRED_LOCATION: u32 = 2;
/// Advice kind: keep `node`'s mapping of the range established.
pub const MESHMEM_ADVICE_ACCESSED_BY: u32 = 3;
/// Advice kind: never replicate or cache.
pub const MESHMEM_ADVICE_STREAMING: u32 = 4;

/// A node's position in the mesh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_coord {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

/// The mesh's shape: `x * y * z` nodes, a torus when `torus` is 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_mesh_shape {
    pub x: u32,
    pub y: u32,
    pub z: u32,
    pub torus: u32,
}

/// Where the pages of a new allocation live. `kind` is one of the
/// `MESHMEM_PLACE_*` values; the other fields are read only by the kinds
/// that name them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct meshmem_placement {
    pub kind: u32,
    /// For `MESHMEM_PLACE_NODE`.
    pub node: u32,
    /// For `MESHMEM_PLACE_NEAREST`.
    pub coord: meshmem_coord,
    /// For `MESHMEM_PLACE_INTERLEAVE`: `node_count` node ids, or NULL for
    /// every node of the mesh.
    pub nodes: *const u32,
    pub node_count: usize,
    /// For `MESHMEM_PLACE_INTERLEAVE`: pages per turn, at least 1.
    pub pages_per_stripe: usize,
}

/// A coherence hint. `kind` is one of the `MESHMEM_ADVICE_*` values; `node`
/// is read by `PREFERRED_LOCATION` and `ACCESSED_BY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_advice {
    pub kind: u32,
    pub node: u32,
}

/// One node's capacity, use and traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_node_stats {
    pub node: u32,
    pub coord: meshmem_coord,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub frames_total: u64,
    pub frames_used: u64,
    /// Bytes this node moved to or from itself.
    pub bytes_local: u64,
    /// Bytes this node moved to or from other nodes.
    pub bytes_remote: u64,
    /// Bytes this node moved, each weighted by its hop distance.
    pub hop_bytes: u64,
    /// Address space given up because an arena's extent list was full.
    pub leaked_pages: u64,
    /// Bytes of this node's frames that contain replicas of read-mostly
    /// pages homed elsewhere; part of `used_bytes`.
    pub replica_bytes: u64,
}

fn node_id(value: u32, name: &str) -> Outcome<NodeId> {
    u16::try_from(value).map(NodeId).map_err(|_| Failure::argument(format!("`{name}` {value} is not a node id; ids are 0 to 65534")))
}

fn coord(value: meshmem_coord, name: &str) -> Outcome<Coord> {
    let axis = |v: u32| u16::try_from(v).map_err(|_| Failure::argument(format!("`{name}` ({}, {}, {}) has an axis above 65535", value.x, value.y, value.z)));
    Ok(Coord::new(axis(value.x)?, axis(value.y)?, axis(value.z)?))
}

/// Converts a C placement; NULL is `Local`.
///
/// # Safety
///
/// `placement` is null or valid, and its `nodes` is null or holds
/// `node_count` ids.
pub(crate) unsafe fn placement(placement: *const meshmem_placement, pool: &Pool) -> Outcome<Placement> {
    // SAFETY: the caller promises null or valid.
    let Some(p) = (unsafe { placement.as_ref() }) else { return Ok(Placement::Local) };
    let converted = match p.kind {
        MESHMEM_PLACE_LOCAL => Placement::Local,
        MESHMEM_PLACE_NODE => Placement::Node(node_id(p.node, "placement.node")?),
        MESHMEM_PLACE_NEAREST => Placement::Nearest(coord(p.coord, "placement.coord")?),
        MESHMEM_PLACE_INTERLEAVE => {
            let nodes = if p.nodes.is_null() {
                pool.mesh().nodes().collect()
            } else {
                if p.node_count > u16::MAX as usize {
                    return Err(Failure::argument(format!("`placement.node_count` {} exceeds the largest mesh of 65535 nodes", p.node_count)));
                }
                // SAFETY: the caller promises `nodes` holds `node_count` ids.
                let ids = unsafe { std::slice::from_raw_parts(p.nodes, p.node_count) };
                ids.iter().map(|&id| node_id(id, "placement.nodes[]")).collect::<Outcome<Vec<_>>>()?
            };
            Placement::Interleave { nodes, pages_per_stripe: p.pages_per_stripe }
        }
        MESHMEM_PLACE_BALANCED => Placement::Balanced,
        other => {
            return Err(Failure::argument(format!(
                "`placement.kind` {other} is not a placement; use MESHMEM_PLACE_LOCAL, _NODE, _NEAREST, _INTERLEAVE or _BALANCED (0 to 4)"
            )))
        }
    };
    converted.validate(&pool.mesh())?;
    Ok(converted)
}

/// Converts a C advice.
pub(crate) fn advice(advice: meshmem_advice, pool: &Pool) -> Outcome<Advice> {
    let node = || -> Outcome<NodeId> {
        let node = node_id(advice.node, "advice.node")?;
        pool.mesh().check(node)?;
        Ok(node)
    };
    Ok(match advice.kind {
        MESHMEM_ADVICE_NONE => Advice::None,
        MESHMEM_ADVICE_READ_MOSTLY => Advice::ReadMostly,
        MESHMEM_ADVICE_PREFERRED_LOCATION => Advice::PreferredLocation(node()?),
        MESHMEM_ADVICE_ACCESSED_BY => Advice::AccessedBy(node()?),
        MESHMEM_ADVICE_STREAMING => Advice::Streaming,
        other => {
            return Err(Failure::argument(format!(
                "`advice.kind` {other} is not an advice; use MESHMEM_ADVICE_NONE, _READ_MOSTLY, _PREFERRED_LOCATION, _ACCESSED_BY or _STREAMING (0 to 4)"
            )))
        }
    })
}

/// Checks a byte count and the range it spans from `addr`.
pub(crate) fn range(addr: u64, len: usize) -> Outcome<()> {
    if len > isize::MAX as usize {
        return Err(Failure::argument(format!("`len` {len} is larger than any buffer can be (isize::MAX)")));
    }
    if addr.checked_add(len as u64).is_none() {
        return Err(Failure::argument(format!("`addr` {addr:#x} + `len` {len:#x} overflows 64 bits")));
    }
    Ok(())
}

/// Checks a caller's buffer of `len` bytes; null is allowed only for zero.
fn bytes(ptr: *const c_void, len: usize, name: &str) -> Outcome<()> {
    if ptr.is_null() && len > 0 {
        return Err(Failure::argument(format!("`{name}` is null but `len` is {len}; pass a buffer of at least `len` bytes")));
    }
    Ok(())
}

/// Allocates and returns an address checked for the pool's window.
pub(crate) fn allocate(pool: &Pool, size: usize, align: usize, placement: Placement, advice: Advice) -> Outcome<GlobalAddr> {
    if size == 0 {
        return Err(Failure::argument("`size` is 0; allocate at least one byte"));
    }
    let layout = Layout::from_size_align(size, align).map_err(|_| {
        Failure::argument(format!("`size` {size} with `align` {align} is not a layout: the alignment must be a power of two and the size, rounded up to it, at most isize::MAX"))
    })?;
    Ok(pool.alloc(layout, placement, advice)?.addr)
}

/// This node's id.
///
/// # Safety
///
/// `node` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_node(pool_handle: meshmem_pool, node: *mut u32) -> crate::meshmem_status {
    call("meshmem_node", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        *unsafe { out(node, "node") }? = pool.node().0 as u32;
        Ok(())
    })
}

/// The number of nodes in the group.
///
/// # Safety
///
/// `size` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_size(pool_handle: meshmem_pool, size: *mut u32) -> crate::meshmem_status {
    call("meshmem_size", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        *unsafe { out(size, "size") }? = pool.size() as u32;
        Ok(())
    })
}

/// The mesh's shape.
///
/// # Safety
///
/// `shape` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_mesh(pool_handle: meshmem_pool, shape: *mut meshmem_mesh_shape) -> crate::meshmem_status {
    call("meshmem_mesh", || {
        let pool = pool(pool_handle)?;
        let mesh = pool.mesh();
        // SAFETY: the caller promises null or writable.
        *unsafe { out(shape, "shape") }? = meshmem_mesh_shape {
            x: mesh.dims[0] as u32,
            y: mesh.dims[1] as u32,
            z: mesh.dims[2] as u32,
            torus: mesh.wrap as u32,
        };
        Ok(())
    })
}

/// The coordinate of `node` in the mesh.
///
/// # Safety
///
/// `coord` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_coord_of(pool_handle: meshmem_pool, node: u32, coord: *mut meshmem_coord) -> crate::meshmem_status {
    call("meshmem_coord_of", || {
        let pool = pool(pool_handle)?;
        let c = pool.mesh().coord(node_id(node, "node")?)?;
        // SAFETY: the caller promises null or writable.
        *unsafe { out(coord, "coord") }? = meshmem_coord { x: c.x as u32, y: c.y as u32, z: c.z as u32 };
        Ok(())
    })
}

/// The hop distance between nodes `a` and `b` (Manhattan distance, the
/// short way round on a torus).
///
/// # Safety
///
/// `hops` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_hops(pool_handle: meshmem_pool, a: u32, b: u32, hops: *mut u32) -> crate::meshmem_status {
    call("meshmem_hops", || {
        let pool = pool(pool_handle)?;
        let distance = pool.mesh().hops(node_id(a, "a")?, node_id(b, "b")?)?;
        // SAFETY: the caller promises null or writable.
        *unsafe { out(hops, "hops") }? = distance;
        Ok(())
    })
}

/// The page size in bytes.
///
/// # Safety
///
/// `page_size` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_page_size(pool_handle: meshmem_pool, page_size: *mut u64) -> crate::meshmem_status {
    call("meshmem_page_size", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        *unsafe { out(page_size, "page_size") }? = pool.page_size() as u64;
        Ok(())
    })
}

/// Allocates `size` bytes aligned to `align` (a power of two), with pages
/// homed where `placement` says (NULL: on this node), and writes the global
/// address to `addr`. Any node may free it.
///
/// # Safety
///
/// `placement` is null or valid (its `nodes` null or holding `node_count`
/// ids); `addr` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_alloc(
    pool_handle: meshmem_pool,
    size: usize,
    align: usize,
    placement: *const meshmem_placement,
    advice: meshmem_advice,
    addr: *mut u64,
) -> crate::meshmem_status {
    call("meshmem_alloc", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let addr = unsafe { out(addr, "addr") }?;
        // SAFETY: the caller promises null or valid.
        let placement = unsafe { self::placement(placement, &pool) }?;
        let advice = self::advice(advice, &pool)?;
        *addr = allocate(&pool, size, align, placement, advice)?.0;
        Ok(())
    })
}

/// Frees the allocation that starts at `addr`. Freeing twice, or an address
/// that does not start an allocation of this pool, fails and changes
/// nothing.
///
/// NOTE: after the free, access to a page-sized or larger allocation fails
/// with `MESHMEM_ERR_INVALID_ADDRESS`, but a small block shares its page with
/// other blocks, so reading or writing it after the free is not detected.
///
/// # Safety
///
/// None for meshmem's own state. Pointers into the allocation, in any
/// process, must not be used after it is freed.
#[no_mangle]
pub extern "C" fn meshmem_free(pool_handle: meshmem_pool, addr: u64) -> crate::meshmem_status {
    call("meshmem_free", || {
        let pool = pool(pool_handle)?;
        pool.free(GlobalAddr(addr))?;
        Ok(())
    })
}

/// Copies `len` bytes of pool memory at `addr` into `dst` (a one-sided get).
///
/// # Safety
///
/// `dst` is null (an error unless `len` is 0) or valid for writes of `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn meshmem_read(pool_handle: meshmem_pool, addr: u64, dst: *mut c_void, len: usize) -> crate::meshmem_status {
    call("meshmem_read", || {
        let pool = pool(pool_handle)?;
        bytes(dst, len, "dst")?;
        range(addr, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `dst` is non-null and the caller promises `len` writable bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
        pool.read(GlobalAddr(addr), dst)?;
        Ok(())
    })
}

/// Copies `len` bytes from `src` into pool memory at `addr` (a one-sided
/// put). Visible to other nodes at the latest when `meshmem_quiet` returns.
///
/// # Safety
///
/// `src` is null (an error unless `len` is 0) or valid for reads of `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn meshmem_write(pool_handle: meshmem_pool, addr: u64, src: *const c_void, len: usize) -> crate::meshmem_status {
    call("meshmem_write", || {
        let pool = pool(pool_handle)?;
        bytes(src, len, "src")?;
        range(addr, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `src` is non-null and the caller promises `len` readable bytes.
        let src = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
        pool.write(GlobalAddr(addr), src)?;
        Ok(())
    })
}

/// Adds `value` to the 64-bit word at `addr` (8-byte aligned) and writes its
/// old value to `previous`.
///
/// # Safety
///
/// `previous` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_fetch_add_u64(pool_handle: meshmem_pool, addr: u64, value: u64, previous: *mut u64) -> crate::meshmem_status {
    call("meshmem_fetch_add_u64", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let previous = unsafe { out(previous, "previous") }?;
        *previous = pool.fetch_add_u64(GlobalAddr(addr), value)?;
        Ok(())
    })
}

/// Replaces the 64-bit word at `addr` (8-byte aligned) with `desired` if it
/// holds `expected`, and writes the value it held to `previous`: the swap
/// happened exactly when `*previous == expected`.
///
/// # Safety
///
/// `previous` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_compare_exchange_u64(
    pool_handle: meshmem_pool,
    addr: u64,
    expected: u64,
    desired: u64,
    previous: *mut u64,
) -> crate::meshmem_status {
    call("meshmem_compare_exchange_u64", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let previous = unsafe { out(previous, "previous") }?;
        *previous = match pool.compare_exchange_u64(GlobalAddr(addr), expected, desired)? {
            Ok(value) | Err(value) => value,
        };
        Ok(())
    })
}

/// Waits until every operation this node issued is complete and visible to
/// every node.
///
/// # Safety
///
/// None; any handle value is accepted.
#[no_mangle]
pub extern "C" fn meshmem_quiet(pool_handle: meshmem_pool) -> crate::meshmem_status {
    call("meshmem_quiet", || Ok(pool(pool_handle)?.quiet()?))
}

/// Waits until every node has called `meshmem_barrier` (after a quiet).
///
/// # Safety
///
/// None; any handle value is accepted.
#[no_mangle]
pub extern "C" fn meshmem_barrier(pool_handle: meshmem_pool) -> crate::meshmem_status {
    call("meshmem_barrier", || Ok(pool(pool_handle)?.barrier()?))
}

/// Gathers `len` bytes from every node into `recv`, in rank order. Every
/// node passes the same `len`; `recv_len` is at least `len * size`.
///
/// # Safety
///
/// `send` is valid for reads of `len` bytes and `recv` for writes of
/// `recv_len` bytes (either may be null when its length is 0).
#[no_mangle]
pub unsafe extern "C" fn meshmem_all_gather(
    pool_handle: meshmem_pool,
    send: *const c_void,
    len: usize,
    recv: *mut c_void,
    recv_len: usize,
) -> crate::meshmem_status {
    call("meshmem_all_gather", || {
        let pool = pool(pool_handle)?;
        bytes(send, len, "send")?;
        bytes(recv, recv_len, "recv")?;
        let needed = len.checked_mul(pool.size()).filter(|&n| n <= isize::MAX as usize).ok_or_else(|| {
            Failure::argument(format!("`len` {len} times {} nodes overflows", pool.size()))
        })?;
        if recv_len < needed {
            return Err(Failure::new(MESHMEM_ERR_BUFFER_TOO_SMALL, format!("`recv_len` {recv_len} is below `len` {len} times {} nodes = {needed}", pool.size())));
        }
        let mine = if len == 0 {
            &[][..]
        } else {
            // SAFETY: non-null, and the caller promises `len` readable bytes.
            unsafe { std::slice::from_raw_parts(send.cast::<u8>(), len) }
        };
        let parts = pool.all_gather(mine)?;
        if let Some((rank, part)) = parts.iter().enumerate().find(|(_, p)| p.len() != len) {
            return Err(Failure::new(MESHMEM_ERR_COLLECTIVE, format!("node {rank} sent {} bytes and this node {len}; every node must pass the same `len`", part.len())));
        }
        if needed > 0 {
            // SAFETY: `recv` is non-null (checked, since `recv_len >= needed > 0`)
            // and the caller promises `recv_len` writable bytes.
            let recv = unsafe { std::slice::from_raw_parts_mut(recv.cast::<u8>(), needed) };
            for (chunk, part) in recv.chunks_exact_mut(len).zip(&parts) {
                chunk.copy_from_slice(part);
            }
        }
        Ok(())
    })
}

/// Maps every page of `len` bytes at `addr` into this process and writes the
/// pointer to use for them to `ptr` (on this backend, `addr` itself). The
/// pointer is valid until the allocation is freed by any node.
///
/// # Safety
///
/// `ptr` is null (an error) or writable. Loads and stores through the
/// pointer race with other nodes' writes unless the program synchronises.
#[no_mangle]
pub unsafe extern "C" fn meshmem_local_ptr(pool_handle: meshmem_pool, addr: u64, len: usize, ptr: *mut *mut c_void) -> crate::meshmem_status {
    call("meshmem_local_ptr", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let ptr = unsafe { out(ptr, "ptr") }?;
        range(addr, len)?;
        *ptr = pool.local_ptr(GlobalAddr(addr), len)?.as_ptr().cast();
        Ok(())
    })
}

/// The home node of the page that holds `addr`.
///
/// # Safety
///
/// `node` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_home_of(pool_handle: meshmem_pool, addr: u64, node: *mut u32) -> crate::meshmem_status {
    call("meshmem_home_of", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let node = unsafe { out(node, "node") }?;
        *node = pool.home_of(GlobalAddr(addr))?.0 as u32;
        Ok(())
    })
}

/// Writes every node's statistics, by node id, to `nodes` and the node count
/// to `count`. With `capacity` below the node count nothing is written to
/// `nodes`, `count` is set, and the status is `MESHMEM_ERR_BUFFER_TOO_SMALL`;
/// pass `nodes` NULL and `capacity` 0 to ask for the count.
///
/// # Safety
///
/// `nodes` is valid for writes of `capacity` entries (null when `capacity`
/// is 0); `count` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_stats(
    pool_handle: meshmem_pool,
    nodes: *mut meshmem_node_stats,
    capacity: usize,
    count: *mut usize,
) -> crate::meshmem_status {
    call("meshmem_stats", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let count = unsafe { out(count, "count") }?;
        if nodes.is_null() && capacity > 0 {
            return Err(Failure::argument(format!("`nodes` is null but `capacity` is {capacity}")));
        }
        let stats = pool.stats()?;
        *count = stats.nodes.len();
        if capacity < stats.nodes.len() {
            return Err(Failure::new(
                MESHMEM_ERR_BUFFER_TOO_SMALL,
                format!("`capacity` {capacity} is below the {} nodes of the group; `count` holds the number needed", stats.nodes.len()),
            ));
        }
        // SAFETY: non-null (capacity > 0 here) and the caller promises
        // `capacity` writable entries.
        let nodes = unsafe { std::slice::from_raw_parts_mut(nodes, stats.nodes.len()) };
        for (slot, s) in nodes.iter_mut().zip(&stats.nodes) {
            *slot = meshmem_node_stats {
                node: s.node.0 as u32,
                coord: meshmem_coord { x: s.coord.x as u32, y: s.coord.y as u32, z: s.coord.z as u32 },
                capacity_bytes: s.capacity_bytes,
                used_bytes: s.used_bytes,
                frames_total: s.frames_total,
                frames_used: s.frames_used,
                bytes_local: s.bytes_local,
                bytes_remote: s.bytes_remote,
                hop_bytes: s.hop_bytes,
                leaked_pages: s.leaked_pages,
                replica_bytes: s.replica_bytes,
            };
        }
        Ok(())
    })
}
