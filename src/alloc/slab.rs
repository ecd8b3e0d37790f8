//! Small allocations: size-class slabs inside pages homed on the chosen node.
//!
//! A slab is one page of equal blocks of a power-of-two size class, from
//! 16 bytes to an eighth of a page. Each slab is owned by one thread of one
//! node process (its owner token), which alone hands out its blocks, as in
//! mimalloc's per-thread heaps. The page holds two bitmaps, one bit per
//! block:
//!
//! - the allocation map, written only by the owner thread with plain
//!   stores: set while the block is handed out;
//! - the remote-free map: a free from any other thread or node sets the
//!   block's bit with one `fetch_or`. The owner collects these bits with
//!   `swap(0)` when it runs out of blocks, and clears them in its
//!   allocation map.
//!
//! So the owner allocates and frees with loads and stores only; a remote
//! free is one atomic. A free of a block whose allocation bit is clear, or
//! whose remote-free bit is already set, is a double free (or a free of an
//! address never returned) and fails without changing anything.
//!
//! When a thread exits, its slabs are abandoned (owner token 0): remote
//! frees keep working, and the next thread that needs a slab of that home
//! and class adopts it.
//!
//! ```text
//! 0   magic        8  class       16  capacity   24  owner token
//! 64                     allocation map (padding bits set)
//! 64 + 8 * words         remote-free map
//! first_block            blocks of class_size bytes
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::layout::Words;
use crate::topology::NodeId;

/// `SLAB` followed by its format version.
const SLAB_MAGIC: u64 = u64::from_le_bytes(*b"SLAB\0\0\0\x02");

const MAGIC_AT: u64 = 0;
const CLASS_AT: u64 = 8;
const CAPACITY_AT: u64 = 16;
const OWNER_AT: u64 = 24;
const MAPS_AT: u64 = 64;

/// The smallest block: 16 bytes, enough for any scalar and the common
/// `max_align_t`.
pub const MIN_CLASS_SHIFT: u32 = 4;

/// Number of size classes a page of `page_size` bytes has.
pub fn class_count(page_size: u64) -> usize {
    ((page_size / 8).trailing_zeros() + 1 - MIN_CLASS_SHIFT) as usize
}

/// Size class of a request, or `None` when it needs whole pages: blocks go up
/// to an eighth of a page so that a slab holds at least a handful.
#[inline]
pub fn class_of(size: usize, align: usize, page_size: u64) -> Option<u8> {
    let block = size.max(align).max(1 << MIN_CLASS_SHIFT).checked_next_power_of_two()?;
    (block as u64 <= page_size / 8).then(|| (block.trailing_zeros() - MIN_CLASS_SHIFT) as u8)
}

/// This thread's owner token: the process id in the high half, a number
/// unique within the process in the low half. Never 0, which marks an
/// abandoned slab.
#[inline]
pub fn owner_token() -> u64 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    thread_local! {
        static TOKEN: Cell<u64> = const { Cell::new(0) };
    }
    TOKEN.with(|token| {
        if token.get() == 0 {
            let thread = NEXT.fetch_add(1, Ordering::Relaxed) as u64;
            token.set((std::process::id() as u64) << 32 | thread);
        }
        token.get()
    })
}

/// The layout of a slab of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block: u64,
    pub block_shift: u32,
    pub capacity: u64,
    pub first_block: u64,
    pub bitmap_words: u64,
}

impl Geometry {
    pub fn new(class: u8, page_size: u64) -> Geometry {
        let block = 1u64 << (class as u32 + MIN_CLASS_SHIFT);
        let bitmap_words = (page_size / block).div_ceil(64);
        let first_block = (MAPS_AT + 2 * bitmap_words * 8).div_ceil(block) * block;
        let capacity = (page_size - first_block) / block;
        Geometry { block, block_shift: class as u32 + MIN_CLASS_SHIFT, capacity, first_block, bitmap_words }
    }

    #[inline]
    fn alloc_word(&self, word: u64) -> u64 {
        MAPS_AT + word * 8
    }

    #[inline]
    fn remote_word(&self, word: u64) -> u64 {
        MAPS_AT + (self.bitmap_words + word) * 8
    }

    /// The allocation-map bits of `word` that stand for no block.
    fn padding(&self, word: u64) -> u64 {
        let first = word * 64;
        if first >= self.capacity {
            u64::MAX
        } else if self.capacity - first < 64 {
            !0u64 << (self.capacity - first)
        } else {
            0
        }
    }

    /// Index of the block at `offset` in the page, or why it is not a block.
    #[inline]
    pub fn block_index(&self, offset: u64) -> std::result::Result<u64, String> {
        if offset < self.first_block {
            return Err(format!("it points into the header of a slab of {}-byte blocks", self.block));
        }
        let relative = offset - self.first_block;
        let index = relative >> self.block_shift;
        let inside = relative & (self.block - 1);
        if inside != 0 {
            return Err(format!("it points {inside} bytes into a {}-byte block", self.block));
        }
        if index >= self.capacity {
            return Err(format!("it points past the last block of a slab of {}-byte blocks", self.block));
        }
        Ok(index)
    }
}

/// One slab as its owner thread sees it.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    /// Global address of the slab page.
    pub page_addr: u64,
    pub home: NodeId,
    pub class: u8,
    /// Offset of the page in the home node's segment.
    pub offset: u64,
    pub geometry: Geometry,
    /// Allocation-map word to start the next search at.
    pub hint: u64,
}

impl Slab {
    /// Writes a fresh header and maps into a newly taken page, owned by the
    /// calling thread.
    pub fn initialise(words: &Words, page_addr: u64, home: NodeId, offset: u64, class: u8, page_size: u64) -> Result<Slab> {
        let geometry = Geometry::new(class, page_size);
        for word in 0..geometry.bitmap_words {
            words.store(home, offset + geometry.alloc_word(word), geometry.padding(word))?;
            words.store(home, offset + geometry.remote_word(word), 0)?;
        }
        words.store(home, offset + CLASS_AT, class as u64)?;
        words.store(home, offset + CAPACITY_AT, geometry.capacity)?;
        words.store(home, offset + OWNER_AT, owner_token())?;
        words.store(home, offset + MAGIC_AT, SLAB_MAGIC)?;
        Ok(Slab { page_addr, home, class, offset, geometry, hint: 0 })
    }

    /// Hands out a block and returns its global address, or `None` when every
    /// block is out. Owner thread only.
    #[inline]
    pub fn claim(&mut self, words: &Words) -> Result<Option<u64>> {
        let count = self.geometry.bitmap_words;
        if let Some(map) = words.local_words(self.home, self.offset + MAPS_AT, count) {
            let mut word = self.hint as usize;
            for _ in 0..count {
                if word >= map.len() {
                    word = 0;
                }
                // Relaxed: only this thread writes the allocation map; readers
                // on other nodes synchronise through the handoff of the
                // address itself.
                let current = map[word].load(Ordering::Relaxed);
                if current != u64::MAX {
                    let bit = (!current).trailing_zeros() as u64;
                    map[word].store(current | 1 << bit, Ordering::Release);
                    self.hint = word as u64;
                    return Ok(Some(self.block_addr(word as u64 * 64 + bit)));
                }
                word += 1;
            }
            return Ok(None);
        }

        let mut word = self.hint;
        for _ in 0..count {
            if word >= count {
                word = 0;
            }
            let at = self.offset + self.geometry.alloc_word(word);
            let current = words.load(self.home, at)?;
            if current != u64::MAX {
                let bit = (!current).trailing_zeros() as u64;
                // Only the owner writes the allocation map, so a plain store
                // cannot lose another thread's update.
                words.store(self.home, at, current | 1 << bit)?;
                self.hint = word;
                return Ok(Some(self.block_addr(word * 64 + bit)));
            }
            word += 1;
        }
        Ok(None)
    }

    #[inline]
    fn block_addr(&self, index: u64) -> u64 {
        self.page_addr + self.geometry.first_block + (index << self.geometry.block_shift)
    }

    /// Takes the blocks other threads and nodes freed back into the
    /// allocation map, and returns how many. Owner thread only.
    pub fn collect(&mut self, words: &Words) -> Result<u64> {
        let mut collected = 0;
        for word in 0..self.geometry.bitmap_words {
            let remote = self.offset + self.geometry.remote_word(word);
            if words.load(self.home, remote)? == 0 {
                continue;
            }
            let freed = words.swap(self.home, remote, 0)?;
            let at = self.offset + self.geometry.alloc_word(word);
            let current = words.load(self.home, at)?;
            words.store(self.home, at, current & !freed)?;
            collected += freed.count_ones() as u64;
            self.hint = self.hint.min(word);
        }
        Ok(collected)
    }

    /// Returns whether no block is handed out. Owner thread only, after
    /// `collect`.
    pub fn is_empty(&self, words: &Words) -> Result<bool> {
        for word in 0..self.geometry.bitmap_words {
            if words.load(self.home, self.offset + self.geometry.alloc_word(word))? != self.geometry.padding(word) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Marks the slab as having no owner, for another thread to adopt.
    pub fn abandon(&self, words: &Words) -> Result<()> {
        words.store(self.home, self.offset + OWNER_AT, 0)
    }

    /// Makes the calling thread the owner of an abandoned slab.
    pub fn adopt(&mut self, words: &Words) -> Result<()> {
        words.store(self.home, self.offset + OWNER_AT, owner_token())?;
        self.collect(words).map(|_| ())
    }
}

/// Frees the block at `offset` of the slab page with `geometry` held at
/// `page_offset` of `home`'s segment. Any thread of any node may call this.
///
/// NOTE: a second free from another thread is refused when it comes after
/// the first, but one that races with the owner collecting the first free
/// can pass both checks (it read the allocation bit before the owner
/// cleared it, and the remote-free bit after). Its bit then stays in the
/// remote-free map and may release the block's next allocation early. A
/// sequence counter per block would close this at the cost of a word per
/// block.
#[inline]
pub fn free_block(words: &Words, home: NodeId, page_offset: u64, geometry: &Geometry, addr: u64, offset: u64) -> Result<()> {
    let index = geometry.block_index(offset).map_err(|reason| Error::InvalidFree { addr, reason })?;
    let (word, bit) = (index / 64, 1u64 << (index % 64));
    let alloc_at = page_offset + geometry.alloc_word(word);
    let remote_at = page_offset + geometry.remote_word(word);

    if let (Some([owner]), Some([alloc]), Some([remote])) = (
        words.local_words(home, page_offset + OWNER_AT, 1),
        words.local_words(home, alloc_at, 1),
        words.local_words(home, remote_at, 1),
    ) {
        let allocated = alloc.load(Ordering::Acquire);
        if allocated & bit == 0 || remote.load(Ordering::Acquire) & bit != 0 {
            return Err(Error::DoubleFree { addr });
        }
        if owner.load(Ordering::Relaxed) == owner_token() {
            alloc.store(allocated & !bit, Ordering::Release);
            return Ok(());
        }
        // AcqRel: the owner's `swap` that collects this bit must see the
        // caller's last writes to the block before it reuses it.
        if remote.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(Error::DoubleFree { addr });
        }
        return Ok(());
    }

    let allocated = words.load(home, alloc_at)?;
    if allocated & bit == 0 || words.load(home, remote_at)? & bit != 0 {
        return Err(Error::DoubleFree { addr });
    }
    if words.load(home, page_offset + OWNER_AT)? == owner_token() {
        // Owner thread: clear the allocation bit directly.
        words.store(home, alloc_at, allocated & !bit)?;
        return Ok(());
    }
    let previous = words.fetch_or(home, remote_at, bit)?;
    if previous & bit != 0 {
        return Err(Error::DoubleFree { addr });
    }
    Ok(())
}

/// Checks the header of the slab page at `page_offset` of `home`.
pub fn check_header(words: &Words, home: NodeId, page_offset: u64, class: u8) -> Result<()> {
    let magic = words.load(home, page_offset + MAGIC_AT)?;
    let stored = words.load(home, page_offset + CLASS_AT)?;
    if magic != SLAB_MAGIC || stored != class as u64 {
        return Err(Error::Corrupt {
            node: home,
            reason: format!("slab page at offset {page_offset:#x} has magic {magic:#x} and class {stored}, expected class {class}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_sizes_and_alignments() {
        let page = 2 << 20;
        assert_eq!(class_of(1, 1, page), Some(0));
        assert_eq!(class_of(16, 8, page), Some(0));
        assert_eq!(class_of(17, 8, page), Some(1));
        assert_eq!(class_of(8, 64, page), Some(2));
        assert_eq!(class_of(256 << 10, 8, page), Some(14));
        assert_eq!(class_of((256 << 10) + 1, 8, page), None);
        assert_eq!(class_of(usize::MAX, 8, page), None);
        assert_eq!(class_count(page), 15);
        assert_eq!(class_count(4096), 6);
    }

    #[test]
    fn geometry_fits_the_page() {
        for page in [4096u64, 2 << 20] {
            for class in 0..class_count(page) as u8 {
                let g = Geometry::new(class, page);
                assert!(g.first_block >= MAPS_AT + 2 * g.bitmap_words * 8);
                assert_eq!(g.first_block % g.block, 0);
                assert!(g.first_block + g.capacity * g.block <= page);
                assert!(g.capacity >= 4, "class {class} page {page}: {g:?}");
                assert!(g.bitmap_words * 64 >= g.capacity);
            }
        }
    }

    #[test]
    fn block_index_rejects_interior_pointers() {
        let g = Geometry::new(2, 4096);
        assert_eq!(g.block_index(g.first_block).unwrap(), 0);
        assert_eq!(g.block_index(g.first_block + 64).unwrap(), 1);
        assert!(g.block_index(g.first_block + 8).unwrap_err().contains("8 bytes into a 64-byte block"));
        assert!(g.block_index(0).is_err());
        assert!(g.block_index(4096).is_err());
    }

    #[test]
    fn owner_tokens_differ_between_threads() {
        let here = owner_token();
        assert_eq!(here, owner_token());
        assert_ne!(here & 0xffff_ffff, 0);
        let there = std::thread::spawn(owner_token).join().unwrap();
        assert_ne!(here, there);
    }
}
