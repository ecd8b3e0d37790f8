//! Replicas of read-mostly pages.
//!
//! A node may hold a copy of a read-mostly page homed elsewhere, in one of
//! its own frames, and API reads on that node are then served locally. Each
//! node's segment has a replica table, an open-addressing hash table from
//! global page to `(frame, generation)`, guarded by a lock word; any node
//! may add or drop entries in any node's table, so a prefetch can replicate
//! to another node.
//!
//! Consistency comes from the page's data generation, a word of its
//! page-table entry that every API write to a read-mostly page bumps before
//! it returns. A replica is current while its recorded generation equals the
//! page's, so the bump invalidates every replica at once without touching
//! them. A read checks the generation and the table entry before and after
//! its copy, and falls back to the home when anything changed. A stale
//! replica keeps its frame and is refreshed in place by the next read or
//! prefetch on its node; its frame returns when the allocation is freed or
//! the advice is unset.
//!
//! Raw-pointer loads of a read-mostly page read the home through a
//! read-only mapping; stores through a raw pointer fault, so they cannot
//! bypass the generation.

use std::time::Duration;

use crate::error::Result;
use crate::frames::Frames;
use crate::layout::{entry, hdr, SegmentLayout, Words};
use crate::space::{PageTable, Pte};
use crate::topology::NodeId;
use crate::transport::Transport;

/// Key of a never-used slot.
const EMPTY: u64 = 0;
/// Key of a slot whose entry was dropped; probing continues past it.
const TOMBSTONE: u64 = u64::MAX;
/// Generation recorded while a replica is being filled.
const FILLING: u64 = u32::MAX as u64;

/// A node's replica table.
pub(crate) struct ReplicaTable<'a> {
    pub words: &'a Words,
    pub layout: &'a SegmentLayout,
    pub node: NodeId,
}

/// The held lock of a replica table.
struct TableLock<'a> {
    words: &'a Words,
    node: NodeId,
}

impl Drop for TableLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.words.store(self.node, hdr::REPLICA_LOCK, 0) {
            tracing::error!(node = %self.node, "releasing the replica table lock failed: {e}");
        }
    }
}

impl<'a> ReplicaTable<'a> {
    pub fn new(words: &'a Words, layout: &'a SegmentLayout, node: NodeId) -> Self {
        ReplicaTable { words, layout, node }
    }

    fn lock(&self, me: NodeId) -> Result<TableLock<'a>> {
        let mut spins = 0u32;
        while self.words.compare_exchange(self.node, hdr::REPLICA_LOCK, 0, me.0 as u64 + 1)?.is_err() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(TableLock { words: self.words, node: self.node })
    }

    fn slot(&self, index: u64) -> u64 {
        self.layout.replicas + (index & (self.layout.replica_slots - 1)) * 16
    }

    fn start(&self, page: u64) -> u64 {
        // Fibonacci hashing spreads consecutive pages over the table.
        page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.layout.replica_slots.trailing_zeros())
    }

    /// Returns the slot holding `page`, without the lock.
    fn find(&self, page: u64) -> Result<Option<u64>> {
        let start = self.start(page);
        for probe in 0..self.layout.replica_slots {
            let at = self.slot(start + probe);
            match self.words.load(self.node, at)? {
                EMPTY => return Ok(None),
                key if key == page + 1 => return Ok(Some(at)),
                _ => {}
            }
        }
        Ok(None)
    }

    /// Returns `(frame, generation)` of `page`'s replica, without the lock.
    pub fn lookup(&self, page: u64) -> Result<Option<(u32, u64)>> {
        match self.find(page)? {
            None => Ok(None),
            Some(at) => {
                let value = self.words.load(self.node, at + 8)?;
                Ok(Some((value as u32, value >> 32)))
            }
        }
    }

    /// Copies `page` from its home into this node's replica, taking a frame
    /// for it if it has none, and records the generation it copied. Returns
    /// false, changing nothing, when the node has no free frame.
    pub fn refresh(&self, me: NodeId, table: &PageTable, frames: &Frames, transport: &dyn Transport, page: u64) -> Result<bool> {
        if self.node.0 >= 64 {
            // The replica mask has one bit per node for nodes 0 to 63.
            return Ok(false);
        }
        let _lock = self.lock(me)?;
        let (at, frame) = match self.find(page)? {
            Some(at) => (at, self.words.load(self.node, at + 8)? as u32),
            None => {
                let Ok(taken) = frames.take(self.node, 1) else { return Ok(false) };
                let frame = taken[0];
                let at = self.free_slot(page)?;
                self.words.store(self.node, at + 8, frame as u64 | FILLING << 32)?;
                self.words.store(self.node, at, page + 1)?;
                self.words.fetch_add(self.node, hdr::REPLICA_FRAMES, 1)?;
                let (owner, mask) = table.entry_word(page, entry::REPLICAS)?;
                self.words.fetch_or(owner, mask, 1u64 << self.node.0)?;
                (at, frame)
            }
        };

        // Readers that see FILLING go to the home; the generation read
        // before the copy is recorded only if no write bumped it meanwhile.
        self.words.store(self.node, at + 8, frame as u64 | FILLING << 32)?;
        let (owner, generation_word) = table.entry_word(page, entry::GENERATION)?;
        let before = self.words.load_seqcst(owner, generation_word)? & 0xffff_ffff;
        let pte: Pte = table.load_pte(page)?;
        let mut buffer = vec![0u8; self.layout.page_size as usize];
        transport.read(pte.home(), self.layout.frame_offset(pte.frame()), &mut buffer)?;
        transport.write(self.node, self.layout.frame_offset(frame), &buffer)?;
        let after = self.words.load_seqcst(owner, generation_word)? & 0xffff_ffff;
        let recorded = if before == after && before != FILLING { before } else { FILLING };
        self.words.store(self.node, at + 8, frame as u64 | recorded << 32)?;
        Ok(true)
    }

    /// Returns a slot for a new entry of `page`; the caller holds the lock.
    fn free_slot(&self, page: u64) -> Result<u64> {
        let start = self.start(page);
        for probe in 0..self.layout.replica_slots {
            let at = self.slot(start + probe);
            let key = self.words.load(self.node, at)?;
            if key == EMPTY || key == TOMBSTONE {
                return Ok(at);
            }
        }
        // The table has twice as many slots as the node has frames, and each
        // entry owns a frame, so this means the table is corrupt.
        Err(crate::error::Error::Corrupt {
            node: self.node,
            reason: format!("its replica table of {} slots has no free slot", self.layout.replica_slots),
        })
    }

    /// Drops `page`'s replica and returns its frame to the free map.
    pub fn drop_replica(&self, me: NodeId, frames: &Frames, page: u64) -> Result<()> {
        let _lock = self.lock(me)?;
        if let Some(at) = self.find(page)? {
            let frame = self.words.load(self.node, at + 8)? as u32;
            self.words.store(self.node, at, TOMBSTONE)?;
            self.words.fetch_add(self.node, hdr::REPLICA_FRAMES, u64::MAX)?;
            frames.release(self.node, &[frame])?;
        }
        Ok(())
    }
}

/// Drops every replica of `page`, on every node its mask names.
pub(crate) fn drop_all(
    words: &Words,
    layout: &SegmentLayout,
    table: &PageTable,
    frames: &Frames,
    me: NodeId,
    nodes: usize,
    page: u64,
) -> Result<()> {
    let (owner, mask_word) = table.entry_word(page, entry::REPLICAS)?;
    let mask = words.swap(owner, mask_word, 0)?;
    for node in (0..nodes.min(64)).filter(|n| mask & (1u64 << n) != 0) {
        ReplicaTable::new(words, layout, NodeId(node as u16)).drop_replica(me, frames, page)?;
    }
    Ok(())
}
