//! The format of a node's segment: where its header, frame free map, page
//! table and frames sit, and the word-level access to them.
//!
//! Every node contributes one segment. Its metadata lives at the front so
//! that any node can update it one-sidedly with the transport's 64-bit
//! atomics; the frames (page-sized slots that hold the pages' bytes) follow
//! at an offset aligned to the page size, so a frame can be mapped straight
//! onto a page of the window.
//!
//! ```text
//! 0x000   header words (magic, geometry, counters, arena lock)
//! 0x100   traffic row: bytes and operations sent to each node
//! ...     frame free map, one bit per frame, set = in use
//! ...     page-table directory, one word per leaf of the node's arena
//! ...     free extents of the node's arena (start page, page count)
//! ...     replica table: read-mostly pages this node holds copies of
//! ...     page-table leaves, LEAF_PAGES entries of eight words each
//! frames  frame_count frames of page_size bytes
//! ```
//!
//! The segment is sparse (a `memfd` grows its memory only where it is
//! touched), so reserving room for every leaf costs memory only for the
//! leaves in use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::topology::NodeId;
use crate::transport::Transport;

/// `MESHMEM` followed by the format version, read as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MESHMEM1");

/// Pages covered by one page-table leaf. A leaf is 32 KiB.
pub const LEAF_PAGES: u64 = 512;

/// Bytes of one page-table entry: the [`Pte`](crate::space::Pte) word, the
/// allocation record, the preferred location, the accessed-by mask, the
/// data generation, the mask of nodes holding replicas, and two spare words.
pub const ENTRY_BYTES: u64 = 64;

/// Offsets of the words of a page-table entry.
pub mod entry {
    pub const PTE: u64 = 0;
    pub const AUX: u64 = 8;
    pub const PREFERRED: u64 = 16;
    pub const ACCESSED_BY: u64 = 24;
    /// Bumped by every write through the API to a read-mostly page; a
    /// replica is current while it matches.
    pub const GENERATION: u64 = 32;
    /// Bit `n` set while node `n` may hold a replica of the page.
    pub const REPLICAS: u64 = 40;
}

/// Free extents of an arena kept in the segment. Frees that would need more
/// leave their address range unused, which costs address space, not memory.
pub const MAX_EXTENTS: u64 = 1024;

/// Header word offsets.
pub mod hdr {
    pub const MAGIC: u64 = 0x00;
    pub const NODE: u64 = 0x08;
    pub const NODES: u64 = 0x10;
    pub const PAGE_SIZE: u64 = 0x18;
    pub const FRAME_COUNT: u64 = 0x20;
    pub const FRAMES_OFFSET: u64 = 0x28;
    /// Frames not in use; decremented before bits are claimed in the free
    /// map, so it never promises more than the map holds.
    pub const FREE_FRAMES: u64 = 0x30;
    /// Arena lock: 0 when free, otherwise 1 + the id of the holder.
    pub const ARENA_LOCK: u64 = 0x38;
    /// First arena page never handed out (guarded by the arena lock).
    pub const ARENA_BUMP: u64 = 0x40;
    /// Number of valid free extents (guarded by the arena lock).
    pub const EXTENT_COUNT: u64 = 0x48;
    /// Next unused page-table leaf (atomic bump).
    pub const NEXT_LEAF: u64 = 0x50;
    /// Address space given up because the extent list was full, in pages.
    pub const LEAKED_PAGES: u64 = 0x58;
    /// Operation epoch of this node's process; migrations advance it to
    /// wait for operations that started before them.
    pub const EPOCH: u64 = 0x60;
    /// Operations in flight in this node's process that started in an even
    /// epoch, then in an odd one.
    pub const ACTIVE_EVEN: u64 = 0x68;
    pub const ACTIVE_ODD: u64 = 0x70;
    /// Group-wide migration lock, used in node 0's segment: 0 when free,
    /// otherwise 1 + the id of the migrating node.
    pub const MIGRATE_LOCK: u64 = 0x78;
    /// Mapping requests to this node's service thread: sequence number of
    /// the latest request, of the latest one done, the operation, and the
    /// page range.
    pub const MAILBOX_SEQ: u64 = 0x80;
    pub const MAILBOX_ACK: u64 = 0x88;
    pub const MAILBOX_OP: u64 = 0x90;
    pub const MAILBOX_FIRST: u64 = 0x98;
    pub const MAILBOX_PAGES: u64 = 0xa0;
    /// 1 while this node's service thread runs.
    pub const SERVICE_ALIVE: u64 = 0xa8;
    /// Lock of this node's replica table: 0 when free, else 1 + the holder.
    pub const REPLICA_LOCK: u64 = 0xb0;
    /// Frames of this node holding replicas.
    pub const REPLICA_FRAMES: u64 = 0xb8;
    /// Start of the traffic row.
    pub const TRAFFIC: u64 = 0x100;
}

/// Where everything sits in one node's segment. Every node computes the same
/// layout from the same geometry, which `join` checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    pub nodes: u64,
    pub page_size: u64,
    pub frame_count: u64,
    pub arena_pages: u64,
    pub bitmap: u64,
    pub directory: u64,
    pub extents: u64,
    pub replicas: u64,
    /// Slots of the replica table, a power of two.
    pub replica_slots: u64,
    pub leaves: u64,
    pub frames: u64,
    pub len: u64,
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

impl SegmentLayout {
    pub fn new(nodes: u64, page_size: u64, frame_count: u64, arena_pages: u64) -> Self {
        let traffic_end = hdr::TRAFFIC + nodes * 16;
        let bitmap = align_up(traffic_end, 64);
        let directory = align_up(bitmap + frame_count.div_ceil(64) * 8, 64);
        let leaf_count = arena_pages.div_ceil(LEAF_PAGES);
        let extents = align_up(directory + leaf_count * 8, 64);
        let replicas = align_up(extents + MAX_EXTENTS * 16, 64);
        let replica_slots = (2 * frame_count).next_power_of_two().max(16);
        let leaves = align_up(replicas + replica_slots * 16, 4096);
        let frames = align_up(leaves + leaf_count * LEAF_PAGES * ENTRY_BYTES, page_size);
        SegmentLayout {
            nodes,
            page_size,
            frame_count,
            arena_pages,
            bitmap,
            directory,
            extents,
            replicas,
            replica_slots,
            leaves,
            frames,
            len: frames + frame_count * page_size,
        }
    }

    /// Offset of the bytes-sent counter for traffic to `dest`.
    #[inline]
    pub fn traffic_bytes(&self, dest: NodeId) -> u64 {
        hdr::TRAFFIC + dest.0 as u64 * 16
    }

    /// Offset of the operation counter for traffic to `dest`.
    #[inline]
    pub fn traffic_ops(&self, dest: NodeId) -> u64 {
        self.traffic_bytes(dest) + 8
    }

    /// Offset of the first byte of `frame`.
    #[inline]
    pub fn frame_offset(&self, frame: u32) -> u64 {
        self.frames + frame as u64 * self.page_size
    }

    /// Writes the header of a fresh, zeroed segment mapped at `base`.
    ///
    /// # Safety
    ///
    /// `base` must point to a writable mapping of at least `self.len` bytes
    /// that no other process uses yet.
    pub unsafe fn initialise(&self, base: *mut u8, node: NodeId) {
        let store = |offset: u64, value: u64| {
            // SAFETY: the caller guarantees the mapping; every offset here is
            // an aligned header or bitmap word inside it.
            unsafe { (*(base.add(offset as usize) as *const AtomicU64)).store(value, Ordering::Relaxed) }
        };
        store(hdr::NODE, node.0 as u64);
        store(hdr::NODES, self.nodes);
        store(hdr::PAGE_SIZE, self.page_size);
        store(hdr::FRAME_COUNT, self.frame_count);
        store(hdr::FRAMES_OFFSET, self.frames);
        store(hdr::FREE_FRAMES, self.frame_count);
        // Padding bits past the last frame stay set so they are never taken.
        let tail = self.frame_count % 64;
        if tail != 0 {
            store(self.bitmap + (self.frame_count / 64) * 8, !0u64 << tail);
        }
        // Release: the magic goes last, so a reader that sees it (with
        // Acquire) sees the rest. Peers read it only after the rendezvous,
        // which orders it anyway.
        // SAFETY: as above.
        unsafe { (*(base.add(hdr::MAGIC as usize) as *const AtomicU64)).store(MAGIC, Ordering::Release) };
    }

    /// Checks that a peer's segment carries this layout.
    pub fn validate(&self, words: &Words, node: NodeId) -> Result<()> {
        let corrupt = |reason: String| Error::Corrupt { node, reason };
        let magic = words.load(node, hdr::MAGIC)?;
        if magic != MAGIC {
            return Err(corrupt(format!("magic {magic:#x}, expected {MAGIC:#x}")));
        }
        for (name, offset, expected) in [
            ("node id", hdr::NODE, node.0 as u64),
            ("node count", hdr::NODES, self.nodes),
            ("page size", hdr::PAGE_SIZE, self.page_size),
            ("frame count", hdr::FRAME_COUNT, self.frame_count),
            ("frames offset", hdr::FRAMES_OFFSET, self.frames),
        ] {
            let found = words.load(node, offset)?;
            if found != expected {
                return Err(corrupt(format!("{name} is {found}, expected {expected}")));
            }
        }
        Ok(())
    }
}

/// Word-level access to any node's segment: plain atomics where the
/// transport gives a local view, its one-sided operations elsewhere.
///
/// Metadata (free maps, page tables, slab bitmaps, locks) is only ever
/// touched through these 64-bit operations, so the same code runs over
/// shared memory, RDMA atomics or TCP.
#[derive(Clone)]
pub struct Words {
    transport: Arc<dyn Transport>,
    /// Base address of each node's segment in this process, or null.
    views: Arc<[(usize, u64)]>,
}

impl Words {
    pub fn new(transport: Arc<dyn Transport>, nodes: usize) -> Self {
        let views = (0..nodes)
            .map(|n| match transport.local_view(NodeId(n as u16)) {
                Some(view) => (view.ptr as usize, view.len),
                None => (0, 0),
            })
            .collect();
        Words { transport, views }
    }

    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Returns the word at `offset` of `node`'s segment when it is mapped in
    /// this process.
    #[inline]
    fn local(&self, node: NodeId, offset: u64) -> Option<&AtomicU64> {
        let &(base, len) = self.views.get(node.index())?;
        if base == 0 || offset % 8 != 0 || offset.checked_add(8)? > len {
            return None;
        }
        // SAFETY: the view maps `len` bytes of the segment for the lifetime of
        // the transport, which `self` keeps alive; the offset is in bounds and
        // 8-byte aligned (segments are page aligned), and every process
        // touches these words only atomically.
        Some(unsafe { &*((base + offset as usize) as *const AtomicU64) })
    }

    /// Returns `count` words at `offset` of `node`'s segment when it is mapped
    /// in this process: the fast path of metadata that is read and written
    /// word by word.
    #[inline]
    pub fn local_words(&self, node: NodeId, offset: u64, count: u64) -> Option<&[AtomicU64]> {
        let &(base, len) = self.views.get(node.index())?;
        let end = offset.checked_add(count.checked_mul(8)?)?;
        if base == 0 || offset % 8 != 0 || end > len {
            return None;
        }
        // SAFETY: as in `local`, for every word of the range.
        Some(unsafe { std::slice::from_raw_parts((base + offset as usize) as *const AtomicU64, count as usize) })
    }

    #[inline]
    pub fn load(&self, node: NodeId, offset: u64) -> Result<u64> {
        match self.local(node, offset) {
            Some(word) => Ok(word.load(Ordering::Acquire)),
            None => self.transport.fetch_add_u64(node, offset, 0),
        }
    }

    /// Loads with sequentially consistent ordering, for the checks that pair
    /// with migration marks.
    #[inline]
    pub fn load_seqcst(&self, node: NodeId, offset: u64) -> Result<u64> {
        match self.local(node, offset) {
            Some(word) => Ok(word.load(Ordering::SeqCst)),
            None => self.transport.fetch_add_u64(node, offset, 0),
        }
    }

    #[inline]
    pub fn store(&self, node: NodeId, offset: u64, value: u64) -> Result<()> {
        match self.local(node, offset) {
            Some(word) => {
                // SeqCst: page-table stores pair with the SeqCst checks that
                // mapping code makes after it maps a page.
                word.store(value, Ordering::SeqCst);
                Ok(())
            }
            None => {
                let mut current = self.load(node, offset)?;
                loop {
                    match self.compare_exchange(node, offset, current, value)? {
                        Ok(_) => return Ok(()),
                        Err(actual) => current = actual,
                    }
                }
            }
        }
    }

    #[inline]
    pub fn fetch_add(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        match self.local(node, offset) {
            // SeqCst: a migrator's epoch advance must be ordered with the
            // operations' counter increments and entry loads.
            Some(word) => Ok(word.fetch_add(value, Ordering::SeqCst)),
            None => self.transport.fetch_add_u64(node, offset, value),
        }
    }

    /// Compares and swaps; `Ok(previous)` on success, `Err(actual)` when the
    /// word held something else.
    #[inline]
    pub fn compare_exchange(
        &self,
        node: NodeId,
        offset: u64,
        current: u64,
        new: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        match self.local(node, offset) {
            // SeqCst: migration marks pages with this and relies on a total
            // order with the SeqCst mapping records of the fault handler.
            Some(word) => Ok(word.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)),
            None => {
                let previous = self.transport.compare_exchange_u64(node, offset, current, new)?;
                Ok(if previous == current { Ok(previous) } else { Err(previous) })
            }
        }
    }

    /// Applies `update` to the word until it sticks, and returns the old value.
    #[inline]
    pub fn fetch_update(
        &self,
        node: NodeId,
        offset: u64,
        mut update: impl FnMut(u64) -> Option<u64>,
    ) -> Result<std::result::Result<u64, u64>> {
        let mut current = self.load(node, offset)?;
        loop {
            let Some(new) = update(current) else { return Ok(Err(current)) };
            match self.compare_exchange(node, offset, current, new)? {
                Ok(previous) => return Ok(Ok(previous)),
                Err(actual) => current = actual,
            }
        }
    }

    /// Replaces the word and returns its old value.
    #[inline]
    pub fn swap(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        match self.local(node, offset) {
            Some(word) => Ok(word.swap(value, Ordering::AcqRel)),
            None => Ok(self.fetch_update(node, offset, |_| Some(value))?.unwrap_or(0)),
        }
    }

    #[inline]
    pub fn fetch_or(&self, node: NodeId, offset: u64, bits: u64) -> Result<u64> {
        match self.local(node, offset) {
            Some(word) => Ok(word.fetch_or(bits, Ordering::AcqRel)),
            None => Ok(self.fetch_update(node, offset, |w| Some(w | bits))?.unwrap_or(0)),
        }
    }

    #[inline]
    pub fn fetch_and(&self, node: NodeId, offset: u64, bits: u64) -> Result<u64> {
        match self.local(node, offset) {
            Some(word) => Ok(word.fetch_and(bits, Ordering::AcqRel)),
            None => Ok(self.fetch_update(node, offset, |w| Some(w & bits))?.unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_ordered_and_aligned() {
        let layout = SegmentLayout::new(8, 2 << 20, 512, 65536);
        assert!(layout.bitmap >= hdr::TRAFFIC + 8 * 16);
        assert!(layout.directory >= layout.bitmap + 8 * 8);
        assert!(layout.extents >= layout.directory + 128 * 8);
        assert!(layout.replicas >= layout.extents + MAX_EXTENTS * 16);
        assert!(layout.leaves >= layout.replicas + layout.replica_slots * 16);
        assert!(layout.frames >= layout.leaves + 128 * LEAF_PAGES * ENTRY_BYTES);
        assert_eq!(layout.frames % (2 << 20), 0);
        assert_eq!(layout.len, layout.frames + 512 * (2 << 20));
        assert_eq!(layout.frame_offset(3), layout.frames + 3 * (2 << 20));
    }
}
