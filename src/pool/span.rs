//! Joining a group that spans hosts.
//!
//! Nodes on one host still share memory: they pass their segments over the
//! one-host rendezvous and use plain loads and stores. Nodes on other hosts
//! are reached through RDMA where both ends have a device and the `rdma`
//! feature is built, and through this node's TCP transport otherwise, with
//! the same page table and the same addresses. Their pages stay `PROT_NONE`
//! in this process's window, so callers use `Pool::read` and `Pool::write`
//! on them.
//!
//! The join runs in six phases:
//!
//! 1. Create and initialise this node's segment, and serve it over TCP on
//!    the host address (`MESHMEM_HOST_ADDR`). With the `rdma` feature, also
//!    open the host's first RDMA device, register the segment and create a
//!    queue pair for every other node. A node without a usable device
//!    carries on without RDMA and logs why at debug level.
//! 2. Node 0 reserves the window; its base goes into node 0's descriptor.
//!    Joining through the caller's all-gather, node 0 also listens for the
//!    collectives' star on an ephemeral port of its host address.
//! 3. Gather every node's descriptor (geometry, host, TCP endpoint, RDMA
//!    endpoint) and check the table. The descriptors travel either through
//!    the rendezvous at `MASTER_ADDR:MASTER_PORT`, authenticated with the
//!    group's secret, or through the caller's all-gather. After the
//!    caller's all-gather, every node connects to node 0's star listener,
//!    named in node 0's descriptor, with the same authentication, and checks
//!    that node 0 received the same table.
//! 4. Every other node reserves the window at node 0's base. Each pair that
//!    the plan puts on RDMA connects its queue pairs (Init, Ready to
//!    Receive, Ready to Send) to the peer's endpoint.
//! 5. The nodes of each host run the one-host rendezvous among themselves,
//!    served by the lowest rank of the host, under node 0's group id with a
//!    hash of the host identity appended, and map each other's segments.
//! 6. Every node reports the outcome of phases 4 and 5 over the
//!    collectives' TCP star, so every node returns the same outcome. No
//!    node issues an RDMA operation before this point, so every queue pair
//!    is ready at both ends before it carries traffic.
//!
//! The authenticated connections of phase 3 stay open as the star around
//! node 0 that carries the group's collectives.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use super::Parts;
use crate::config::{HostsConfig, Resolved};
use crate::error::{Error, Result};
use crate::layout::SegmentLayout;
use crate::space::Window;
use crate::topology::NodeId;
use crate::transport::hosts::{self, Descriptor, RendezvousConfig, RendezvousServer};
use crate::transport::rendezvous::{self, Group, Hello};
use crate::transport::select::{self, Placement, Preference};
use crate::transport::shm::{Segment, ShmTransport};
use crate::transport::tcp::{Served, ServerConfig, TcpServer, TcpTransport, Timeouts};
use crate::transport::{Transport, TransportKind};

/// An all-gather the caller provides: takes this node's bytes and returns
/// every node's bytes in rank order, or a message saying why it failed.
pub(super) type AllGather<'a> = dyn FnMut(&[u8]) -> std::result::Result<Vec<Vec<u8>>, String> + 'a;

/// This node's RDMA transport. Without the `rdma` feature no value exists.
#[cfg(feature = "rdma")]
type Rdma = crate::transport::rdma::RdmaTransport;
#[cfg(not(feature = "rdma"))]
type Rdma = std::convert::Infallible;

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

/// Joins the group across hosts, gathering the descriptors through
/// `allgather` when given; see the module docs for the phases.
pub(super) fn join(resolved: &Resolved, config: &HostsConfig, allgather: Option<&mut AllGather<'_>>) -> Result<Parts> {
    let me = NodeId(resolved.rank);
    let preference = Preference::from_env()?;
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
    let mut rdma = open_rdma(me, &own, layout, preference);

    // Phase 2.
    let mut window = match me.0 {
        0 => Some(Window::reserve(resolved.window_base, resolved.window_size, resolved.page_size)?),
        _ => None,
    };
    let rendezvous = |addr| RendezvousConfig {
        addr,
        secret: config.secret.clone(),
        rank: resolved.rank,
        size: resolved.size,
        timeout: resolved.join_timeout,
    };
    let star = match (&allgather, me.0) {
        (Some(_), 0) => Some(RendezvousServer::bind(rendezvous(SocketAddr::new(config.host_addr, 0)))?),
        _ => None,
    };

    // Phase 3.
    let hello = Hello::new(resolved, layout.len);
    let host = select::host_id();
    let mine = Descriptor {
        hello: hello.clone(),
        host: host.clone(),
        tcp: Some(server.local_addr()),
        rdma: rdma.as_ref().map(endpoint),
        window_base: window.as_ref().map(Window::base),
        group: (me.0 == 0).then(|| resolved.group.clone()),
        collectives: star.as_ref().map(RendezvousServer::local_addr).transpose()?,
    }
    .encode();
    let gathered = match allgather {
        Some(allgather) => gather_through(allgather, star, &rendezvous, &mine),
        None => match config.master {
            Some(master) => hosts::all_gather_connected(&rendezvous(master), &mine),
            None => Err(Error::InvalidConfig {
                name: "MASTER_ADDR",
                value: "unset".into(),
                reason: "MESHMEM_SECRET is set, so the group spans hosts; set MASTER_ADDR and MASTER_PORT to node 0's address and a free port, or join through an all-gather callback".into(),
            }),
        },
    };
    let (table, streams) = gathered.map_err(|e| in_group(&resolved.group, e))?;
    let table = hosts::check_table(&table, resolved.size).map_err(|e| in_group(&resolved.group, e))?;
    let group_name = table[0].group.clone().unwrap_or_else(|| resolved.group.clone());
    let group = Group::over_tcp(&group_name, resolved.rank, resolved.size, streams);

    // Every node computes the same plan from the same table.
    let placements: Vec<Placement> =
        table.iter().map(|d| Placement { host: d.host.clone(), rdma: d.rdma.is_some() }).collect();
    let plan = select::plan(&placements, preference)?;
    log_pairs_without_rdma(me, &table, &plan, preference);

    // Phases 4 and 5, whose outcome every node learns in phase 6.
    let joined = map_host(resolved, &group_name, &layout, &table, &host, &hello, own.clone(), &mut window)
        .and_then(|mapped| connect_rdma(rdma.as_mut(), me, &plan[me.index()], &table).map(|()| mapped));
    let outcome = match &joined {
        Ok(_) => Vec::new(),
        Err(e) => e.to_string().into_bytes(),
    };
    let outcomes = group.all_gather("join", &outcome)?;
    let (segments, pids) = joined?;
    if let Some((node, reason)) = outcomes.iter().enumerate().find(|(_, o)| !o.is_empty()) {
        return Err(Error::Join {
            group: group_name.clone(),
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
    let shm: Arc<dyn Transport> = Arc::new(ShmTransport::partial(me, segments, layout));
    let peers = table.iter().enumerate().filter(|&(n, _)| n != me.index()).filter_map(|(n, d)| Some((NodeId(n as u16), d.tcp?)));
    let tcp: Arc<dyn Transport> =
        Arc::new(TcpTransport::new(me, config.secret.clone(), Timeouts::default(), peers).with_counters(own, layout));
    let rdma: Option<Arc<dyn Transport>> = rdma.map(into_transport);
    let routes = plan[me.index()]
        .iter()
        .enumerate()
        .map(|(node, kind)| match (kind, &rdma) {
            (TransportKind::Shm, _) => Ok(shm.clone()),
            (TransportKind::Tcp, _) => Ok(tcp.clone()),
            (TransportKind::Rdma, Some(rdma)) => Ok(rdma.clone()),
            (other, _) => Err(Error::InvalidConfig {
                name: select::TRANSPORT_ENV,
                value: other.to_string(),
                reason: format!("node {me} has no {other} transport to carry its operations on node {node}; use `auto` or `tcp`"),
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

/// Runs phase 3 through the caller's all-gather. Gathers the table with
/// `allgather`, then builds the collectives' star around node 0, which
/// listens on `star`, and checks that node 0 received the same table.
fn gather_through(
    allgather: &mut AllGather<'_>,
    star: Option<RendezvousServer>,
    rendezvous: &dyn Fn(SocketAddr) -> RendezvousConfig,
    mine: &[u8],
) -> Result<(Vec<Vec<u8>>, Vec<Option<TcpStream>>)> {
    let failed = |reason: String| Error::Join { group: String::new(), reason, source: None };
    let table = allgather(mine).map_err(|e| failed(format!("the all-gather callback failed: {e}")))?;
    let config = rendezvous(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0));
    hosts::check_table(&table, config.size)?;

    let (received, streams) = match star {
        Some(server) => server.gather_connected(mine)?,
        None => {
            let node0 = Descriptor::decode(&table[0], NodeId(0))?;
            let addr = node0.collectives.ok_or_else(|| {
                failed("node 0's descriptor names no collectives listener; join every node through the all-gather callback".into())
            })?;
            let (received, stream) = hosts::join_connected(&rendezvous(addr), mine)
                .map_err(|e| failed(format!("connecting to node 0's collectives listener at {addr}, named in its descriptor, failed: {e}")))?;
            let mut streams: Vec<Option<TcpStream>> = (0..config.size).map(|_| None).collect();
            streams[0] = Some(stream);
            (received, streams)
        }
    };
    if let Some(rank) = (0..table.len()).find(|&r| received.get(r) != Some(&table[r])) {
        return Err(failed(format!(
            "the all-gather callback returned other bytes for node {rank} than node {rank} sent to node 0; it must return every node's bytes unchanged, in rank order"
        )));
    }
    Ok((table, streams))
}

/// Phase 1's RDMA part: opens the device and prepares a queue pair per
/// peer, or logs at debug level why this node goes without RDMA.
#[cfg(feature = "rdma")]
fn open_rdma(me: NodeId, own: &Arc<Segment>, layout: SegmentLayout, preference: Preference) -> Option<Rdma> {
    if let Preference::Force(kind @ (TransportKind::Tcp | TransportKind::Shm)) = preference {
        tracing::debug!(node = %me, "RDMA not used: {} = `{kind}`", select::TRANSPORT_ENV);
        return None;
    }
    match Rdma::for_segment(me, own.clone(), layout.nodes as usize) {
        Ok(transport) => Some(transport.with_counters(layout)),
        // A forced `rdma` fails the join, so the reason must be visible.
        Err(e) if preference == Preference::Force(TransportKind::Rdma) => {
            tracing::warn!(node = %me, error = %e, "{} = `rdma`, but this node has no usable RDMA device", select::TRANSPORT_ENV);
            None
        }
        Err(e) => {
            tracing::debug!(node = %me, error = %e, "RDMA not used: no usable RDMA device; other hosts are reached over TCP");
            None
        }
    }
}

#[cfg(not(feature = "rdma"))]
fn open_rdma(me: NodeId, _own: &Arc<Segment>, _layout: SegmentLayout, _preference: Preference) -> Option<Rdma> {
    tracing::debug!(node = %me, "RDMA not used: this build lacks the `rdma` feature; other hosts are reached over TCP");
    None
}

/// Returns the RDMA endpoint this node publishes in its descriptor.
#[cfg(feature = "rdma")]
fn endpoint(rdma: &Rdma) -> Vec<u8> {
    rdma.endpoint().encode()
}

#[cfg(not(feature = "rdma"))]
fn endpoint(rdma: &Rdma) -> Vec<u8> {
    match *rdma {}
}

#[cfg(feature = "rdma")]
fn into_transport(rdma: Rdma) -> Arc<dyn Transport> {
    Arc::new(rdma)
}

#[cfg(not(feature = "rdma"))]
fn into_transport(rdma: Rdma) -> Arc<dyn Transport> {
    match rdma {}
}

/// Logs at debug level each node on another host that the plan reaches
/// over TCP, and why not over RDMA.
fn log_pairs_without_rdma(me: NodeId, table: &[Descriptor], plan: &[Vec<TransportKind>], preference: Preference) {
    let mine = &table[me.index()];
    for (node, descriptor) in table.iter().enumerate() {
        if plan[me.index()][node] != TransportKind::Tcp || descriptor.host == mine.host {
            continue;
        }
        let reason = if preference != Preference::Auto {
            format!("{} = `{preference}`", select::TRANSPORT_ENV)
        } else if !cfg!(feature = "rdma") {
            "this build lacks the `rdma` feature".to_string()
        } else if mine.rdma.is_none() {
            format!("node {me} has no usable RDMA device")
        } else {
            format!("node {node} published no RDMA endpoint")
        };
        tracing::debug!(node = %me, peer = node, "RDMA not used to this peer: {reason}; it is reached over TCP");
    }
}

/// Phase 4's RDMA part: connects the queue pair of every pair that `row`
/// (this node's row of the plan) puts on RDMA to the peer's endpoint.
// NOTE: no group has joined over RDMA hardware yet. This path is compiled
// and its parts are unit-tested, but it has never run on a device.
#[cfg(feature = "rdma")]
fn connect_rdma(mut rdma: Option<&mut Rdma>, me: NodeId, row: &[TransportKind], table: &[Descriptor]) -> Result<()> {
    use crate::transport::rdma::Endpoint;

    for (node, descriptor) in table.iter().enumerate().filter(|&(n, _)| row[n] == TransportKind::Rdma) {
        let peer = NodeId(node as u16);
        let failed = |reason: String| Error::Join { group: String::new(), reason, source: None };
        let Some(transport) = rdma.as_deref_mut() else {
            return Err(failed(format!("the plan puts node {me} to node {peer} on RDMA, but node {me} opened no device")));
        };
        let bytes = descriptor.rdma.as_deref().ok_or_else(|| failed(format!("node {peer}'s descriptor carries no RDMA endpoint")))?;
        let remote = Endpoint::decode(bytes).map_err(|e| failed(format!("node {peer}'s RDMA endpoint is malformed: {e}")))?;
        transport.connect(peer, &remote)?;
    }
    Ok(())
}

#[cfg(not(feature = "rdma"))]
fn connect_rdma(rdma: Option<&mut Rdma>, _me: NodeId, _row: &[TransportKind], _table: &[Descriptor]) -> Result<()> {
    match rdma {
        Some(rdma) => match *rdma {},
        None => Ok(()),
    }
}

/// Phases 4 and 5: reserves the window at node 0's base (node 0 has it
/// already) and maps the segments of this host's nodes. Returns every
/// node's segment (`None` on other hosts) and process id (0 on other hosts,
/// where a process id means nothing to this one).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn map_host(
    resolved: &Resolved,
    group: &str,
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
    let name = local_group(group, host);
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
