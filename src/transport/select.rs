//! Per-pair transport selection, and the transport that routes each
//! operation to the backend selected for its destination.
//!
//! For every pair of nodes: shared memory when both sit on one host, else
//! RDMA when both have a usable RDMA device and the `rdma` feature is built,
//! else TCP. `MESHMEM_TRANSPORT` (`auto`, `shm`, `tcp` or `rdma`) forces one
//! kind for every pair of distinct nodes, even on one host, which lets tests
//! run TCP without a second host. Forcing `shm` across hosts or `rdma`
//! without a device fails naming the pair. A node always reaches itself
//! through shared memory.
//!
//! A host is identified by the boot id of its kernel and the inode of the
//! network namespace the process runs in, so two network namespaces of one
//! machine count as two hosts. Their abstract Unix sockets, which the
//! one-host rendezvous uses, are separate too. `MESHMEM_HOST_ID` overrides
//! the identity.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::topology::NodeId;
use crate::transport::{Completion, LocalView, Op, Transport, TransportKind};

/// Environment variable that forces the transport between hosts.
pub const TRANSPORT_ENV: &str = "MESHMEM_TRANSPORT";

/// Environment variable that overrides this process's host identity.
pub const HOST_ID_ENV: &str = "MESHMEM_HOST_ID";

/// The configured choice of transport between hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preference {
    /// Shared memory on a host, RDMA between hosts that both have a device,
    /// TCP otherwise.
    #[default]
    Auto,
    /// This kind for every pair of distinct nodes.
    Force(TransportKind),
}

impl FromStr for Preference {
    type Err = Error;

    fn from_str(text: &str) -> Result<Preference> {
        Ok(match text.trim() {
            "" | "auto" => Preference::Auto,
            "shm" => Preference::Force(TransportKind::Shm),
            "tcp" => Preference::Force(TransportKind::Tcp),
            "rdma" => Preference::Force(TransportKind::Rdma),
            other => {
                return Err(Error::InvalidConfig {
                    name: TRANSPORT_ENV,
                    value: other.into(),
                    reason: "expected `auto`, `shm`, `tcp` or `rdma`".into(),
                })
            }
        })
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Preference::Auto => f.write_str("auto"),
            Preference::Force(kind) => kind.fmt(f),
        }
    }
}

impl Preference {
    /// Reads `MESHMEM_TRANSPORT`; `Auto` when it is unset.
    pub fn from_env() -> Result<Preference> {
        std::env::var(TRANSPORT_ENV).map_or(Ok(Preference::Auto), |v| v.parse())
    }
}

/// The facts about one node that selection uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    /// Whether the node opened an RDMA device with an active port.
    pub rdma: bool,
}

/// Returns this process's host identity (see the module docs).
pub fn host_id() -> String {
    if let Ok(id) = std::env::var(HOST_ID_ENV) {
        if !id.trim().is_empty() {
            return id.trim().to_string();
        }
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
    format!("{}/{netns}", boot.trim())
}

/// Selects the transport from node `a` to node `b` in this build.
pub fn select(a: (NodeId, &Placement), b: (NodeId, &Placement), preference: Preference) -> Result<TransportKind> {
    select_for_build(a, b, preference, cfg!(feature = "rdma"))
}

/// Selects the transport from node `a` to node `b`, with `rdma_built`
/// standing for whether this build has the `rdma` feature.
fn select_for_build(
    a: (NodeId, &Placement),
    b: (NodeId, &Placement),
    preference: Preference,
    rdma_built: bool,
) -> Result<TransportKind> {
    let ((na, pa), (nb, pb)) = (a, b);
    let same_host = pa.host == pb.host;
    if na == nb || (same_host && preference == Preference::Auto) {
        return Ok(TransportKind::Shm);
    }
    let rdma_usable = rdma_built && pa.rdma && pb.rdma;
    let kind = match preference {
        Preference::Auto if rdma_usable => TransportKind::Rdma,
        Preference::Auto => TransportKind::Tcp,
        Preference::Force(kind) => kind,
    };
    let reject = |reason: String| Error::InvalidConfig { name: TRANSPORT_ENV, value: preference.to_string(), reason };
    match kind {
        TransportKind::Shm if !same_host => Err(reject(format!(
            "nodes {na} and {nb} are on different hosts ({} and {}); shared memory cannot join them, so use `auto` or `tcp`",
            pa.host, pb.host
        ))),
        TransportKind::Rdma if !rdma_usable => {
            let lacking: Vec<String> =
                [(na, pa), (nb, pb)].iter().filter(|(_, p)| !p.rdma).map(|(n, _)| format!("node {n}")).collect();
            let missing = if !rdma_built {
                "this build lacks the `rdma` feature".to_string()
            } else {
                format!("{} opened no RDMA device with an active port", lacking.join(" and "))
            };
            Err(reject(format!("nodes {na} and {nb} cannot use RDMA because {missing}; use `auto` or `tcp`")))
        }
        kind => Ok(kind),
    }
}

/// Selects the transport of every pair: `plan[a][b]` carries `a`'s
/// operations on `b`'s segment.
pub fn plan(nodes: &[Placement], preference: Preference) -> Result<Vec<Vec<TransportKind>>> {
    plan_for_build(nodes, preference, cfg!(feature = "rdma"))
}

fn plan_for_build(nodes: &[Placement], preference: Preference, rdma_built: bool) -> Result<Vec<Vec<TransportKind>>> {
    nodes
        .iter()
        .enumerate()
        .map(|(a, pa)| {
            nodes
                .iter()
                .enumerate()
                .map(|(b, pb)| select_for_build((NodeId(a as u16), pa), (NodeId(b as u16), pb), preference, rdma_built))
                .collect()
        })
        .collect()
}

/// A transport that sends each operation to the backend selected for its
/// destination node.
pub struct Routed {
    me: NodeId,
    /// `routes[node]`: the index into `backends` that reaches `node`.
    routes: Vec<usize>,
    backends: Vec<Arc<dyn Transport>>,
}

impl fmt::Debug for Routed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<_> = self.routes.iter().map(|&i| self.backends[i].kind()).collect();
        f.debug_struct("Routed").field("node", &self.me).field("routes", &kinds).finish()
    }
}

impl Routed {
    /// Routes node `n` to `routes[n]`. Backends that are the same `Arc` are
    /// kept once, so `quiet` reaches each once.
    pub fn new(me: NodeId, routes: Vec<Arc<dyn Transport>>) -> Routed {
        let mut backends: Vec<Arc<dyn Transport>> = Vec::new();
        let routes = routes
            .into_iter()
            .map(|t| match backends.iter().position(|b| Arc::ptr_eq(b, &t)) {
                Some(i) => i,
                None => {
                    backends.push(t);
                    backends.len() - 1
                }
            })
            .collect();
        Routed { me, routes, backends }
    }

    /// Returns the backend that reaches `node`.
    #[inline]
    fn to(&self, node: NodeId) -> Result<&Arc<dyn Transport>> {
        self.routes.get(node.index()).map(|&i| &self.backends[i]).ok_or(Error::NodeOutOfRange {
            node: node.0 as u32,
            nodes: self.routes.len(),
            mesh: crate::topology::Mesh3d { dims: [self.routes.len() as u16, 1, 1], wrap: false },
        })
    }

    /// Returns the kind of transport that carries this node's operations on
    /// `node`.
    pub fn kind_to(&self, node: NodeId) -> Option<TransportKind> {
        self.to(node).ok().map(|t| t.kind())
    }
}

fn op_node(op: &Op<'_>) -> NodeId {
    match op {
        Op::Read { node, .. }
        | Op::Write { node, .. }
        | Op::FetchAdd { node, .. }
        | Op::CompareExchange { node, .. } => *node,
    }
}

impl Transport for Routed {
    /// Returns the kind that carries traffic between hosts, the slowest one
    /// in use: RDMA or TCP when any route uses it, otherwise shared memory.
    fn kind(&self) -> TransportKind {
        let kinds: Vec<_> = self.backends.iter().map(|b| b.kind()).collect();
        [TransportKind::Tcp, TransportKind::Rdma].into_iter().find(|k| kinds.contains(k)).unwrap_or(TransportKind::Shm)
    }

    fn local_node(&self) -> NodeId {
        self.me
    }

    fn segment_len(&self, node: NodeId) -> Result<u64> {
        self.to(node)?.segment_len(node)
    }

    fn read(&self, node: NodeId, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.to(node)?.read(node, offset, dst)
    }

    fn write(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()> {
        self.to(node)?.write(node, offset, src)
    }

    fn fetch_add_u64(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        self.to(node)?.fetch_add_u64(node, offset, value)
    }

    fn compare_exchange_u64(&self, node: NodeId, offset: u64, current: u64, new: u64) -> Result<u64> {
        self.to(node)?.compare_exchange_u64(node, offset, current, new)
    }

    /// Quiets every backend and returns the first failure.
    fn quiet(&self) -> Result<()> {
        let mut first = Ok(());
        for backend in &self.backends {
            if let Err(e) = backend.quiet() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    fn local_view(&self, node: NodeId) -> Option<LocalView> {
        self.to(node).ok()?.local_view(node)
    }

    fn mappable_fd(&self, node: NodeId) -> Option<std::os::fd::RawFd> {
        self.to(node).ok()?.mappable_fd(node)
    }

    /// Splits the batch by backend, submits each part, and puts the outcomes
    /// back in the caller's order.
    fn submit(&self, ops: &mut [Op<'_>]) -> Completion {
        let mut results: Vec<Result<u64>> = (0..ops.len()).map(|_| Ok(0)).collect();
        let mut parts: Vec<(Vec<usize>, Vec<Op<'_>>)> =
            (0..self.backends.len()).map(|_| (Vec::new(), Vec::new())).collect();
        for (slot, op) in ops.iter_mut().enumerate() {
            let node = op_node(op);
            match self.routes.get(node.index()) {
                Some(&backend) => {
                    // Move the operation out, leaving one that borrows nothing.
                    let placeholder = Op::FetchAdd { node, offset: 0, value: 0 };
                    parts[backend].0.push(slot);
                    parts[backend].1.push(std::mem::replace(op, placeholder));
                }
                None => results[slot] = self.to(node).map(|_| 0),
            }
        }
        for (backend, (slots, mut part)) in parts.into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let outcomes = self.backends[backend].submit(&mut part);
            for ((slot, op), outcome) in slots.into_iter().zip(part).zip(outcomes) {
                ops[slot] = op;
                results[slot] = outcome;
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SegmentLayout;
    use crate::transport::shm::{Segment, ShmTransport};

    fn at(host: &str, rdma: bool) -> Placement {
        Placement { host: host.into(), rdma }
    }

    #[test]
    fn selection_prefers_shm_then_rdma_then_tcp() {
        let nodes = [at("a", true), at("a", false), at("b", true), at("c", false)];
        for rdma_built in [false, true] {
            let plan = plan_for_build(&nodes, Preference::Auto, rdma_built).unwrap();
            assert_eq!(plan[0][0], TransportKind::Shm);
            assert_eq!(plan[0][1], TransportKind::Shm);
            let expected = if rdma_built { TransportKind::Rdma } else { TransportKind::Tcp };
            assert_eq!(plan[0][2], expected);
            assert_eq!(plan[2][0], expected);
            assert_eq!(plan[1][2], TransportKind::Tcp);
            assert_eq!(plan[2][3], TransportKind::Tcp);
            assert_eq!(plan[3][3], TransportKind::Shm);
        }
        let expected = if cfg!(feature = "rdma") { TransportKind::Rdma } else { TransportKind::Tcp };
        assert_eq!(plan(&nodes, Preference::Auto).unwrap()[0][2], expected);
    }

    /// Every combination of build, device on either side, host and
    /// preference, against the rules of the module docs.
    #[test]
    fn selection_table_covers_every_combination() {
        use TransportKind::{Rdma, Shm, Tcp};
        let preferences = [Preference::Auto, Preference::Force(Shm), Preference::Force(Tcp), Preference::Force(Rdma)];
        for rdma_built in [false, true] {
            for (rdma_a, rdma_b) in [(false, false), (false, true), (true, false), (true, true)] {
                for same_host in [false, true] {
                    for preference in preferences {
                        let a = at("a", rdma_a);
                        let b = at(if same_host { "a" } else { "b" }, rdma_b);
                        let got = select_for_build((NodeId(0), &a), (NodeId(1), &b), preference, rdma_built);
                        let usable = rdma_built && rdma_a && rdma_b;
                        let case = format!("built {rdma_built}, devices {rdma_a}/{rdma_b}, same host {same_host}, {preference}");
                        let expected = match preference {
                            Preference::Auto if same_host => Some(Shm),
                            Preference::Auto => Some(if usable { Rdma } else { Tcp }),
                            Preference::Force(Shm) => same_host.then_some(Shm),
                            Preference::Force(Rdma) => usable.then_some(Rdma),
                            Preference::Force(kind) => Some(kind),
                        };
                        match (expected, got) {
                            (Some(kind), Ok(got)) => assert_eq!(got, kind, "{case}"),
                            (None, Err(e)) => assert!(e.to_string().contains("nodes 0 and 1"), "{case}: {e}"),
                            (expected, got) => panic!("{case}: expected {expected:?}, got {got:?}"),
                        }
                        let itself = select_for_build((NodeId(0), &a), (NodeId(0), &a), preference, rdma_built);
                        assert_eq!(itself.unwrap(), Shm, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn forcing_a_kind_applies_between_hosts() {
        let nodes = [at("a", true), at("a", true), at("b", true)];
        let plan = plan(&nodes, Preference::Force(TransportKind::Tcp)).unwrap();
        assert_eq!(plan[0][1], TransportKind::Tcp);
        assert_eq!(plan[0][2], TransportKind::Tcp);
        assert_eq!(plan[1][1], TransportKind::Shm);

        let err = super::plan(&nodes, Preference::Force(TransportKind::Shm)).unwrap_err().to_string();
        assert!(err.contains("nodes 0 and 2 are on different hosts"), "{err}");
    }

    #[test]
    fn forced_rdma_error_names_node() {
        let force = Preference::Force(TransportKind::Rdma);
        let err = plan_for_build(&[at("a", false), at("b", true)], force, true).unwrap_err().to_string();
        assert!(err.contains("MESHMEM_TRANSPORT = `rdma`"), "{err}");
        assert!(err.contains("node 0 opened no RDMA device with an active port"), "{err}");
        let err = plan_for_build(&[at("a", true), at("b", false), at("c", false)], force, true).unwrap_err();
        assert!(err.to_string().contains("nodes 0 and 1 cannot use RDMA because node 1 opened no"), "{err}");
        let err = plan_for_build(&[at("a", false), at("b", false)], force, true).unwrap_err();
        assert!(err.to_string().contains("node 0 and node 1 opened no RDMA device"), "{err}");
        let err = plan_for_build(&[at("a", true), at("b", true)], force, false).unwrap_err();
        assert!(err.to_string().contains("this build lacks the `rdma` feature"), "{err}");
        assert!(plan_for_build(&[at("a", true), at("b", true)], force, true).is_ok());
    }

    #[test]
    fn preference_parses_known_names_only() {
        assert_eq!("auto".parse::<Preference>().unwrap(), Preference::Auto);
        assert_eq!("tcp".parse::<Preference>().unwrap(), Preference::Force(TransportKind::Tcp));
        let err = "infiniband".parse::<Preference>().unwrap_err().to_string();
        assert!(err.contains("MESHMEM_TRANSPORT = `infiniband`"), "{err}");
    }

    #[test]
    fn host_id_separates_network_namespaces() {
        let id = host_id();
        assert!(id.contains("net:["), "{id}");
    }

    #[test]
    fn routed_transport_splits_batches_by_backend() {
        let layout = SegmentLayout::new(2, 4096, 4, 64);
        let shm = |me| {
            let segments =
                vec![Segment::create(NodeId(0), layout.len).unwrap(), Segment::create(NodeId(1), layout.len).unwrap()];
            Arc::new(ShmTransport::new(me, segments, layout)) as Arc<dyn Transport>
        };
        let (first, second) = (shm(NodeId(0)), shm(NodeId(0)));
        let routed = Routed::new(NodeId(0), vec![first.clone(), second.clone()]);
        assert!(routed.local_view(NodeId(1)).is_some());
        assert_eq!(routed.kind_to(NodeId(1)), Some(TransportKind::Shm));

        let (mut a, mut b) = ([0u8; 2], [0u8; 2]);
        let mut ops = vec![
            Op::Write { node: NodeId(1), offset: 4096, src: &[1, 2] },
            Op::Write { node: NodeId(0), offset: 4096, src: &[3, 4] },
            Op::Read { node: NodeId(1), offset: 4096, dst: &mut a },
            Op::Read { node: NodeId(0), offset: 4096, dst: &mut b },
            Op::FetchAdd { node: NodeId(5), offset: 0, value: 1 },
        ];
        let results = routed.submit(&mut ops);
        drop(ops);
        assert!(results[..4].iter().all(Result::is_ok), "{results:?}");
        assert!(matches!(results[4], Err(Error::NodeOutOfRange { .. })), "{:?}", results[4]);
        assert_eq!((a, b), ([1, 2], [3, 4]));

        // Each write went to the backend routed for its node only.
        let mut probe = [0u8; 2];
        second.read(NodeId(0), 4096, &mut probe).unwrap();
        assert_eq!(probe, [0, 0]);
        routed.quiet().unwrap();
    }
}
