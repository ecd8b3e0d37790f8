//! Joining a group that spans hosts.
//!
//! Nodes on one host still share memory: they pass their segments over the
//! one-host rendezvous and use plain loads and stores. Nodes on other hosts
//! are reached through this node's TCP transport, with the same page table
//! and the same addresses. Their pages stay `PROT_NONE` in this process's
//! window, so callers use `Pool::read` and `Pool::write` on them.
//!
//! The join runs in six phases:
//!
//! 1. Create and initialise this node's segment, and serve it over TCP on
//!    the host address (`MESHMEM_HOST_ADDR`).
//! 2. Node 0 reserves the window; its base goes into node 0's descriptor.
//! 3. Gather every node's descriptor (geometry, host, TCP endpoint) at
//!    `MASTER_ADDR:MASTER_PORT`, authenticated with the group's secret, and
//!    check the table.
//! 4. Every other node reserves the window at node 0's base.
//! 5. The nodes of each host run the one-host rendezvous among themselves,
//!    served by the lowest rank of the host, under the group id with a hash
//!    of the host identity appended, and map each other's segments.
//! 6. Every node reports the outcome of phases 4 and 5 over the
//!    collectives' TCP star, so every node returns the same outcome.
//!
//! The authenticated connections of phase 3 stay open as the star around
//! node 0 that carries the group's collectives.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Parts;
use crate::config::{HostsConfig, Resolved};
use crate::error::{Error, Result};
use crate::layout::SegmentLayout;
use crate::space::Window;
use crate::topology::NodeId;
use crate::transport::hosts::{self, Descriptor, RendezvousConfig};
use crate::transport::rendezvous::{self, Group, Hello, PROTOCOL};
use crate::transport::select::{self, Placement, Preference};
use crate::transport::shm::{Segment, ShmTransport};
use crate::transport::tcp::{Served, ServerConfig, TcpServer, TcpTransport, Timeouts};
use crate::transport::{Transport, TransportKind};

/// Names the error of a step by the group, as the one-host join does.
fn in_group(group: &str, error: Error) -> Error {
    match error {
        Error::Join { group: g, reason, source } if g.is_empty() => Error::Join { group: group.to_string(), reason, source },
        other => other,
    }
}

/// Returns the one-host rendezvous name of `group` on `host`: the group id
/// and a 32-bit FNV-1a hash of the host identity. The name then fits the
/// abstract socket's 107 bytes for a group id of up to 90 bytes.
fn local_group(group: &str, host: &str) -> String {
    let hash = host.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("{group}@{hash:08x}")
}

/// Joins the group across hosts; see the module docs for the phases.
pub(super) fn join(resolved: &Resolved, config: &HostsConfig) -> Result<Parts> {
    let me = NodeId(resolved.rank);
    let size = resolved.size as usize;
    let layout = SegmentLayout::new(size as u64, resolved.page_size, resolved.frame_count, resolved.arena_pages);

    // Phase 1: our segment is complete before anyone can reach it.
    let own = Arc::new(Segment::create(me, layout.len)?);
    // SAFETY: the segment was just created with `layout.len` bytes and no
    // other process or thread can reach it yet.
    unsafe { layout.initialise(own.as_ptr(), me) };
    let server = TcpServer::start(ServerConfig {
        node: me,
        bind: SocketAddr::new(config.host_addr, 0),
        secret: config.secret.clone(),
        segments: vec![Served::segment(own.clone())],
        timeouts: Timeouts::default(),
    })?;

    // Phase 2.
    let mut window = match me.0 {
        0 => Some(Window::reserve(resolved.window_base, resolved.window_size, resolved.page_size)?),
        _ => None,
    };

    // Phase 3.
    let hello = Hello {
        protocol: PROTOCOL,
        rank: resolved.rank,
        size: resolved.size,
        mesh: resolved.mesh.to_string(),
        page_size: resolved.page_size,
        window_size: resolved.window_size,
        segment_len: layout.len,
        pid: std::process::id(),
    };
    let host = select::host_id();
    let mine = Descriptor {
        hello: hello.clone(),
        host: host.clone(),
        tcp: Some(server.local_addr()),
        rdma: None,
        window_base: window.as_ref().map(Window::base),
    };
    let rendezvous = RendezvousConfig {
        addr: config.master,
        secret: config.secret.clone(),
        rank: resolved.rank,
        size: resolved.size,
        timeout: resolved.join_timeout,
    };
    let (table, streams) =
        hosts::all_gather_connected(&rendezvous, &mine.encode()).map_err(|e| in_group(&resolved.group, e))?;
    let table = hosts::check_table(&table, resolved.size).map_err(|e| in_group(&resolved.group, e))?;
    let group = Group::over_tcp(&resolved.group, resolved.rank, resolved.size, streams);

    // Phases 4 and 5, whose outcome every node learns in phase 6.
    let joined = map_host(resolved, &layout, &table, &host, &hello, own.clone(), &mut window);
    let outcome = match &joined {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().into_bytes(),
    };
    let outcomes = group.all_gather("join", &outcome)?;
    let (segments, pids) = joined?;
    if let Some((node, reason)) = outcomes.iter().enumerate().find(|(_, o)| !o.is_empty()) {
        return Err(Error::Join {
            group: resolved.group.clone(),
            reason: format!("node {node} could not join: {}", String::from_utf8_lossy(reason)),
            source: None,
        });
    }
    let window = window.ok_or_else(|| Error::Join {
        group: resolved.group.clone(),
        reason: "the window was not reserved".into(),
        source: None,
    })?;

    // Route every node to the backend the plan selects.
    let placements: Vec<Placement> =
        table.iter().map(|d| Placement { host: d.host.clone(), rdma: d.rdma.is_some() }).collect();
    let plan = select::plan(&placements, Preference::from_env()?)?;
    let shm: Arc<dyn Transport> = Arc::new(ShmTransport::partial(me, segments, layout));
    let peers = table.iter().enumerate().filter(|&(n, _)| n != me.index()).filter_map(|(n, d)| Some((NodeId(n as u16), d.tcp?)));
    let tcp: Arc<dyn Transport> =
        Arc::new(TcpTransport::new(me, config.secret.clone(), Timeouts::default(), peers).with_counters(own, layout));
    let routes = plan[me.index()]
        .iter()
        .enumerate()
        .map(|(node, kind)| match kind {
            TransportKind::Shm => Ok(shm.clone()),
            TransportKind::Tcp => Ok(tcp.clone()),
            other => Err(Error::InvalidConfig {
                name: select::TRANSPORT_ENV,
                value: other.to_string(),
                reason: format!("the pool does not carry {other} between nodes {me} and {node} yet; use `tcp`"),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    let kinds: Vec<String> = plan[me.index()].iter().map(TransportKind::to_string).collect();
    tracing::info!(node = %me, %host, routes = ?kinds, "routes across hosts");

    Ok(Parts {
        me,
        mesh: resolved.mesh,
        layout,
        group,
        transport: Arc::new(select::Routed::new(me, routes)),
        plan,
        server: Some(server),
        window,
        pids,
    })
}

/// Phases 4 and 5: reserves the window at node 0's base (node 0 has it
/// already) and maps the segments of this host's nodes. Returns every
/// node's segment (`None` on other hosts) and process id (0 on other hosts,
/// where a process id means nothing to this one).
#[allow(clippy::type_complexity)]
fn map_host(
    resolved: &Resolved,
    layout: &SegmentLayout,
    table: &[Descriptor],
    host: &str,
    hello: &Hello,
    own: Arc<Segment>,
    window: &mut Option<Window>,
) -> Result<(Vec<Option<Arc<Segment>>>, Vec<u32>)> {
    let missing_base = || Error::Join {
        group: resolved.group.clone(),
        reason: "node 0's descriptor carries no window base".into(),
        source: None,
    };
    let base = table[0].window_base.ok_or_else(missing_base)?;
    if window.is_none() {
        *window = Some(Window::reserve(Some(base), resolved.window_size, resolved.page_size)?);
    }

    // Nodes of this host, in rank order; the first serves the rendezvous.
    let local: Vec<usize> = table.iter().enumerate().filter(|(_, d)| d.host == host).map(|(n, _)| n).collect();
    let index = local.iter().position(|&n| n == resolved.rank as usize).ok_or_else(|| Error::Join {
        group: resolved.group.clone(),
        reason: format!("node {}'s descriptor does not name this host `{host}`", resolved.rank),
        source: None,
    })?;
    let local_hello = Hello { rank: index as u16, size: local.len() as u16, ..hello.clone() };
    let name = local_group(&resolved.group, host);
    let joined = rendezvous::join(&name, &local_hello, own.fd(), resolved.join_timeout, |_| Ok(base))?;
    if joined.window_base != base {
        return Err(Error::Join {
            group: name,
            reason: format!(
                "this host's rendezvous reports the window at {:#x}, node 0 at {base:#x}",
                joined.window_base
            ),
            source: None,
        });
    }

    let mut segments: Vec<Option<Arc<Segment>>> = (0..table.len()).map(|_| None).collect();
    let mut pids = vec![0u32; table.len()];
    segments[resolved.rank as usize] = Some(own);
    for ((&node, fd), &pid) in local.iter().zip(joined.segments).zip(&joined.pids) {
        pids[node] = pid;
        let Some(fd) = fd else { continue };
        let segment = Segment::open(fd)?;
        if segment.len() != layout.len {
            return Err(Error::ConfigMismatch {
                node: NodeId(node as u16),
                field: "segment length",
                expected: layout.len.to_string(),
                found: segment.len().to_string(),
            });
        }
        segments[node] = Some(Arc::new(segment));
    }
    Ok((segments, pids))
}
