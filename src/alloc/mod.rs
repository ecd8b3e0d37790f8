//! The global allocator.
//!
//! Large requests (more than an eighth of a page) take whole pages: address
//! space from the calling node's arena and, for each page, a home frame on
//! the node the placement picks. Small requests take a block from a
//! size-class slab homed on the node the placement picks (see [`slab`]).
//!
//! A placement that cannot be met fails with the node, the request and the
//! node's free bytes, and leaves every frame, page and slab as it was; no
//! policy falls back to another node unless it says so (`Nearest` spills,
//! `Balanced` and `Interleave` spread by design).
//!
//! Any node may free any allocation. A large free takes the arena lock of
//! the node that allocated it, clears its page-table entries, returns the
//! frames to their homes and the address space to the arena. A small free
//! clears the block's bit in its slab.

pub mod arena;
pub mod placement;
pub mod slab;

use std::alloc::Layout;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

pub use placement::Placement;

use crate::error::{Error, Result};
use crate::frames::Frames;
use crate::layout::{SegmentLayout, Words};
use crate::space::{Aux, GlobalAddr, PageTable, Pte};
use crate::topology::{Mesh3d, NodeId};
use arena::Arena;
use slab::{Geometry, Slab};

/// A coherence hint for a range, modelled on `cudaMemAdvise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Advice {
    /// One copy at the home; every access goes to the home.
    #[default]
    None,
    /// Readers may hold replicas; a write invalidates them.
    ReadMostly,
    /// Keep the home on this node.
    PreferredLocation(NodeId),
    /// Keep this node's mapping of the range established.
    AccessedBy(NodeId),
    /// Never replicate or cache: written once, read once.
    Streaming,
}

impl Advice {
    /// The bits kept in a page-table entry.
    pub(crate) fn bits(self) -> u8 {
        match self {
            Advice::None => 0,
            Advice::ReadMostly => 1,
            Advice::PreferredLocation(_) => 2,
            Advice::AccessedBy(_) => 4,
            Advice::Streaming => 8,
        }
    }

    pub(crate) fn validate(self, mesh: &Mesh3d) -> Result<()> {
        match self {
            Advice::PreferredLocation(node) | Advice::AccessedBy(node) => mesh.check(node),
            _ => Ok(()),
        }
    }
}

/// An allocation in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalAlloc {
    pub addr: GlobalAddr,
    /// Requested size in bytes.
    pub size: usize,
}

/// What a free released, for the caller to unmap.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Freed {
    Pages { first_page: u64, pages: u64 },
    Block,
}

#[derive(Default)]
struct SlabList {
    slabs: Vec<Slab>,
    current: usize,
}

/// The allocator state of one node process.
pub(crate) struct Heap {
    pub me: NodeId,
    pub mesh: Mesh3d,
    pub layout: SegmentLayout,
    pub words: Words,
    pub table: PageTable,
    pub frames: Frames,
    pub window_base: u64,
    slabs: Mutex<HashMap<(NodeId, u8), SlabList>>,
    cursor: AtomicU64,
}

impl Heap {
    pub fn new(me: NodeId, mesh: Mesh3d, layout: SegmentLayout, words: Words, window_base: u64) -> Self {
        let table = PageTable::new(words.clone(), layout, mesh.len() as u64);
        let frames = Frames::new(words.clone(), layout);
        Heap {
            me,
            mesh,
            layout,
            words,
            table,
            frames,
            window_base,
            slabs: Mutex::new(HashMap::new()),
            cursor: AtomicU64::new(me.0 as u64),
        }
    }

    #[inline]
    fn page_size(&self) -> u64 {
        self.layout.page_size
    }

    fn check_layout(&self, layout: Layout) -> Result<()> {
        let invalid = |reason: String| Error::InvalidLayout { size: layout.size(), align: layout.align(), reason };
        if layout.size() == 0 {
            return Err(invalid("zero-sized allocations are not supported; request at least one byte".into()));
        }
        if layout.align() as u64 > self.page_size() {
            return Err(invalid(format!(
                "the alignment exceeds the page size of {} bytes, the largest the pool guarantees",
                self.page_size()
            )));
        }
        Ok(())
    }

    pub fn alloc(&self, layout: Layout, placement: &Placement, advice: Advice) -> Result<GlobalAddr> {
        self.check_layout(layout)?;
        placement.validate(&self.mesh)?;
        advice.validate(&self.mesh)?;
        match slab::class_of(layout.size(), layout.align(), self.page_size()) {
            Some(class) => self.alloc_small(class, layout.size(), placement),
            None => self.alloc_large(layout.size() as u64, placement, advice),
        }
    }

    fn free_counts(&self) -> Result<Vec<u64>> {
        self.mesh.nodes().map(|n| self.frames.free_frames(n)).collect()
    }

    fn alloc_large(&self, size: u64, placement: &Placement, advice: Advice) -> Result<GlobalAddr> {
        let pages = size.div_ceil(self.page_size());
        let mut free = self.free_counts()?;
        let cursor = self.cursor.fetch_add(pages, Ordering::Relaxed);
        let homes = placement::plan_pages(placement, &self.mesh, self.me, pages, &mut free, cursor)?;
        let frames = self.take_frames(&homes)?;

        let arena = Arena::new(&self.words, &self.layout, self.me, self.me);
        let start = {
            let guard = arena.lock()?;
            arena.take(&guard, pages, 1)
        };
        let start = match start {
            Ok(start) => start,
            Err(e) => {
                self.release_frames(&homes, &frames)?;
                return Err(e);
            }
        };

        let first_page = self.me.0 as u64 * self.layout.arena_pages + start;
        for (i, (&home, &frame)) in homes.iter().zip(&frames).enumerate() {
            let page = first_page + i as u64;
            let old = self.table.load_pte(page)?;
            let aux = if i == 0 { Aux::Head { pages: pages as u32 } } else { Aux::Tail { index: i as u32 } };
            self.table.store(page, Pte::new(home, frame, old.version() + 1, advice.bits()), aux)?;
        }
        Ok(GlobalAddr(self.window_base + first_page * self.page_size()))
    }

    /// Reserves, then claims, one frame per entry of `homes`; on failure
    /// nothing stays taken.
    fn take_frames(&self, homes: &[NodeId]) -> Result<Vec<u32>> {
        let mut counts: Vec<(NodeId, u64)> = Vec::new();
        for &home in homes {
            match counts.iter_mut().find(|(n, _)| *n == home) {
                Some((_, c)) => *c += 1,
                None => counts.push((home, 1)),
            }
        }
        for (i, &(node, count)) in counts.iter().enumerate() {
            if let Err(e) = self.frames.reserve(node, count) {
                for &(done, c) in &counts[..i] {
                    self.frames.unreserve(done, c)?;
                }
                return Err(e);
            }
        }
        let mut claimed: HashMap<NodeId, std::vec::IntoIter<u32>> = HashMap::new();
        for &(node, count) in &counts {
            claimed.insert(node, self.frames.claim(node, count)?.into_iter());
        }
        Ok(homes.iter().map(|home| claimed.get_mut(home).and_then(|f| f.next()).expect("claimed per home")).collect())
    }

    fn release_frames(&self, homes: &[NodeId], frames: &[u32]) -> Result<()> {
        let mut by_home: HashMap<NodeId, Vec<u32>> = HashMap::new();
        for (&home, &frame) in homes.iter().zip(frames) {
            by_home.entry(home).or_default().push(frame);
        }
        let mut first_error = None;
        for (home, frames) in by_home {
            if let Err(e) = self.frames.release(home, &frames) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The node a small allocation goes to.
    fn small_home(&self, class: u8, placement: &Placement) -> Result<NodeId> {
        Ok(match placement {
            Placement::Local => self.me,
            Placement::Node(node) => *node,
            Placement::Nearest(coord) => {
                let origin = self.mesh.node_at(*coord)?;
                let slabs = self.slabs.lock();
                let mut chosen = origin;
                for node in self.mesh.by_distance(origin)? {
                    let has_block = slabs.get(&(node, class)).is_some_and(|list| {
                        list.slabs.iter().any(|s| s.used(&self.words).is_ok_and(|u| u < s.geometry.capacity))
                    });
                    if has_block || self.frames.free_frames(node)? > 0 {
                        chosen = node;
                        break;
                    }
                }
                chosen
            }
            Placement::Interleave { nodes, .. } => {
                nodes[(self.cursor.fetch_add(1, Ordering::Relaxed) % nodes.len() as u64) as usize]
            }
            Placement::Balanced => {
                let free = self.free_counts()?;
                self.mesh.nodes().max_by_key(|n| (free[n.index()], std::cmp::Reverse(*n))).unwrap_or(self.me)
            }
        })
    }

    fn alloc_small(&self, class: u8, size: usize, placement: &Placement) -> Result<GlobalAddr> {
        let home = self.small_home(class, placement)?;
        let mut slabs = self.slabs.lock();
        let list = slabs.entry((home, class)).or_default();

        // Fast path: the current slab.
        if let Some(slab) = list.slabs.get_mut(list.current) {
            if let Some(addr) = slab.claim(&self.words)? {
                return Ok(GlobalAddr(addr));
            }
        }
        // Another slab with a block freed since.
        for i in 0..list.slabs.len() {
            let slab = &mut list.slabs[i];
            if slab.used(&self.words)? < slab.geometry.capacity {
                if let Some(addr) = slab.claim(&self.words)? {
                    list.current = i;
                    return Ok(GlobalAddr(addr));
                }
            }
        }
        drop(slabs);

        // A new slab page on `home`.
        let page_addr = self.alloc_large(self.page_size(), &Placement::Node(home), Advice::None).map_err(|e| match e {
            Error::OutOfMemory { node, free, .. } => Error::OutOfMemory { node, requested: size as u64, free },
            other => other,
        })?;
        let page = (page_addr.0 - self.window_base) / self.page_size();
        let pte = self.table.load_pte(page)?;
        let geometry = Geometry::new(class, self.page_size());
        let offset = self.layout.frame_offset(pte.frame());
        Slab::initialise(&self.words, home, offset, class, geometry)?;
        self.table.store(page, pte, Aux::Slab { class })?;
        let mut slab = Slab { page_addr: page_addr.0, home, offset, geometry, hint: 0 };
        let addr = slab.claim(&self.words)?.expect("a fresh slab has free blocks");
        let mut slabs = self.slabs.lock();
        let list = slabs.entry((home, class)).or_default();
        list.slabs.push(slab);
        list.current = list.slabs.len() - 1;
        Ok(GlobalAddr(addr))
    }

    /// Frees the allocation at `addr`, which must lie in the window.
    pub fn free(&self, addr: u64) -> Result<Freed> {
        let page = (addr - self.window_base) / self.page_size();
        let page_addr = self.window_base + page * self.page_size();
        let (pte, aux) = self.table.load(page)?;
        match aux {
            Aux::Free => Err(Error::InvalidFree { addr, reason: "no allocation covers it".into() }),
            Aux::FreedHead if addr == page_addr => Err(Error::DoubleFree { addr }),
            Aux::FreedHead => Err(Error::InvalidFree { addr, reason: "no allocation covers it".into() }),
            Aux::Tail { index } => Err(Error::InvalidFree {
                addr,
                reason: format!(
                    "it points inside the allocation that starts at {:#x}",
                    page_addr - index as u64 * self.page_size()
                ),
            }),
            Aux::Head { .. } if addr != page_addr => Err(Error::InvalidFree {
                addr,
                reason: format!("it points inside the allocation that starts at {page_addr:#x}"),
            }),
            Aux::Head { .. } => self.free_large(page, addr),
            Aux::Slab { .. } => {
                slab::free_block(
                    &self.words,
                    pte.home(),
                    self.layout.frame_offset(pte.frame()),
                    self.page_size(),
                    addr,
                    addr - page_addr,
                )?;
                Ok(Freed::Block)
            }
        }
    }

    fn free_large(&self, page: u64, addr: u64) -> Result<Freed> {
        let (owner, index) = self.table.owner(page).expect("the caller checked the window");
        let arena = Arena::new(&self.words, &self.layout, owner, self.me);
        let guard = arena.lock()?;

        // Check again under the lock: a concurrent free of the same
        // allocation from another node may have won.
        let pages = match self.table.load(page)?.1 {
            Aux::Head { pages } => pages as u64,
            Aux::FreedHead => return Err(Error::DoubleFree { addr }),
            _ => return Err(Error::InvalidFree { addr, reason: "no allocation covers it".into() }),
        };

        let mut homes = Vec::with_capacity(pages as usize);
        let mut frames = Vec::with_capacity(pages as usize);
        for i in 0..pages {
            let pte = self.table.load_pte(page + i)?;
            homes.push(pte.home());
            frames.push(pte.frame());
            let aux = if i == 0 { Aux::FreedHead } else { Aux::Free };
            self.table.store(page + i, pte.invalidated(), aux)?;
        }
        self.release_frames(&homes, &frames)?;
        arena.give_back(&guard, index, pages)?;
        Ok(Freed::Pages { first_page: page, pages })
    }
}
