//! The configuration a node joins with: rank, group size, mesh, geometry
//! and limits, from code or from the launcher's environment.
//!
//! Rank and size come from the first launcher convention present:
//! meshmem's own launcher and torchrun (`RANK`, `WORLD_SIZE`), Open MPI
//! (`OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`) or Slurm
//! (`SLURM_PROCID`, `SLURM_NTASKS`). Everything else has a `MESHMEM_`
//! variable:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MESHMEM_MESH` | mesh shape, `2x2x2` or `4x4x2:torus` | `Nx1x1` for a group of N |
//! | `MESHMEM_GROUP` | group id, names the rendezvous socket | from the launcher's job id |
//! | `MESHMEM_PAGE_SIZE` | page size in bytes (`4K`, `2M`) | 2 MiB |
//! | `MESHMEM_NODE_CAPACITY` | bytes of frames each node contributes | 1 GiB |
//! | `MESHMEM_WINDOW_SIZE` | bytes of address space of the window | 1 TiB |
//! | `MESHMEM_WINDOW_BASE` | window base address (hex), node 0 only | chosen by the kernel |
//! | `MESHMEM_JOIN_TIMEOUT_MS` | how long `join` waits for the group | 60000 |
//!
//! A group spans hosts when `MESHMEM_SECRET` is set. Node 0's rendezvous
//! then listens at `MASTER_ADDR:MASTER_PORT`, which are both required,
//! unless the nodes join through an all-gather callback
//! (`Pool::join_with_allgather`), which needs neither. Each
//! node serves its segment over TCP on `MESHMEM_HOST_ADDR`, 127.0.0.1 by
//! default, which only reaches nodes of the same machine, so set it to an
//! address that the other hosts can reach.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::topology::Mesh3d;

/// Default page size: 2 MiB, the x86-64 and Arm64 huge-page size.
pub const DEFAULT_PAGE_SIZE: usize = 2 << 20;

/// Default bytes of frames per node. The segment is sparse, so capacity
/// that is never touched costs no memory.
pub const DEFAULT_NODE_CAPACITY: u64 = 1 << 30;

/// Default window: 1 TiB of address space, which costs no memory.
pub const DEFAULT_WINDOW_SIZE: u64 = 1 << 40;

/// The smallest page size: the x86-64 base page.
pub const MIN_PAGE_SIZE: usize = 4096;

/// The largest page size: 1 GiB, the largest x86-64 huge page.
pub const MAX_PAGE_SIZE: usize = 1 << 30;

/// The configuration a node joins its group with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's id; from the environment when `None`.
    pub rank: Option<u16>,
    /// Number of nodes; from the environment when `None`.
    pub size: Option<u16>,
    /// Mesh shape; `size x 1 x 1` when `None`.
    pub mesh: Option<Mesh3d>,
    /// Group id; names the rendezvous socket on this host.
    pub group: Option<String>,
    /// Page size in bytes: a power of two from 4 KiB to 1 GiB.
    pub page_size: usize,
    /// Bytes of frames this node contributes; rounded down to whole pages.
    pub node_capacity: u64,
    /// Bytes of address space reserved for the window. Each node's arena
    /// gets the largest power of two of pages that fits its share.
    pub window_size: u64,
    /// The address at which node 0 reserves the window; chosen at join when
    /// `None`.
    pub window_base: Option<u64>,
    /// How long `join` waits for the other nodes.
    pub join_timeout: Duration,
    /// Set when the group spans hosts; `None` keeps every node on this host.
    #[cfg(feature = "tcp")]
    pub hosts: Option<HostsConfig>,
}

/// Settings of a node in a group that spans hosts.
#[cfg(feature = "tcp")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsConfig {
    /// Node 0's rendezvous: `MASTER_ADDR:MASTER_PORT`. `None` when both are
    /// unset, which only a join through an all-gather callback accepts.
    pub master: Option<std::net::SocketAddr>,
    /// The address this node's TCP server listens on; other hosts reach the
    /// node's segment there.
    pub host_addr: std::net::IpAddr,
    /// The group's secret, which authenticates the rendezvous, the
    /// collectives and every TCP request.
    pub secret: crate::transport::tcp::Secret,
}

#[cfg(feature = "tcp")]
impl HostsConfig {
    /// Reads `MESHMEM_SECRET`, `MASTER_ADDR`, `MASTER_PORT` and
    /// `MESHMEM_HOST_ADDR`; `None` when no secret is set.
    pub fn from_env() -> Result<Option<HostsConfig>> {
        use std::net::ToSocketAddrs;

        let Some(secret) = crate::transport::tcp::Secret::from_env()? else { return Ok(None) };
        let master = match (env("MASTER_ADDR"), env("MASTER_PORT")) {
            (None, None) => None,
            (Some(addr), Some(port)) => {
                let port: u16 = port.trim().parse().map_err(|_| invalid("MASTER_PORT", &port, "not a port number"))?;
                let master = (addr.trim(), port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .ok_or_else(|| invalid("MASTER_ADDR", &addr, "not an address or a name that resolves"))?;
                Some(master)
            }
            (addr, _) => {
                let (name, other) = if addr.is_some() { ("MASTER_PORT", "MASTER_ADDR") } else { ("MASTER_ADDR", "MASTER_PORT") };
                return Err(invalid(
                    name,
                    "unset",
                    format!("{other} is set and MESHMEM_SECRET too, so the group spans hosts; set MASTER_ADDR and MASTER_PORT to node 0's address and a free port"),
                ));
            }
        };
        let host_addr = match env("MESHMEM_HOST_ADDR") {
            Some(text) => text
                .trim()
                .parse()
                .map_err(|_| invalid("MESHMEM_HOST_ADDR", &text, "not an IP address; give the address other hosts reach this one at"))?,
            None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        };
        Ok(Some(HostsConfig { master, host_addr, secret }))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rank: None,
            size: None,
            mesh: None,
            group: None,
            page_size: DEFAULT_PAGE_SIZE,
            node_capacity: DEFAULT_NODE_CAPACITY,
            window_size: DEFAULT_WINDOW_SIZE,
            window_base: None,
            join_timeout: Duration::from_secs(60),
            #[cfg(feature = "tcp")]
            hosts: None,
        }
    }
}

/// A configuration with every value settled and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub rank: u16,
    pub size: u16,
    pub mesh: Mesh3d,
    pub group: String,
    pub page_size: u64,
    pub frame_count: u64,
    pub window_size: u64,
    pub arena_pages: u64,
    pub window_base: Option<u64>,
    pub join_timeout: Duration,
    #[cfg(feature = "tcp")]
    pub hosts: Option<HostsConfig>,
}

fn invalid(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Error {
    Error::InvalidConfig { name, value: value.to_string(), reason: reason.into() }
}

/// Parses a byte count with an optional binary suffix: `4096`, `4K`, `2M`,
/// `1G`, `1T` (also `KiB`, `MiB`, `GiB`, `TiB`).
pub fn parse_bytes(name: &'static str, text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let digits = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &trimmed[digits.len()..];
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid(name, text, "unknown unit; use a byte count with an optional K, M, G or T suffix")),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| invalid(name, text, "not a byte count; use a whole number with an optional K, M, G or T suffix"))?;
    value.checked_shl(shift).filter(|v| v >> shift == value).ok_or_else(|| invalid(name, text, "too large"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_u16(name: &'static str) -> Result<Option<u16>> {
    env(name)
        .map(|v| v.trim().parse::<u16>().map_err(|_| invalid(name, &v, "not a whole number from 0 to 65535")))
        .transpose()
}

impl Config {
    /// Reads rank, size, mesh, group and limits from the environment; see the
    /// module documentation for the variables.
    pub fn from_env() -> Result<Config> {
        let mut config = Config::default();
        for (rank, size) in [
            ("RANK", "WORLD_SIZE"),
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
            ("SLURM_PROCID", "SLURM_NTASKS"),
        ] {
            if let Some(r) = env_u16(rank)? {
                config.rank = Some(r);
                config.size = env_u16(size)?;
                break;
            }
        }
        if let Some(mesh) = env("MESHMEM_MESH") {
            config.mesh = Some(mesh.parse()?);
        }
        config.group = env("MESHMEM_GROUP").or_else(|| {
            if let Some(port) = env("MASTER_PORT") {
                Some(format!("torch-{}-{port}", env("MASTER_ADDR").unwrap_or_default()))
            } else if let Some(job) = env("SLURM_JOB_ID") {
                Some(format!("slurm-{job}.{}", env("SLURM_STEP_ID").unwrap_or_default()))
            } else {
                env("OMPI_MCA_orte_ess_jobid").map(|job| format!("ompi-{job}"))
            }
        });
        if let Some(v) = env("MESHMEM_PAGE_SIZE") {
            config.page_size = parse_bytes("MESHMEM_PAGE_SIZE", &v)? as usize;
        }
        if let Some(v) = env("MESHMEM_NODE_CAPACITY") {
            config.node_capacity = parse_bytes("MESHMEM_NODE_CAPACITY", &v)?;
        }
        if let Some(v) = env("MESHMEM_WINDOW_SIZE") {
            config.window_size = parse_bytes("MESHMEM_WINDOW_SIZE", &v)?;
        }
        if let Some(v) = env("MESHMEM_WINDOW_BASE") {
            let digits = v.trim().trim_start_matches("0x");
            config.window_base = Some(
                u64::from_str_radix(digits, 16)
                    .map_err(|_| invalid("MESHMEM_WINDOW_BASE", &v, "not a hexadecimal address"))?,
            );
        }
        if let Some(v) = env("MESHMEM_JOIN_TIMEOUT_MS") {
            let ms: u64 = v
                .trim()
                .parse()
                .map_err(|_| invalid("MESHMEM_JOIN_TIMEOUT_MS", &v, "not a whole number of milliseconds"))?;
            config.join_timeout = Duration::from_millis(ms);
        }
        #[cfg(feature = "tcp")]
        {
            config.hosts = HostsConfig::from_env()?;
        }
        Ok(config)
    }

    /// Settles defaults and checks every value against its limits.
    pub(crate) fn resolve(&self) -> Result<Resolved> {
        let size = match (self.size, self.mesh) {
            (Some(size), _) => size,
            (None, Some(mesh)) => mesh.len() as u16,
            (None, None) => 1,
        };
        if size == 0 {
            return Err(invalid("size", 0, "a group has at least one node"));
        }
        let rank = self.rank.unwrap_or(0);
        if self.rank.is_none() && size > 1 {
            return Err(invalid(
                "rank",
                "unset",
                "a group of more than one node needs each node's rank; set RANK or start the nodes with `meshmem run`",
            ));
        }
        let mesh = match self.mesh {
            Some(mesh) => mesh,
            None => Mesh3d::new([size, 1, 1], false)?,
        };
        if mesh.len() != size as usize {
            return Err(Error::MeshSizeMismatch { mesh, mesh_nodes: mesh.len(), group_size: size as usize });
        }
        if rank >= size {
            return Err(Error::NodeOutOfRange { node: rank as u32, nodes: size as usize, mesh });
        }

        let page_size = self.page_size;
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(invalid(
                "page_size",
                page_size,
                format!("must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} bytes"),
            ));
        }
        let os_page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as usize;
        if page_size < os_page {
            return Err(invalid("page_size", page_size, format!("is below the system page size of {os_page} bytes")));
        }
        let page_size = page_size as u64;
        let frame_count = self.node_capacity / page_size;
        if frame_count == 0 {
            return Err(invalid(
                "node_capacity",
                self.node_capacity,
                format!("is less than one page of {page_size} bytes"),
            ));
        }
        if frame_count > u32::MAX as u64 {
            return Err(invalid("node_capacity", self.node_capacity, "holds more than 2^32 frames; raise the page size"));
        }
        // A power of two, so that finding a page's arena is a shift.
        let arena_pages = match self.window_size / page_size / size as u64 {
            0 => 0,
            pages => 1u64 << (63 - pages.leading_zeros()),
        };
        if arena_pages == 0 {
            return Err(invalid(
                "window_size",
                self.window_size,
                format!("gives less than one page per node for {size} nodes of {page_size}-byte pages"),
            ));
        }
        if arena_pages > u32::MAX as u64 {
            return Err(invalid("window_size", self.window_size, "gives a node more than 2^32 pages; raise the page size"));
        }
        let group = match &self.group {
            Some(group) => group.clone(),
            None if size == 1 => format!("solo-{}", std::process::id()),
            None => format!("meshmem-{}", nix::unistd::getuid()),
        };
        if group.is_empty() || group.len() > 90 || group.contains('\0') {
            return Err(invalid("group", &group, "must be 1 to 90 bytes without NUL"));
        }
        Ok(Resolved {
            rank,
            size,
            mesh,
            group,
            page_size,
            frame_count,
            window_size: arena_pages * size as u64 * page_size,
            arena_pages,
            window_base: self.window_base,
            join_timeout: self.join_timeout,
            #[cfg(feature = "tcp")]
            hosts: self.hosts.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_parse_with_units() {
        assert_eq!(parse_bytes("x", "4096").unwrap(), 4096);
        assert_eq!(parse_bytes("x", "4K").unwrap(), 4096);
        assert_eq!(parse_bytes("x", "2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("x", "1g").unwrap(), 1 << 30);
        for bad in ["", "K", "1.5G", "12Q", "99999999999T"] {
            let err = parse_bytes("MESHMEM_NODE_CAPACITY", bad).unwrap_err().to_string();
            assert!(err.contains("MESHMEM_NODE_CAPACITY"), "{err}");
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn mesh_size_mismatch_is_rejected() {
        let config = Config { rank: Some(0), size: Some(4), mesh: Some("2x2x2".parse().unwrap()), ..Config::default() };
        let err = config.resolve().unwrap_err();
        assert!(matches!(err, Error::MeshSizeMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("2x2x2"), "{text}");
        assert!(text.contains("8 nodes"), "{text}");
        assert!(text.contains("group has 4"), "{text}");
    }

    #[test]
    fn rank_outside_mesh_is_rejected() {
        let config = Config { rank: Some(8), size: Some(8), mesh: Some("2x2x2".parse().unwrap()), ..Config::default() };
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("node 8"), "{err}");
        assert!(err.contains("2x2x2"), "{err}");
    }

    #[test]
    fn bad_page_sizes_are_rejected() {
        for page_size in [0, 1000, 2048, 3 << 20, 2 << 30] {
            let config = Config { page_size, ..Config::default() };
            let err = config.resolve().unwrap_err().to_string();
            assert!(err.contains("page_size"), "{err}");
            assert!(err.contains(&page_size.to_string()), "{err}");
        }
    }

    #[test]
    fn capacity_below_a_page_is_rejected() {
        let config = Config { node_capacity: 4096, ..Config::default() };
        let err = config.resolve().unwrap_err().to_string();
        assert!(err.contains("node_capacity"), "{err}");
        assert!(err.contains("4096"), "{err}");
    }

    #[test]
    fn defaults_resolve_to_one_node() {
        let resolved = Config::default().resolve().unwrap();
        assert_eq!((resolved.rank, resolved.size), (0, 1));
        assert_eq!(resolved.mesh.dims, [1, 1, 1]);
        assert_eq!(resolved.frame_count, 512);
        assert_eq!(resolved.arena_pages, 1 << 19);
    }
}
