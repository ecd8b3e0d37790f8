//! Placement policies: which node is home to each new page.

use crate::error::{Error, Result};
use crate::topology::{Coord, Mesh3d, NodeId};

/// Where an allocation's pages live.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// On the allocating node.
    #[default]
    Local,
    /// On one node; fails rather than fall back to another.
    Node(NodeId),
    /// On the node with the fewest hops from `coord` that has free
    /// capacity, ties by lowest id. A large allocation that does not fit
    /// there spills, page by page, to the next-nearest nodes.
    Nearest(Coord),
    /// Round robin over `nodes`, `pages_per_stripe` pages at a time, like
    /// `numactl --interleave`. Small allocations take turns whole.
    Interleave { nodes: Vec<NodeId>, pages_per_stripe: usize },
    /// On the node with the most free frames, ties by lowest id; decided
    /// page by page.
    Balanced,
}

impl From<NodeId> for Placement {
    fn from(node: NodeId) -> Self {
        Placement::Node(node)
    }
}

impl Placement {
    /// Interleaves one page at a time over every node of `mesh`.
    pub fn interleave_all(mesh: &Mesh3d) -> Placement {
        Placement::Interleave { nodes: mesh.nodes().collect(), pages_per_stripe: 1 }
    }

    /// Checks that every node the policy names belongs to `mesh`.
    pub fn validate(&self, mesh: &Mesh3d) -> Result<()> {
        match self {
            Placement::Local | Placement::Balanced => Ok(()),
            Placement::Node(node) => mesh.check(*node),
            Placement::Nearest(coord) => mesh.node_at(*coord).map(|_| ()),
            Placement::Interleave { nodes, pages_per_stripe } => {
                if nodes.is_empty() {
                    return Err(Error::InvalidConfig {
                        name: "placement",
                        value: format!("{self:?}"),
                        reason: "interleave needs at least one node".into(),
                    });
                }
                if *pages_per_stripe == 0 {
                    return Err(Error::InvalidConfig {
                        name: "placement",
                        value: format!("{self:?}"),
                        reason: "pages_per_stripe must be at least 1".into(),
                    });
                }
                nodes.iter().try_for_each(|&node| mesh.check(node))
            }
        }
    }
}

/// Assigns a home to each of `pages` pages. `free` holds each node's free
/// frames and is lowered as pages are assigned; `cursor` is where an
/// interleave resumes. Nodes short of frames are left to the caller's
/// reservation, which reports them.
pub(crate) fn plan_pages(
    placement: &Placement,
    mesh: &Mesh3d,
    me: NodeId,
    pages: u64,
    free: &mut [u64],
    cursor: u64,
) -> Result<Vec<NodeId>> {
    placement.validate(mesh)?;
    let homes = match placement {
        Placement::Local => vec![me; pages as usize],
        Placement::Node(node) => vec![*node; pages as usize],
        Placement::Nearest(coord) => {
            let origin = mesh.node_at(*coord)?;
            let order = mesh.by_distance(origin)?;
            let mut homes = Vec::with_capacity(pages as usize);
            for &node in &order {
                while (homes.len() as u64) < pages && free[node.index()] > 0 {
                    free[node.index()] -= 1;
                    homes.push(node);
                }
            }
            // Not enough anywhere: ask the nearest node for the rest, whose
            // reservation then reports the shortage.
            homes.resize(pages as usize, origin);
            homes
        }
        Placement::Interleave { nodes, pages_per_stripe } => (0..pages)
            .map(|i| nodes[((cursor + i) / *pages_per_stripe as u64 % nodes.len() as u64) as usize])
            .collect(),
        Placement::Balanced => (0..pages)
            .map(|_| {
                let node = mesh
                    .nodes()
                    .max_by_key(|n| (free[n.index()], std::cmp::Reverse(*n)))
                    .unwrap_or(me);
                free[node.index()] = free[node.index()].saturating_sub(1);
                node
            })
            .collect(),
    };
    Ok(homes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Mesh3d {
        "2x2x2".parse().unwrap()
    }

    #[test]
    fn interleave_stripes_round_robin() {
        let p = Placement::Interleave { nodes: vec![NodeId(1), NodeId(4)], pages_per_stripe: 2 };
        let homes = plan_pages(&p, &mesh(), NodeId(0), 6, &mut [10; 8], 0).unwrap();
        assert_eq!(homes, [1, 1, 4, 4, 1, 1].map(NodeId).to_vec());
    }

    #[test]
    fn nearest_spills_to_next_nearest() {
        let mut free = [0, 2, 0, 5, 0, 0, 0, 0];
        let p = Placement::Nearest(Coord::new(1, 0, 0));
        let homes = plan_pages(&p, &mesh(), NodeId(0), 4, &mut free, 0).unwrap();
        assert_eq!(homes, [1, 1, 3, 3].map(NodeId).to_vec());
    }

    #[test]
    fn balanced_prefers_most_free() {
        let mut free = [1, 3, 3, 0, 0, 0, 0, 0];
        let homes = plan_pages(&Placement::Balanced, &mesh(), NodeId(0), 3, &mut free, 0).unwrap();
        assert_eq!(homes, [1, 2, 1].map(NodeId).to_vec());
    }

    #[test]
    fn bad_placements_are_rejected() {
        let err = plan_pages(&Placement::Node(NodeId(9)), &mesh(), NodeId(0), 1, &mut [1; 8], 0).unwrap_err();
        assert!(err.to_string().contains("node 9"), "{err}");
        let err = plan_pages(&Placement::Nearest(Coord::new(0, 2, 0)), &mesh(), NodeId(0), 1, &mut [1; 8], 0)
            .unwrap_err();
        assert!(err.to_string().contains("(0,2,0)"), "{err}");
        let empty = Placement::Interleave { nodes: vec![], pages_per_stripe: 1 };
        assert!(plan_pages(&empty, &mesh(), NodeId(0), 1, &mut [1; 8], 0).is_err());
        let zero = Placement::Interleave { nodes: vec![NodeId(0)], pages_per_stripe: 0 };
        assert!(plan_pages(&zero, &mesh(), NodeId(0), 1, &mut [1; 8], 0).is_err());
    }
}
