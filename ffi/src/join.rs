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
//! When the group spans hosts (`MESHMEM_SECRET` is set), the callback
//! instead carries the multi-host descriptors of
//! `Pool::join_with_allgather`, and no rendezvous server is started at
//! `MASTER_ADDR:MASTER_PORT`, which need not be set. The descriptors vary in
//! length, so the callback is called twice: once with every node's length
//! (8 bytes), then with every node's descriptor padded to the longest.
//! Node 0 listens on an ephemeral port of `MESHMEM_HOST_ADDR` for the
//! authenticated connections that carry the group's collectives, and its
//! descriptor names that port.
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
/// When `MESHMEM_SECRET` is set, the group spans hosts and the callback
/// carries the multi-host descriptors instead, in two calls (every node's
/// length as 8 bytes, then every node's descriptor padded to the longest),
/// with no rendezvous server at `MASTER_ADDR:MASTER_PORT`. Node 0 listens
/// on an ephemeral port of `MESHMEM_HOST_ADDR` for the connections that
/// carry the collectives. Nodes of one host still meet on its abstract
/// socket.
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
        if config.hosts.is_some() {
            // SAFETY: the caller vouches for `allgather` and `user`.
            *pool = register(unsafe { join_across_hosts(config, descriptor, allgather, user) }?);
            return Ok(());
        }
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

/// Most bytes one node may pass through the all-gather when the group spans
/// hosts; the same limit as the TCP rendezvous's messages.
const MAX_GATHERED: usize = 16 << 20;

/// Joins a group that spans hosts through the caller's all-gather, which
/// carries the descriptors of [`Pool::join_with_allgather`] in two calls:
/// first every node's length as 8 little-endian bytes, then every node's
/// bytes padded with zeros to the longest.
///
/// # Safety
///
/// `allgather` follows the contract of [`meshmem_allgather_fn`] when called
/// with `user`.
unsafe fn join_across_hosts(
    mut config: Config,
    descriptor: Descriptor,
    allgather: unsafe extern "C" fn(*mut c_void, *const c_void, usize, *mut c_void) -> i32,
    user: *mut c_void,
) -> Outcome<Pool> {
    // Node 0's group id names every host's one-host rendezvous, so a fresh
    // one keeps concurrent groups apart.
    config.group.get_or_insert(descriptor.group);
    let size = descriptor.size as usize;
    let failed_code = std::cell::Cell::new(None);
    let call = |send: &[u8]| -> Result<Vec<u8>, String> {
        let mut recv = vec![0u8; send.len() * size];
        // SAFETY: `send` contains `len` bytes and `recv` has room for
        // `len * size`, as the callback's contract requires. The caller
        // vouches for the function.
        let code = unsafe { allgather(user, send.as_ptr().cast(), send.len(), recv.as_mut_ptr().cast()) };
        if code != 0 {
            failed_code.set(Some(code));
            return Err(format!("it returned {code}"));
        }
        Ok(recv)
    };
    let gather = |mine: &[u8]| -> Result<Vec<Vec<u8>>, String> {
        let lengths = call(&(mine.len() as u64).to_le_bytes())?;
        let lengths: Vec<usize> = lengths
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .map(|n| usize::try_from(n).ok().filter(|&n| n > 0 && n <= MAX_GATHERED))
            .enumerate()
            .map(|(node, n)| n.ok_or_else(|| format!("it returned an invalid length for node {node}; it must gather in rank order")))
            .collect::<Result<_, _>>()?;
        let longest = lengths.iter().copied().max().unwrap_or(mine.len());

        let mut padded = mine.to_vec();
        padded.resize(longest, 0);
        let gathered = call(&padded)?;
        Ok(gathered.chunks_exact(longest).zip(&lengths).map(|(bytes, &len)| bytes[..len].to_vec()).collect())
    };
    Pool::join_with_allgather(config, gather).map_err(|e| match failed_code.get() {
        Some(code) => Failure::new(MESHMEM_ERR_CALLBACK, format!("the all-gather callback returned {code}; the join failed")),
        None => e.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use meshmem_core::launch::netns::SimulatedHosts;
    use meshmem_core::Placement;

    const SCENARIO: &str = "MESHMEM_FFI_TEST_SCENARIO";
    const GATHER_DIR: &str = "MESHMEM_FFI_TEST_GATHER_DIR";
    const SECRET: &str = "ffi simulated hosts test secret";

    /// Calls of the callback so far in this process; each call is a round.
    static ROUND: AtomicUsize = AtomicUsize::new(0);

    fn env_usize(name: &str) -> Option<usize> {
        std::env::var(name).ok()?.parse().ok()
    }

    /// Gathers one round through files in `dir`: writes this node's bytes,
    /// then waits for every node's. Returns `None` on any failure.
    fn gather_round(dir: &Path, round: usize, mine: &[u8]) -> Option<Vec<u8>> {
        let (rank, size) = (env_usize("RANK")?, env_usize("WORLD_SIZE")?);
        let partial = dir.join(format!("{round}-{rank}.partial"));
        std::fs::write(&partial, mine).ok()?;
        std::fs::rename(&partial, dir.join(format!("{round}-{rank}"))).ok()?;

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut gathered = Vec::with_capacity(mine.len() * size);
        for node in 0..size {
            let path = dir.join(format!("{round}-{node}"));
            while !path.exists() {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            gathered.extend(std::fs::read(&path).ok()?);
        }
        Some(gathered)
    }

    /// A `meshmem_allgather_fn` over files in the directory `GATHER_DIR`.
    unsafe extern "C" fn gather_through_files(_user: *mut c_void, send: *const c_void, len: usize, recv: *mut c_void) -> i32 {
        let round = ROUND.fetch_add(1, Ordering::Relaxed);
        let Some(dir) = std::env::var_os(GATHER_DIR) else { return 1 };
        // SAFETY: the library passes `len` readable bytes at `send`.
        let mine = unsafe { std::slice::from_raw_parts(send.cast::<u8>(), len) };
        let Some(gathered) = gather_round(Path::new(&dir), round, mine) else { return 2 };
        let Some(size) = env_usize("WORLD_SIZE") else { return 1 };
        if gathered.len() != len * size {
            return 3;
        }
        // SAFETY: the library passes `len * size` writable bytes at `recv`.
        unsafe { std::ptr::copy_nonoverlapping(gathered.as_ptr(), recv.cast::<u8>(), gathered.len()) };
        0
    }

    /// The body of every node process of `callback_joins_across_hosts`.
    #[test]
    fn node_process() {
        if std::env::var(SCENARIO).as_deref() != Ok("callback") {
            return;
        }
        let mut handle = meshmem_pool::default();
        // SAFETY: null options, a valid callback, and a writable handle.
        let status =
            unsafe { meshmem_join_with_allgather(std::ptr::null(), Some(gather_through_files), std::ptr::null_mut(), &mut handle) };
        // SAFETY: the message is a NUL-terminated string of this thread.
        let message = unsafe { CStr::from_ptr(crate::meshmem_last_error_message()) }.to_string_lossy().into_owned();
        assert_eq!(status, MESHMEM_OK, "join failed: {message}");
        let Ok(pool) = pool(handle) else { panic!("the joined handle is not registered") };

        let me = pool.node();
        let mine = pool.alloc_slice::<u64>(1, Placement::Node(me)).expect("allocate on this node");
        pool.write_slice(mine.addr(), &[100 + me.0 as u64]).expect("write this node's value");
        let addrs = pool.all_gather(&mine.addr().0.to_le_bytes()).expect("gather the allocations");
        pool.barrier().expect("barrier after the writes");
        for (node, bytes) in addrs.iter().enumerate() {
            let addr = meshmem_core::GlobalAddr(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")));
            let mut value = [0u64];
            pool.read_slice(addr, &mut value).expect("read every node's value");
            assert_eq!(value[0], 100 + node as u64, "node {node}'s value");
        }
        pool.barrier().expect("barrier after the reads");
        println!("node {me} done");
        drop(pool);
        assert_eq!(meshmem_leave(handle), MESHMEM_OK);
    }

    /// Kills and reaps the children it holds when dropped.
    struct Children(Vec<Child>);

    impl Drop for Children {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Runs 4 nodes on 2 simulated hosts (network namespaces) that join
    /// through `meshmem_join_with_allgather` with no `MASTER_ADDR` or
    /// `MASTER_PORT`, and read each other's memory.
    #[test]
    fn callback_joins_across_hosts() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("callback_joins_across_hosts NOT RUN: creating network namespaces needs root");
            return;
        }
        let ip = std::process::Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !ip.is_ok_and(|s| s.success()) {
            eprintln!("callback_joins_across_hosts NOT RUN: `ip` (iproute2) is not installed");
            return;
        }

        let dir = std::env::temp_dir().join(format!("meshmem-ffi-gather-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the all-gather directory");
        let log = |rank: usize| -> PathBuf { dir.join(format!("node-{rank}.log")) };
        let set = SimulatedHosts::create(2).expect("create the simulated hosts");
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut children = Children(Vec::new());
        for rank in 0..4 {
            let host = rank / 2;
            let file = std::fs::File::create(log(rank)).expect("create a node's log");
            let mut command = set.command(host, &exe);
            command
                .args(["--exact", "join::tests::node_process", "--nocapture", "--test-threads=1"])
                .env(SCENARIO, "callback")
                .env(GATHER_DIR, &dir)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "4")
                .env("MESHMEM_MESH", "2x2x1")
                .env("MESHMEM_PAGE_SIZE", "64K")
                .env("MESHMEM_NODE_CAPACITY", "4M")
                .env("MESHMEM_WINDOW_SIZE", "1G")
                .env("MESHMEM_JOIN_TIMEOUT_MS", "10000")
                .env("MESHMEM_SECRET", SECRET)
                .env("MESHMEM_HOST_ADDR", set.address(host).to_string())
                .env_remove("MASTER_ADDR")
                .env_remove("MASTER_PORT")
                .env_remove("MESHMEM_GROUP")
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("duplicate the log"))
                .stderr(file);
            children.0.push(command.spawn().expect("start a node process"));
        }

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut statuses = vec![None; 4];
        while statuses.iter().any(Option::is_none) && Instant::now() < deadline {
            for (child, status) in children.0.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    *status = child.try_wait().expect("wait for a node");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(children);
        drop(set);
        let outputs: Vec<String> = (0..4).map(|rank| std::fs::read_to_string(log(rank)).unwrap_or_default()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        let report: String = outputs.iter().enumerate().map(|(rank, o)| format!("--- node {rank}:\n{o}\n")).collect();
        for (rank, status) in statuses.iter().enumerate() {
            assert!(status.is_some_and(|s| s.success()), "node {rank} failed:\n{report}");
            assert!(outputs[rank].contains(&format!("node {rank} done")), "{report}");
        }
        assert!(!report.contains(SECRET), "a node printed the secret");
    }
}
