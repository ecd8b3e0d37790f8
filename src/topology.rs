//! The shape of a node group: a 3D mesh (optionally a torus), node ids and
//! coordinates, hop distances and dimension-ordered routes.
//!
//! A node id is dense from 0 and maps to a coordinate as
//! `id = x + X * (y + Y * z)` for a mesh of `X x Y x Z` nodes. The hop
//! distance between two nodes is the Manhattan distance; on a torus each axis
//! takes the shorter way around, `min(d, dim - d)`. Routes follow the X axis
//! first, then Y, then Z, as dimension-ordered routing on real mesh fabrics
//! does, so the route between two nodes is unique and its length equals
//! their hop distance.
//!
//! Everything here is pure and cheap: no I/O, no allocation beyond the
//! returned route.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The id of a node in the group, dense from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct NodeId(pub u16);

impl NodeId {
    /// Returns the id as an index into per-node tables.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node's position in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Coord {
    pub x: u16,
    pub y: u16,
    pub z: u16,
}

impl Coord {
    pub const fn new(x: u16, y: u16, z: u16) -> Self {
        Coord { x, y, z }
    }

    fn axis(self, axis: usize) -> u16 {
        match axis {
            0 => self.x,
            1 => self.y,
            _ => self.z,
        }
    }

    fn set_axis(&mut self, axis: usize, value: u16) {
        match axis {
            0 => self.x = value,
            1 => self.y = value,
            _ => self.z = value,
        }
    }
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({},{},{})", self.x, self.y, self.z)
    }
}

/// The largest number of nodes a mesh may have. Node ids are `u16`, and the
/// page-table entry keeps 16 bits for the home node.
pub const MAX_NODES: usize = u16::MAX as usize;

/// A 3D mesh of nodes, a torus when `wrap` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mesh3d {
    /// Nodes along X, Y and Z; each at least 1.
    pub dims: [u16; 3],
    /// Whether each axis wraps around (a torus).
    pub wrap: bool,
}

impl Mesh3d {
    /// Builds a mesh, rejecting a zero dimension or more than [`MAX_NODES`]
    /// nodes.
    pub fn new(dims: [u16; 3], wrap: bool) -> Result<Self> {
        let text = format!("{}x{}x{}", dims[0], dims[1], dims[2]);
        if let Some(axis) = dims.iter().position(|&d| d == 0) {
            return Err(Error::InvalidMesh {
                text,
                reason: format!(
                    "dimension {} is zero; every dimension must be at least 1",
                    ["X", "Y", "Z"][axis]
                ),
            });
        }
        let nodes = dims.iter().map(|&d| d as usize).product::<usize>();
        if nodes > MAX_NODES {
            return Err(Error::InvalidMesh {
                text,
                reason: format!("{nodes} nodes exceed the limit of {MAX_NODES}"),
            });
        }
        Ok(Mesh3d { dims, wrap })
    }

    /// Number of nodes in the mesh.
    #[inline]
    pub fn len(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }

    /// Always false: a mesh has at least one node.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Returns every node id, in order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> {
        (0..self.len() as u16).map(NodeId)
    }

    /// Checks that `node` belongs to this mesh.
    pub fn check(&self, node: NodeId) -> Result<()> {
        if node.index() < self.len() {
            Ok(())
        } else {
            Err(Error::NodeOutOfRange {
                node: node.0 as u32,
                nodes: self.len(),
                mesh: *self,
            })
        }
    }

    /// Returns the coordinate of `node`.
    pub fn coord(&self, node: NodeId) -> Result<Coord> {
        self.check(node)?;
        Ok(self.coord_unchecked(node))
    }

    fn coord_unchecked(&self, node: NodeId) -> Coord {
        let [dx, dy, _] = self.dims;
        let id = node.0;
        Coord::new(id % dx, (id / dx) % dy, id / (dx * dy))
    }

    /// Returns the node at `coord`.
    pub fn node_at(&self, coord: Coord) -> Result<NodeId> {
        let [dx, dy, dz] = self.dims;
        if coord.x >= dx || coord.y >= dy || coord.z >= dz {
            return Err(Error::CoordOutOfRange { coord, mesh: *self });
        }
        Ok(NodeId(coord.x + dx * (coord.y + dy * coord.z)))
    }

    /// Distance along one axis, taking the short way round on a torus.
    fn axis_distance(&self, axis: usize, a: u16, b: u16) -> u16 {
        let d = a.abs_diff(b);
        if self.wrap {
            d.min(self.dims[axis] - d)
        } else {
            d
        }
    }

    /// Returns the hop distance between two nodes.
    pub fn hops(&self, a: NodeId, b: NodeId) -> Result<u32> {
        let (ca, cb) = (self.coord(a)?, self.coord(b)?);
        Ok((0..3)
            .map(|axis| self.axis_distance(axis, ca.axis(axis), cb.axis(axis)) as u32)
            .sum())
    }

    /// Returns the dimension-ordered route from `a` to `b`: X first, then Y,
    /// then Z, both ends included. Its length is `hops(a, b) + 1`.
    pub fn route(&self, a: NodeId, b: NodeId) -> Result<Vec<NodeId>> {
        let (mut at, target) = (self.coord(a)?, self.coord(b)?);
        let mut route = vec![a];
        for axis in 0..3 {
            let dim = self.dims[axis];
            while at.axis(axis) != target.axis(axis) {
                let (from, to) = (at.axis(axis), target.axis(axis));
                let forward = if self.wrap {
                    // Going up is shorter when the upward distance, modulo the
                    // ring, is at most half of it; ties go up so that routes are
                    // deterministic.
                    (to + dim - from) % dim <= dim / 2
                } else {
                    to > from
                };
                let next = if forward { (from + 1) % dim } else { (from + dim - 1) % dim };
                at.set_axis(axis, next);
                route.push(self.node_at(at)?);
            }
        }
        Ok(route)
    }

    /// Returns the nodes ordered by hop distance from `from`, ties by lower id.
    pub fn by_distance(&self, from: NodeId) -> Result<Vec<NodeId>> {
        self.check(from)?;
        let mut nodes: Vec<NodeId> = self.nodes().collect();
        nodes.sort_by_key(|&n| (self.hops(from, n).unwrap_or(u32::MAX), n));
        Ok(nodes)
    }
}

impl fmt::Display for Mesh3d {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.dims[0], self.dims[1], self.dims[2])?;
        if self.wrap {
            write!(f, ":torus")?;
        }
        Ok(())
    }
}

impl FromStr for Mesh3d {
    type Err = Error;

    /// Parses `X`, `XxY` or `XxYxZ`, optionally followed by `:torus`
    /// (`2x2x2`, `4x4x2:torus`). Missing dimensions are 1.
    fn from_str(text: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidMesh { text: text.to_string(), reason };
        let trimmed = text.trim();
        let (shape, wrap) = match trimmed.split_once(':') {
            Some((shape, "torus")) => (shape, true),
            Some((_, other)) => {
                return Err(invalid(format!(
                    "unknown suffix `{other}`; the only suffix is `:torus`"
                )))
            }
            None => (trimmed, false),
        };
        let parts: Vec<&str> = shape.split(['x', 'X']).collect();
        if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "expected one to three dimensions separated by `x`, such as `2x2x2`".into(),
            ));
        }
        let mut dims = [1u16; 3];
        for (i, part) in parts.iter().enumerate() {
            dims[i] = part.trim().parse::<u16>().map_err(|_| {
                invalid(format!("dimension `{part}` is not a whole number from 1 to 65535"))
            })?;
        }
        Mesh3d::new(dims, wrap).map_err(|e| match e {
            Error::InvalidMesh { reason, .. } => invalid(reason),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_shapes() {
        let mesh: Mesh3d = "2x2x2".parse().unwrap();
        assert_eq!(mesh.dims, [2, 2, 2]);
        assert!(!mesh.wrap);
        assert_eq!(mesh.len(), 8);
        assert_eq!("4x2".parse::<Mesh3d>().unwrap().dims, [4, 2, 1]);
        assert_eq!("8".parse::<Mesh3d>().unwrap().dims, [8, 1, 1]);
        let torus: Mesh3d = "4x4x2:torus".parse().unwrap();
        assert!(torus.wrap);
        assert_eq!(torus.to_string(), "4x4x2:torus");
    }

    #[test]
    fn parse_rejects_bad_text() {
        for text in ["", "2x", "axb", "2x2x2x2", "2x0x2", "2x2x2:ring", "70000x1", "300x300x1"] {
            let err = text.parse::<Mesh3d>().unwrap_err();
            assert!(matches!(err, Error::InvalidMesh { .. }), "{text}: {err}");
            assert!(err.to_string().contains(&format!("`{text}`")), "{err}");
        }
        let zero = "2x0x2".parse::<Mesh3d>().unwrap_err().to_string();
        assert!(zero.contains("dimension Y is zero"), "{zero}");
    }

    #[test]
    fn coord_round_trips() {
        let mesh: Mesh3d = "3x2x2".parse().unwrap();
        for node in mesh.nodes() {
            assert_eq!(mesh.node_at(mesh.coord(node).unwrap()).unwrap(), node);
        }
        assert_eq!(mesh.coord(NodeId(5)).unwrap(), Coord::new(2, 1, 0));
        assert_eq!(mesh.coord(NodeId(7)).unwrap(), Coord::new(1, 0, 1));
    }

    #[test]
    fn node_outside_mesh_is_rejected() {
        let mesh: Mesh3d = "2x2x2".parse().unwrap();
        let err = mesh.coord(NodeId(8)).unwrap_err().to_string();
        assert!(err.contains("node 8"), "{err}");
        assert!(err.contains("8 nodes"), "{err}");
        assert!(mesh.hops(NodeId(0), NodeId(9)).is_err());
        assert!(mesh.node_at(Coord::new(2, 0, 0)).is_err());
    }

    #[test]
    fn torus_takes_short_way() {
        let mesh: Mesh3d = "8x1x1:torus".parse().unwrap();
        assert_eq!(mesh.hops(NodeId(0), NodeId(7)).unwrap(), 1);
        assert_eq!(mesh.route(NodeId(0), NodeId(7)).unwrap(), vec![NodeId(0), NodeId(7)]);
        let open: Mesh3d = "8x1x1".parse().unwrap();
        assert_eq!(open.hops(NodeId(0), NodeId(7)).unwrap(), 7);
    }

    #[test]
    fn route_goes_x_then_y_then_z() {
        let mesh: Mesh3d = "2x2x2".parse().unwrap();
        let route = mesh.route(NodeId(0), NodeId(7)).unwrap();
        assert_eq!(route, vec![NodeId(0), NodeId(1), NodeId(3), NodeId(7)]);
    }

    #[test]
    fn by_distance_orders_ties_by_id() {
        let mesh: Mesh3d = "2x2x2".parse().unwrap();
        let order = mesh.by_distance(NodeId(0)).unwrap();
        assert_eq!(order, [0, 1, 2, 4, 3, 5, 6, 7].map(NodeId).to_vec());
    }

    fn mesh_and_nodes() -> impl Strategy<Value = (Mesh3d, NodeId, NodeId, NodeId)> {
        (1u16..6, 1u16..6, 1u16..5, any::<bool>()).prop_flat_map(|(x, y, z, wrap)| {
            let mesh = Mesh3d::new([x, y, z], wrap).unwrap();
            let n = mesh.len() as u16;
            (Just(mesh), 0..n, 0..n, 0..n)
                .prop_map(|(m, a, b, c)| (m, NodeId(a), NodeId(b), NodeId(c)))
        })
    }

    proptest! {
        #[test]
        fn hops_are_symmetric((mesh, a, b, _) in mesh_and_nodes()) {
            prop_assert_eq!(mesh.hops(a, b).unwrap(), mesh.hops(b, a).unwrap());
            prop_assert_eq!(mesh.hops(a, a).unwrap(), 0);
        }

        #[test]
        fn hops_obey_triangle_inequality((mesh, a, b, c) in mesh_and_nodes()) {
            let direct = mesh.hops(a, c).unwrap();
            let via = mesh.hops(a, b).unwrap() + mesh.hops(b, c).unwrap();
            prop_assert!(direct <= via);
        }

        #[test]
        fn route_length_equals_hops((mesh, a, b, _) in mesh_and_nodes()) {
            let route = mesh.route(a, b).unwrap();
            prop_assert_eq!(route.len() as u32, mesh.hops(a, b).unwrap() + 1);
            prop_assert_eq!(route[0], a);
            prop_assert_eq!(*route.last().unwrap(), b);
            for step in route.windows(2) {
                prop_assert_eq!(mesh.hops(step[0], step[1]).unwrap(), 1);
            }
        }
    }
}

/// Per-link bandwidth and per-hop latency of a mesh fabric, for
/// [`Mesh3d::estimate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkModel {
    /// Bytes per second one direction of one link carries.
    pub bandwidth: f64,
    /// Seconds a message spends on each hop, switching and wire together.
    pub hop_latency: f64,
}

impl Default for LinkModel {
    /// 50 GB/s per direction and 200 ns per hop: round figures assumed for
    /// a scale-up link, not a measurement of any system. Pass the figures
    /// of the fabric being modelled.
    fn default() -> Self {
        LinkModel { bandwidth: 50e9, hop_latency: 200e-9 }
    }
}

/// The load a traffic matrix puts on each link, and the time it would take.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficEstimate {
    /// Bytes on each directed link `(from, to)` between neighbours, sorted
    /// by link; links without traffic are left out.
    pub links: Vec<((NodeId, NodeId), u64)>,
    /// The busiest link and its bytes, if any byte crossed a link.
    pub busiest: Option<((NodeId, NodeId), u64)>,
    /// Sum over pairs of bytes times hops; equals the sum of `links`.
    pub hop_bytes: u64,
    /// Estimated seconds: the busiest link's bytes over the bandwidth, plus
    /// the longest route's hops times the hop latency. An estimate that
    /// ignores contention inside switches and protocol overheads.
    pub seconds: f64,
}

impl Mesh3d {
    /// Routes every byte of `traffic[src][dst]` along its dimension-ordered
    /// route and adds it to each link it crosses.
    pub fn estimate(&self, traffic: &[Vec<u64>], model: LinkModel) -> Result<TrafficEstimate> {
        let n = self.len();
        if traffic.len() != n || traffic.iter().any(|row| row.len() != n) {
            return Err(Error::InvalidConfig {
                name: "traffic",
                value: format!("{} rows", traffic.len()),
                reason: format!("a traffic matrix of mesh {self} must be {n} x {n}"),
            });
        }
        if !(model.bandwidth > 0.0) || !(model.hop_latency >= 0.0) {
            return Err(Error::InvalidConfig {
                name: "link model",
                value: format!("{model:?}"),
                reason: "bandwidth must be positive and hop latency not negative".into(),
            });
        }

        let mut loads: std::collections::BTreeMap<(NodeId, NodeId), u64> = Default::default();
        let mut hop_bytes = 0u64;
        let mut longest = 0u32;
        for (src, row) in traffic.iter().enumerate() {
            for (dst, &bytes) in row.iter().enumerate() {
                if bytes == 0 || src == dst {
                    continue;
                }
                let route = self.route(NodeId(src as u16), NodeId(dst as u16))?;
                for hop in route.windows(2) {
                    *loads.entry((hop[0], hop[1])).or_default() += bytes;
                }
                hop_bytes += bytes * (route.len() as u64 - 1);
                longest = longest.max(route.len() as u32 - 1);
            }
        }
        let busiest = loads.iter().max_by_key(|(link, bytes)| (**bytes, std::cmp::Reverse(**link))).map(|(l, b)| (*l, *b));
        let seconds = busiest.map_or(0.0, |(_, bytes)| bytes as f64 / model.bandwidth) + longest as f64 * model.hop_latency;
        Ok(TrafficEstimate { links: loads.into_iter().collect(), busiest, hop_bytes, seconds })
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bytes_follow_dimension_order() {
        let mesh: Mesh3d = "3x2x1".parse().unwrap();
        let mut traffic = vec![vec![0u64; 6]; 6];
        traffic[0][5] = 100; // (0,0) -> (2,1): X to 1, X to 2, then Y
        traffic[3][0] = 10; // (0,1) -> (0,0)
        let estimate = mesh.estimate(&traffic, LinkModel { bandwidth: 100.0, hop_latency: 0.5 }).unwrap();
        let link = |a: u16, b: u16| (NodeId(a), NodeId(b));
        assert_eq!(estimate.links, vec![(link(0, 1), 100), (link(1, 2), 100), (link(2, 5), 100), (link(3, 0), 10)]);
        assert_eq!(estimate.hop_bytes, 310);
        assert_eq!(estimate.busiest, Some((link(0, 1), 100)));
        assert!((estimate.seconds - (1.0 + 3.0 * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn torus_wraps_and_local_traffic_is_free() {
        let mesh: Mesh3d = "4x1x1:torus".parse().unwrap();
        let mut traffic = vec![vec![0u64; 4]; 4];
        traffic[0][3] = 8;
        traffic[2][2] = 1000;
        let estimate = mesh.estimate(&traffic, LinkModel::default()).unwrap();
        assert_eq!(estimate.links, vec![((NodeId(0), NodeId(3)), 8)]);
        assert_eq!(estimate.hop_bytes, 8);
    }

    #[test]
    fn bad_matrix_and_model_are_rejected() {
        let mesh: Mesh3d = "2x1x1".parse().unwrap();
        let err = mesh.estimate(&[vec![0; 2]], LinkModel::default()).unwrap_err().to_string();
        assert!(err.contains("2 x 2"), "{err}");
        let zero = LinkModel { bandwidth: 0.0, hop_latency: 0.0 };
        assert!(mesh.estimate(&[vec![0; 2], vec![0; 2]], zero).is_err());
        let nan = LinkModel { bandwidth: f64::NAN, hop_latency: 0.0 };
        assert!(mesh.estimate(&[vec![0; 2], vec![0; 2]], nan).is_err());
    }

    proptest! {
        #[test]
        fn link_loads_sum_to_hop_bytes(
            dims in (1u16..4, 1u16..4, 1u16..3),
            wrap in any::<bool>(),
            cells in prop::collection::vec(0u64..1000, 36 * 36),
        ) {
            let mesh = Mesh3d::new([dims.0, dims.1, dims.2], wrap).unwrap();
            let n = mesh.len();
            let traffic: Vec<Vec<u64>> = (0..n).map(|s| cells[s * 36..s * 36 + n].to_vec()).collect();
            let estimate = mesh.estimate(&traffic, LinkModel::default()).unwrap();
            let on_links: u64 = estimate.links.iter().map(|(_, b)| b).sum();
            prop_assert_eq!(on_links, estimate.hop_bytes);
            let mut expected = 0;
            for s in mesh.nodes() {
                for d in mesh.nodes() {
                    if s != d {
                        expected += traffic[s.index()][d.index()] * mesh.hops(s, d).unwrap() as u64;
                    }
                }
            }
            prop_assert_eq!(estimate.hop_bytes, expected);
            for ((a, b), _) in &estimate.links {
                prop_assert_eq!(mesh.hops(*a, *b).unwrap(), 1);
            }
        }
    }
}
