//! A node's arena of the window: which of its pages of address space are
//! handed out.
//!
//! The state lives in the arena owner's segment, so a free from any node
//! can return address space: a bump pointer (pages past it were never used)
//! and a sorted list of free extents below it, both guarded by the arena
//! lock word. Allocation is first fit over the extents, then the bump
//! pointer. Frees merge with neighbouring extents and lower the bump pointer
//! when they end at it.
//!
//! Lock order: the arena lock is taken before any frame-map or page-table
//! word it guards is touched, and no other lock is held with it.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::{hdr, SegmentLayout, Words, MAX_EXTENTS};
use crate::topology::NodeId;

pub(crate) struct Arena<'a> {
    words: &'a Words,
    layout: &'a SegmentLayout,
    owner: NodeId,
    me: NodeId,
}

/// Held arena lock; released on drop.
pub(crate) struct ArenaGuard<'a> {
    arena: &'a Arena<'a>,
}

impl Drop for ArenaGuard<'_> {
    fn drop(&mut self) {
        let arena = self.arena;
        // A failed store can only come from a transport that lost its peer;
        // the group is unusable then and the lock no longer matters.
        if let Err(e) = arena.words.store(arena.owner, hdr::ARENA_LOCK, 0) {
            tracing::error!(node = %arena.owner, "releasing the arena lock failed: {e}");
        }
    }
}

impl<'a> Arena<'a> {
    pub fn new(words: &'a Words, layout: &'a SegmentLayout, owner: NodeId, me: NodeId) -> Self {
        Arena { words, layout, owner, me }
    }

    /// Takes the arena lock, spinning briefly and then yielding.
    pub fn lock(&'a self) -> Result<ArenaGuard<'a>> {
        let holder = self.me.0 as u64 + 1;
        let mut spins = 0u32;
        loop {
            if self.words.compare_exchange(self.owner, hdr::ARENA_LOCK, 0, holder)?.is_ok() {
                return Ok(ArenaGuard { arena: self });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 1024 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn extents(&self) -> Result<Vec<(u64, u64)>> {
        let count = self.words.load(self.owner, hdr::EXTENT_COUNT)?.min(MAX_EXTENTS);
        (0..count)
            .map(|i| {
                let at = self.layout.extents + i * 16;
                Ok((self.words.load(self.owner, at)?, self.words.load(self.owner, at + 8)?))
            })
            .collect()
    }

    fn store_extents(&self, extents: &[(u64, u64)]) -> Result<()> {
        for (i, &(start, len)) in extents.iter().enumerate() {
            let at = self.layout.extents + i as u64 * 16;
            self.words.store(self.owner, at, start)?;
            self.words.store(self.owner, at + 8, len)?;
        }
        self.words.store(self.owner, hdr::EXTENT_COUNT, extents.len() as u64)
    }

    /// Takes `pages` pages aligned to `align` pages; returns the first page's
    /// index within the arena. The caller holds the lock.
    pub fn take(&self, _guard: &ArenaGuard<'_>, pages: u64, align: u64) -> Result<u64> {
        let mut extents = self.extents()?;
        for i in 0..extents.len() {
            let (start, len) = extents[i];
            let aligned = start.div_ceil(align) * align;
            if aligned + pages <= start + len {
                let before = (start, aligned - start);
                let after = (aligned + pages, start + len - aligned - pages);
                let pieces: Vec<(u64, u64)> = [before, after].into_iter().filter(|p| p.1 > 0).collect();
                extents.splice(i..=i, pieces);
                self.store_extents(&extents)?;
                return Ok(aligned);
            }
        }

        let bump = self.words.load(self.owner, hdr::ARENA_BUMP)?;
        let start = bump.div_ceil(align) * align;
        if start + pages > self.layout.arena_pages {
            return Err(Error::OutOfAddressSpace { node: self.owner, requested: pages * self.layout.page_size });
        }
        if start > bump {
            self.insert(&mut extents, bump, start - bump)?;
            self.store_extents(&extents)?;
        }
        self.words.store(self.owner, hdr::ARENA_BUMP, start + pages)?;
        Ok(start)
    }

    /// Returns `pages` pages at arena index `start`. The caller holds the lock.
    pub fn give_back(&self, _guard: &ArenaGuard<'_>, start: u64, pages: u64) -> Result<()> {
        let mut extents = self.extents()?;
        let bump = self.words.load(self.owner, hdr::ARENA_BUMP)?;
        if start + pages == bump {
            // Merge with a free extent that ends where this range starts.
            let mut new_bump = start;
            if let Some(&(s, l)) = extents.last() {
                if s + l == start {
                    new_bump = s;
                    extents.pop();
                }
            }
            self.store_extents(&extents)?;
            return self.words.store(self.owner, hdr::ARENA_BUMP, new_bump);
        }
        self.insert(&mut extents, start, pages)?;
        self.store_extents(&extents)
    }

    fn insert(&self, extents: &mut Vec<(u64, u64)>, start: u64, pages: u64) -> Result<()> {
        let at = extents.partition_point(|&(s, _)| s < start);
        extents.insert(at, (start, pages));
        if at + 1 < extents.len() && extents[at].0 + extents[at].1 == extents[at + 1].0 {
            extents[at].1 += extents[at + 1].1;
            extents.remove(at + 1);
        }
        if at > 0 && extents[at - 1].0 + extents[at - 1].1 == extents[at].0 {
            extents[at - 1].1 += extents[at].1;
            extents.remove(at);
        }
        if extents.len() as u64 > MAX_EXTENTS {
            // Drop the smallest extent; its pages stay unused until the group ends.
            let smallest = (0..extents.len()).min_by_key(|&i| extents[i].1).expect("not empty");
            let (_, lost) = extents.remove(smallest);
            self.words.fetch_add(self.owner, hdr::LEAKED_PAGES, lost)?;
            tracing::warn!(node = %self.owner, pages = lost, "arena extent list full; address space left unused");
        }
        Ok(())
    }
}
