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
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

pub use placement::Placement;

use crate::error::{Error, Result};
use crate::frames::Frames;
use crate::layout::{SegmentLayout, Words};
use crate::space::{Aux, GlobalAddr, PageTable, Pte};
use crate::topology::{Mesh3d, NodeId};
use arena::Arena;
use slab::Slab;

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

/// The memory a free released, for the caller to unmap.
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

/// The part of a pool that a thread's heap keeps: the words to abandon its
/// slabs through, and the list that abandoned slabs go to.
struct Shared {
    id: u64,
    words: Words,
    abandoned: Mutex<Vec<Slab>>,
}

/// The slabs one thread owns in one pool, by `home * classes + class`.
struct ThreadHeap {
    id: u64,
    shared: Weak<Shared>,
    lists: Vec<SlabList>,
}

impl Drop for ThreadHeap {
    fn drop(&mut self) {
        // The thread is exiting: hand its slabs to the pool so that another
        // thread adopts them. If the pool is gone, so are its segments.
        let Some(shared) = self.shared.upgrade() else { return };
        let mut abandoned = shared.abandoned.lock();
        for slab in self.lists.iter().flat_map(|list| list.slabs.iter()) {
            if let Err(e) = slab.abandon(&shared.words) {
                tracing::warn!(node = %slab.home, "abandoning a slab failed: {e}");
                continue;
            }
            abandoned.push(*slab);
        }
    }
}

thread_local! {
    static THREAD_HEAPS: RefCell<Vec<ThreadHeap>> = const { RefCell::new(Vec::new()) };
}

static NEXT_HEAP_ID: AtomicU64 = AtomicU64::new(1);

/// The allocator state of one node process.
pub(crate) struct Heap {
    pub me: NodeId,
    pub mesh: Mesh3d,
    pub layout: SegmentLayout,
    pub words: Words,
    pub table: PageTable,
    pub frames: Frames,
    pub window_base: u64,
    classes: usize,
    /// Slab geometry of each size class.
    geometries: Vec<slab::Geometry>,
    page_shift: u32,
    shared: Arc<Shared>,
    cursor: AtomicU64,
}

impl Heap {
    pub fn new(me: NodeId, mesh: Mesh3d, layout: SegmentLayout, words: Words, window_base: u64) -> Self {
        let table = PageTable::new(words.clone(), layout, mesh.len() as u64);
        let frames = Frames::new(words.clone(), layout);
        let shared = Arc::new(Shared {
            id: NEXT_HEAP_ID.fetch_add(1, Ordering::Relaxed),
            words: words.clone(),
            abandoned: Mutex::new(Vec::new()),
        });
        Heap {
            me,
            mesh,
            layout,
            words,
            table,
            frames,
            window_base,
            classes: slab::class_count(layout.page_size),
            geometries: (0..slab::class_count(layout.page_size) as u8)
                .map(|class| slab::Geometry::new(class, layout.page_size))
                .collect(),
            page_shift: layout.page_size.trailing_zeros(),
            shared,
            cursor: AtomicU64::new(me.0 as u64),
        }
    }

    #[inline]
    fn page_size(&self) -> u64 {
        self.layout.page_size
    }

    #[inline]
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

    #[inline]
    pub fn alloc(&self, layout: Layout, placement: &Placement, advice: Advice) -> Result<GlobalAddr> {
        self.check_layout(layout)?;
        if !matches!(placement, Placement::Local) {
            placement.validate(&self.mesh)?;
        }
        if advice != Advice::None {
            advice.validate(&self.mesh)?;
        }
        match slab::class_of(layout.size(), layout.align(), self.page_size()) {
            Some(_) if advice != Advice::None => Err(Error::InvalidLayout {
                size: layout.size(),
                align: layout.align(),
                reason: format!(
                    "advice applies to whole pages, and blocks of up to {} bytes share pages; allocate more or pass Advice::None",
                    self.page_size() / 8
                ),
            }),
            Some(class) => self.alloc_small(class, layout.size(), placement),
            None => {
                let addr = self.alloc_large(layout.size() as u64, placement)?;
                if advice != Advice::None {
                    let advised = crate::coherence::change(self, addr.0, layout.size() as u64, advice, crate::coherence::Change::Set);
                    if let Err(e) = advised {
                        self.free(addr.0)?;
                        return Err(e);
                    }
                }
                Ok(addr)
            }
        }
    }

    fn free_counts(&self) -> Result<Vec<u64>> {
        self.mesh.nodes().map(|n| self.frames.free_frames(n)).collect()
    }

    fn alloc_large(&self, size: u64, placement: &Placement) -> Result<GlobalAddr> {
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
            self.table.store(page, Pte::new(home, frame, old.version() + 1, 0), aux)?;
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

    /// Picks the node a small allocation goes to.
    #[inline]
    fn small_home(&self, class: u8, placement: &Placement) -> Result<NodeId> {
        Ok(match placement {
            Placement::Local => self.me,
            Placement::Node(node) => *node,
            other => self.small_home_slow(class, other)?,
        })
    }

    #[cold]
    fn small_home_slow(&self, class: u8, placement: &Placement) -> Result<NodeId> {
        Ok(match placement {
            Placement::Local => self.me,
            Placement::Node(node) => *node,
            Placement::Nearest(coord) => {
                let origin = self.mesh.node_at(*coord)?;
                let mut chosen = origin;
                for node in self.mesh.by_distance(origin)? {
                    let has_block = self.with_thread_heap(|heap| {
                        heap.lists.get(node.index() * self.classes + class as usize).is_some_and(|list| !list.slabs.is_empty())
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

    /// Runs `f` on this thread's heap for this pool, creating it first.
    #[inline]
    fn with_thread_heap<R>(&self, f: impl FnOnce(&mut ThreadHeap) -> R) -> R {
        THREAD_HEAPS.with(|heaps| {
            let mut heaps = heaps.borrow_mut();
            let index = match heaps.iter().position(|heap| heap.id == self.shared.id) {
                Some(index) => index,
                None => {
                    heaps.retain(|heap| heap.shared.strong_count() > 0);
                    heaps.push(ThreadHeap { id: self.shared.id, shared: Arc::downgrade(&self.shared), lists: Vec::new() });
                    heaps.len() - 1
                }
            };
            f(&mut heaps[index])
        })
    }

    #[inline]
    fn alloc_small(&self, class: u8, size: usize, placement: &Placement) -> Result<GlobalAddr> {
        let home = self.small_home(class, placement)?;
        let index = home.index() * self.classes + class as usize;
        let fast = self.with_thread_heap(|heap| match heap.lists.get_mut(index) {
            Some(list) => match list.slabs.get_mut(list.current) {
                Some(slab) => slab.claim(&self.words),
                None => Ok(None),
            },
            None => Ok(None),
        })?;
        match fast {
            Some(addr) => Ok(GlobalAddr(addr)),
            None => self.alloc_small_slow(home, class, size, index),
        }
    }

    /// The current slab is full: take back remote frees, return empty slabs,
    /// adopt an abandoned slab, or start a new one.
    #[cold]
    fn alloc_small_slow(&self, home: NodeId, class: u8, size: usize, index: usize) -> Result<GlobalAddr> {
        // 1. Blocks freed by other threads or nodes into this thread's slabs.
        let (found, empty) = self.with_thread_heap(|heap| -> Result<(Option<u64>, Vec<Slab>)> {
            if heap.lists.len() <= index {
                heap.lists.resize_with(index + 1, SlabList::default);
            }
            let list = &mut heap.lists[index];
            let mut found = None;
            for i in 0..list.slabs.len() {
                list.slabs[i].collect(&self.words)?;
                if found.is_none() {
                    if let Some(addr) = list.slabs[i].claim(&self.words)? {
                        list.current = i;
                        found = Some(addr);
                    }
                }
            }
            // Slabs with nothing handed out go back to the pool, except the
            // one in use.
            let mut empty = Vec::new();
            let mut i = 0;
            while i < list.slabs.len() {
                if i != list.current && list.slabs[i].is_empty(&self.words)? {
                    empty.push(list.slabs.remove(i));
                    if list.current > i {
                        list.current -= 1;
                    }
                } else {
                    i += 1;
                }
            }
            Ok((found, empty))
        })?;
        for slab in empty {
            let page = (slab.page_addr - self.window_base) / self.page_size();
            self.free_pages(page, slab.page_addr, true)?;
        }
        if let Some(addr) = found {
            return Ok(GlobalAddr(addr));
        }

        // 2. A slab that an exited thread left behind.
        let adopted = {
            let mut abandoned = self.shared.abandoned.lock();
            abandoned.iter().position(|s| s.home == home && s.class == class).map(|i| abandoned.swap_remove(i))
        };
        if let Some(mut slab) = adopted {
            slab.adopt(&self.words)?;
            if let Some(addr) = slab.claim(&self.words)? {
                self.push_slab(index, slab);
                return Ok(GlobalAddr(addr));
            }
            self.push_slab(index, slab);
        }

        // 3. A new slab page on `home`.
        let page_addr = self.alloc_large(self.page_size(), &Placement::Node(home)).map_err(|e| match e {
            Error::OutOfMemory { node, free, .. } => Error::OutOfMemory { node, requested: size as u64, free },
            other => other,
        })?;
        let page = (page_addr.0 - self.window_base) / self.page_size();
        let pte = self.table.load_pte(page)?;
        let offset = self.layout.frame_offset(pte.frame());
        let mut slab = Slab::initialise(&self.words, page_addr.0, home, offset, class, self.page_size())?;
        self.table.store(page, pte, Aux::Slab { class })?;
        let addr = slab.claim(&self.words)?.expect("a fresh slab has free blocks");
        self.push_slab(index, slab);
        Ok(GlobalAddr(addr))
    }

    fn push_slab(&self, index: usize, slab: Slab) {
        self.with_thread_heap(|heap| {
            if heap.lists.len() <= index {
                heap.lists.resize_with(index + 1, SlabList::default);
            }
            let list = &mut heap.lists[index];
            list.slabs.push(slab);
            list.current = list.slabs.len() - 1;
        })
    }

    /// Frees the allocation at `addr`, which must lie in the window.
    #[inline]
    pub fn free(&self, addr: u64) -> Result<Freed> {
        let page = (addr - self.window_base) >> self.page_shift;
        let page_addr = self.window_base + (page << self.page_shift);
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
            Aux::Head { .. } => self.free_pages(page, addr, false),
            Aux::Slab { class } => {
                let page_offset = self.layout.frame_offset(pte.frame());
                debug_assert!(slab::check_header(&self.words, pte.home(), page_offset, class).is_ok());
                let geometry = self.geometries.get(class as usize).ok_or_else(|| Error::Corrupt {
                    node: pte.home(),
                    reason: format!("page {page} claims slab class {class}, beyond the last class"),
                })?;
                slab::free_block(&self.words, pte.home(), page_offset, geometry, addr, addr - page_addr)?;
                Ok(Freed::Block)
            }
        }
    }

    /// Frees the pages of the allocation whose first page is `page`: a large
    /// allocation, or a slab page when `slab` is set.
    fn free_pages(&self, page: u64, addr: u64, slab: bool) -> Result<Freed> {
        let (owner, index) = self.table.owner(page).expect("the caller checked the window");
        let arena = Arena::new(&self.words, &self.layout, owner, self.me);
        let guard = arena.lock()?;

        // Check again under the lock: a concurrent free of the same
        // allocation from another node may have won.
        let pages = match self.table.load(page)?.1 {
            Aux::Head { pages } if !slab => pages as u64,
            Aux::Slab { .. } if slab => 1,
            Aux::FreedHead => return Err(Error::DoubleFree { addr }),
            _ => return Err(Error::InvalidFree { addr, reason: "no allocation covers it".into() }),
        };

        let mut homes = Vec::with_capacity(pages as usize);
        let mut frames = Vec::with_capacity(pages as usize);
        for i in 0..pages {
            crate::replica::drop_all(&self.words, &self.layout, &self.table, &self.frames, self.me, self.mesh.len(), page + i)?;
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
