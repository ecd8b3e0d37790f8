//! Joining and leaving a group.
//!
//! Three ways in, one way out:
//!
//! - [`meshmem_join_env`]: everything from the launcher's environment, as
//!   `Config::from_env` reads it (`meshmem run`, torchrun, Open MPI, Slurm).
//! - [`meshmem_join`]: [`meshmem_options`] override the environment field by
//!   field (rank, size, mesh, group, geometry, timeout).
//! - [`meshmem_join_with_allgather`]: for programs that already run
//!   `torch.distributed` or MPI. Before the pool's own rendezvous, every node
//!   passes a fixed-size descriptor ([`MESHMEM_JOIN_DESCRIPTOR_LEN`] bytes)
//!   through the caller's all-gather. The descriptor carries the node's rank,
//!   group size, mesh, page size, node capacity, window size, host name and
//!   process id, and node 0's choice of group id. Every node checks the
//!   others' descriptors against its own and fails naming the field that
//!   differs, then joins under node 0's group id.
//!
//! What the callback cannot carry: the shared-memory backend passes each
//! node's segment as a file descriptor, which only a Unix-domain socket can
//! move between processes. So the nodes still meet on the host's abstract
//! socket named by the agreed group id. That meeting also agrees on the
//! window base: node 0 reserves it, and the others map it at the same
//! address. The callback removes the need for a shared `MESHMEM_GROUP` and
//! catches configuration mismatches and nodes on different hosts before any
//! node waits on the socket.
//!
//! [`meshmem_leave`] ends the handle. Buffers still hold the pool's mapping
//! until they are released, so memory they view stays valid.

use std::ffi::{c_char, c_void, CStr};
use std::sync::Arc;
use std::time::Duration;

use meshmem_core::{Config, Mesh3d, Pool};

use crate::meshmem_status::*;
use crate::registry::Registry;
use crate::{call, out, Failure, Outcome};

/// A pool this process joined. Zero is no pool.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_pool {
    pub id: u64,
}

static POOLS: Registry<Pool> = Registry::new("pool");

/// Looks up the pool of `handle`.
pub(crate) fn pool(handle: meshmem_pool) -> Outcome<Arc<Pool>> {
    POOLS.get(handle.id)
}

/// How to join; fields left at their [`meshmem_options_init`] values come
/// from the environment or the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct meshmem_options {
    /// This node's id, 0 to size - 1; -1 reads RANK (or the MPI or Slurm
    /// equivalent).
    pub rank: i32,
    /// Number of nodes; -1 reads WORLD_SIZE (or equivalent), else the mesh's.
    pub size: i32,
    /// Mesh shape such as "2x2x1" or "4x4x2:torus"; NULL reads MESHMEM_MESH.
    pub mesh: *const c_char,
    /// Group id naming the rendezvous socket; NULL reads MESHMEM_GROUP.
    pub group: *const c_char,
    /// Page size in bytes; 0 reads MESHMEM_PAGE_SIZE (default 2 MiB).
    pub page_size: u64,
    /// Bytes this node contributes; 0 reads MESHMEM_NODE_CAPACITY (1 GiB).
    pub node_capacity: u64,
    /// Bytes of address space of the window; 0 reads MESHMEM_WINDOW_SIZE.
    pub window_size: u64,
    /// How long to wait for the group; 0 reads MESHMEM_JOIN_TIMEOUT_MS.
    pub join_timeout_ms: u64,
}

/// Size in bytes of the descriptor each node passes to the all-gather
/// callback of [`meshmem_join_with_allgather`].
pub const MESHMEM_JOIN_DESCRIPTOR_LEN: usize = 320;

/// An all-gather the caller provides: send `len` bytes from `send` and
/// receive every node's `len` bytes into `recv` (`len * size` bytes), in rank
/// order, like `MPI_Allgather` or `torch.distributed.all_gather_into_tensor`.
/// Returns 0 on success; any other value fails the join with that value.
pub type meshmem_allgather_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, send: *const c_void, len: usize, recv: *mut c_void) -> i32>;

/// Sets `options` to "everything from the environment": rank and size -1,
/// strings NULL, numbers 0.
///
/// # Safety
///
/// `options` is null (an error) or valid for writes of a `meshmem_options`.
#[no_mangle]
pub unsafe extern "C" fn meshmem_options_init(options: *mut meshmem_options) -> crate::meshmem_status {
    call("meshmem_options_init", || {
        // SAFETY: the caller promises `options` is null or writable.
        let options = unsafe { out(options, "options") }?;
        *options = meshmem_options {
            rank: -1,
            size: -1,
            mesh: std::ptr::null(),
            group: std::ptr::null(),
            page_size: 0,
            node_capacity: 0,
            window_size: 0,
            join_timeout_ms: 0,
        };
        Ok(())
    })
}

/// Joins the group described by the environment and writes the pool's
/// handle to `pool`. Every node of the group must call a join.
///
/// # Safety
///
/// `pool` is null (an error) or valid for writes of a `meshmem_pool`.
#[no_mangle]
pub unsafe extern "C" fn meshmem_join_env(pool: *mut meshmem_pool) -> crate::meshmem_status {
    call("meshmem_join_env", || {
        // SAFETY: the caller promises `pool` is null or writable.
        let pool = unsafe { out(pool, "pool") }?;
        *pool = register(Pool::join(Config::from_env()?)?);
        Ok(())
    })
}

/// Joins with `options` overriding the environment and writes the pool's
/// handle to `pool`. NULL `options` is the same as [`meshmem_join_env`].
///
/// # Safety
///
/// `options` is null or points to a `meshmem_options` whose strings are null
/// or NUL-terminated; `pool` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_join(options: *const meshmem_options, pool: *mut meshmem_pool) -> crate::meshmem_status {
    call("meshmem_join", || {
        // SAFETY: the caller promises `pool` is null or writable.
        let pool = unsafe { out(pool, "pool") }?;
        // SAFETY: the caller promises `options` is null or valid.
        let config = unsafe { config(options) }?;
        *pool = register(Pool::join(config)?);
        Ok(())
    })
}

/// Joins like [`meshmem_join`], first agreeing through the caller's
/// all-gather. Rank and size must be known, from `options` or the
/// environment. Each node passes one descriptor of
/// `MESHMEM_JOIN_DESCRIPTOR_LEN` bytes: its rank, group size, mesh, page
/// size, node capacity, window size, host name and process id, and node 0's
/// choice of group id (`options.group`, or a fresh id). Every node checks
/// the others' descriptors and fails naming the field that differs, or the
/// node on another host, before it waits on anything; then all join under
/// node 0's group id. Segment file descriptors cannot travel as bytes, so
/// the nodes still meet on this host's abstract Unix socket named by that
/// id, and that meeting agrees on the window base.
///
/// # Safety
///
/// As for [`meshmem_join`]; `allgather` is a function that behaves as
/// [`meshmem_allgather_fn`] says, and `user` is passed to it unchanged.
#[no_mangle]
pub unsafe extern "C" fn meshmem_join_with_allgather(
    options: *const meshmem_options,
    allgather: meshmem_allgather_fn,
    user: *mut c_void,
    pool: *mut meshmem_pool,
) -> crate::meshmem_status {
    call("meshmem_join_with_allgather", || {
        // SAFETY: the caller promises `pool` is null or writable.
        let pool = unsafe { out(pool, "pool") }?;
        let allgather = allgather.ok_or_else(|| Failure::argument("`allgather` is null; pass the all-gather function"))?;
        // SAFETY: the caller promises `options` is null or valid.
        let mut config = unsafe { config(options) }?;
        let descriptor = Descriptor::of(&config)?;
        let mut gathered = vec![0u8; MESHMEM_JOIN_DESCRIPTOR_LEN * descriptor.size as usize];
        let sent = descriptor.encode();
        // SAFETY: `sent` holds `len` bytes and `gathered` `len * size`, as
        // the callback's contract says; the caller vouches for the function.
        let code = unsafe { allgather(user, sent.as_ptr().cast(), sent.len(), gathered.as_mut_ptr().cast()) };
        if code != 0 {
            return Err(Failure::new(MESHMEM_ERR_CALLBACK, format!("the all-gather callback returned {code}; the join was not attempted")));
        }
        config.group = Some(descriptor.agree(&gathered)?);
        *pool = register(Pool::join(config)?);
        Ok(())
    })
}

/// Leaves the group: the handle and every copy of it become stale. Buffers
/// of the pool keep its memory mapped until they are released.
///
/// # Safety
///
/// None; any handle value is accepted.
#[no_mangle]
pub extern "C" fn meshmem_leave(pool: meshmem_pool) -> crate::meshmem_status {
    call("meshmem_leave", || {
        let pool = POOLS.remove(pool.id)?;
        tracing::info!(node = %pool.node(), "leaving through the C ABI");
        Ok(())
    })
}

fn register(pool: Pool) -> meshmem_pool {
    meshmem_pool { id: POOLS.insert(Arc::new(pool)) }
}

/// Reads a NUL-terminated string argument.
///
/// # Safety
///
/// `ptr` is null or a NUL-terminated string.
unsafe fn text<'a>(ptr: *const c_char, name: &str) -> Outcome<Option<&'a str>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller promises a NUL-terminated string.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().map(Some).map_err(|_| Failure::argument(format!("`{name}` is not UTF-8: {text:?}")))
}

/// The environment's configuration with `options` applied over it.
///
/// # Safety
///
/// `options` is null or valid, with null or NUL-terminated strings.
unsafe fn config(options: *const meshmem_options) -> Outcome<Config> {
    let mut config = Config::from_env()?;
    // SAFETY: the caller promises `options` is null or valid for reads.
    let Some(options) = (unsafe { options.as_ref() }) else { return Ok(config) };
    let id = |value: i32, name: &str, least: i32| -> Outcome<Option<u16>> {
        match value {
            -1 => Ok(None),
            v if (least..=u16::MAX as i32).contains(&v) => Ok(Some(v as u16)),
            v => Err(Failure::argument(format!("`options.{name}` is {v}; use {least} to 65535, or -1 for the environment"))),
        }
    };
    if let Some(rank) = id(options.rank, "rank", 0)? {
        config.rank = Some(rank);
    }
    if let Some(size) = id(options.size, "size", 1)? {
        config.size = Some(size);
    }
    // SAFETY: the caller promises the strings are null or NUL-terminated.
    if let Some(mesh) = unsafe { text(options.mesh, "options.mesh") }? {
        config.mesh = Some(mesh.parse::<Mesh3d>()?);
    }
    // SAFETY: as above.
    if let Some(group) = unsafe { text(options.group, "options.group") }? {
        config.group = Some(group.to_string());
    }
    if options.page_size != 0 {
        config.page_size = usize::try_from(options.page_size)
            .map_err(|_| Failure::argument(format!("`options.page_size` {} does not fit this machine", options.page_size)))?;
    }
    if options.node_capacity != 0 {
        config.node_capacity = options.node_capacity;
    }
    if options.window_size != 0 {
        config.window_size = options.window_size;
    }
    if options.join_timeout_ms != 0 {
        config.join_timeout = Duration::from_millis(options.join_timeout_ms);
    }
    Ok(config)
}

/// What each node passes through the caller's all-gather.
#[derive(Debug, PartialEq, Eq)]
struct Descriptor {
    rank: u16,
    size: u16,
    pid: u32,
    page_size: u64,
    node_capacity: u64,
    window_size: u64,
    mesh: String,
    group: String,
    host: String,
}

const MAGIC: &[u8; 8] = b"MMJOIN01";
const MESH_AT: usize = 48;
const GROUP_AT: usize = 112;
const HOST_AT: usize = 208;
const TEXT_LEN: [usize; 3] = [GROUP_AT - MESH_AT, HOST_AT - GROUP_AT, MESHMEM_JOIN_DESCRIPTOR_LEN - HOST_AT];

impl Descriptor {
    fn of(config: &Config) -> Outcome<Descriptor> {
        let size = config.size.or(config.mesh.map(|m| m.len() as u16)).ok_or_else(|| {
            Failure::new(MESHMEM_ERR_CONFIG, "the group size is unknown; set `options.size`, a mesh, or WORLD_SIZE")
        })?;
        let rank = config.rank.ok_or_else(|| {
            Failure::new(MESHMEM_ERR_CONFIG, "this node's rank is unknown; set `options.rank` or RANK")
        })?;
        if rank >= size {
            return Err(Failure::new(MESHMEM_ERR_CONFIG, format!("rank {rank} is outside a group of {size}; use 0 to {}", size - 1)));
        }
        let mesh = match config.mesh {
            Some(mesh) => mesh.to_string(),
            None => format!("{size}x1x1"),
        };
        let group = config.group.clone().unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            format!("gather-{}-{nanos:x}", std::process::id())
        });
        let descriptor = Descriptor {
            rank,
            size,
            pid: std::process::id(),
            page_size: config.page_size as u64,
            node_capacity: config.node_capacity,
            window_size: config.window_size,
            mesh,
            group,
            host: host_name(),
        };
        for (field, value, limit) in [("mesh", &descriptor.mesh, TEXT_LEN[0]), ("group", &descriptor.group, TEXT_LEN[1])] {
            if value.len() >= limit {
                return Err(Failure::argument(format!("{field} `{value}` is {} bytes; the descriptor holds {}", value.len(), limit - 1)));
            }
        }
        Ok(descriptor)
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; MESHMEM_JOIN_DESCRIPTOR_LEN];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&(self.rank as u32).to_le_bytes());
        bytes[12..16].copy_from_slice(&(self.size as u32).to_le_bytes());
        bytes[16..20].copy_from_slice(&self.pid.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.page_size.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.node_capacity.to_le_bytes());
        bytes[40..48].copy_from_slice(&self.window_size.to_le_bytes());
        for (at, value, limit) in [(MESH_AT, &self.mesh, TEXT_LEN[0]), (GROUP_AT, &self.group, TEXT_LEN[1]), (HOST_AT, &self.host, TEXT_LEN[2])] {
            let value = &value.as_bytes()[..value.len().min(limit - 1)];
            bytes[at..at + value.len()].copy_from_slice(value);
        }
        bytes
    }

    fn decode(bytes: &[u8], position: usize) -> Outcome<Descriptor> {
        let bad = |what: &str| {
            Failure::new(MESHMEM_ERR_CALLBACK, format!("the all-gather callback returned {what} at position {position}; it must gather every node's descriptor in rank order"))
        };
        if &bytes[..8] != MAGIC {
            return Err(bad("bytes that are not a meshmem join descriptor"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
        let text_at = |at: usize, len: usize| {
            let field = &bytes[at..at + len];
            let end = field.iter().position(|&b| b == 0).unwrap_or(len);
            String::from_utf8_lossy(&field[..end]).into_owned()
        };
        let (rank, size) = (u32_at(8), u32_at(12));
        if rank > u16::MAX as u32 || size > u16::MAX as u32 {
            return Err(bad(&format!("rank {rank} of size {size}")));
        }
        Ok(Descriptor {
            rank: rank as u16,
            size: size as u16,
            pid: u32_at(16),
            page_size: u64_at(24),
            node_capacity: u64_at(32),
            window_size: u64_at(40),
            mesh: text_at(MESH_AT, TEXT_LEN[0]),
            group: text_at(GROUP_AT, TEXT_LEN[1]),
            host: text_at(HOST_AT, TEXT_LEN[2]),
        })
    }

    /// Checks every gathered descriptor against this node's and returns node
    /// 0's group id.
    fn agree(&self, gathered: &[u8]) -> Outcome<String> {
        let mut group = String::new();
        for (position, bytes) in gathered.chunks_exact(MESHMEM_JOIN_DESCRIPTOR_LEN).enumerate() {
            let theirs = Descriptor::decode(bytes, position)?;
            if theirs.rank as usize != position {
                return Err(Failure::new(
                    MESHMEM_ERR_CALLBACK,
                    format!("the all-gather callback put node {}'s descriptor at position {position}; it must gather in rank order", theirs.rank),
                ));
            }
            let differs = |field: &str, ours: &dyn std::fmt::Display, found: &dyn std::fmt::Display| {
                Failure::new(
                    MESHMEM_ERR_JOIN,
                    format!("node {position} disagrees on {field}: node {} has `{ours}`, node {position} has `{found}`; start every node with the same configuration", self.rank),
                )
            };
            if theirs.size != self.size {
                return Err(differs("group size", &self.size, &theirs.size));
            }
            if theirs.mesh != self.mesh {
                return Err(differs("mesh", &self.mesh, &theirs.mesh));
            }
            if theirs.page_size != self.page_size {
                return Err(differs("page size", &self.page_size, &theirs.page_size));
            }
            if theirs.node_capacity != self.node_capacity {
                return Err(differs("node capacity", &self.node_capacity, &theirs.node_capacity));
            }
            if theirs.window_size != self.window_size {
                return Err(differs("window size", &self.window_size, &theirs.window_size));
            }
            if theirs.host != self.host {
                return Err(Failure::new(
                    MESHMEM_ERR_JOIN,
                    format!("node {position} runs on host `{}` and node {} on `{}`; the shared-memory backend needs every node on one host", theirs.host, self.rank, self.host),
                ));
            }
            if position == 0 {
                group = theirs.group;
            }
        }
        Ok(group)
    }
}

fn host_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `name.len()` bytes into `name`.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}
