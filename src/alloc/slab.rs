//! Small allocations: size-class slabs inside pages homed on the chosen node.
//!
//! A slab is one page of equal blocks of a power-of-two size class, from
//! 16 bytes to an eighth of a page. The page starts with a header and a
//! bitmap, one bit per block, set while the block is in use; blocks follow,
//! aligned to their size. The allocating node claims a block with
//! `fetch_or` on the bitmap; any node frees one with `fetch_and`, which is
//! the remote free: no message to the owner, and a second free of the same
//! block sees the bit already clear and fails without changing anything.
//!
//! ```text
//! 0   magic        8  class       16  capacity   24  used blocks
//! 64  bitmap (one bit per block, padding bits set)
//! first_block  blocks of class_size bytes
//! ```

use crate::error::{Error, Result};
use crate::layout::Words;
use crate::topology::NodeId;

/// `SLAB` followed by its format version.
const SLAB_MAGIC: u64 = u64::from_le_bytes(*b"SLAB\0\0\0\x01");

const MAGIC_AT: u64 = 0;
const CLASS_AT: u64 = 8;
const CAPACITY_AT: u64 = 16;
const USED_AT: u64 = 24;
const BITMAP_AT: u64 = 64;

/// The smallest block: 16 bytes, enough for any scalar and the common
/// `max_align_t`.
pub const MIN_CLASS_SHIFT: u32 = 4;

/// Size class of a request, or `None` when it needs whole pages: blocks go up
/// to an eighth of a page so that a slab holds at least a handful.
pub fn class_of(size: usize, align: usize, page_size: u64) -> Option<u8> {
    let block = size.max(align).max(1 << MIN_CLASS_SHIFT).checked_next_power_of_two()?;
    (block as u64 <= page_size / 8).then(|| (block.trailing_zeros() - MIN_CLASS_SHIFT) as u8)
}

/// Where things sit in a slab of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block: u64,
    pub capacity: u64,
    pub first_block: u64,
    pub bitmap_words: u64,
}

impl Geometry {
    pub fn new(class: u8, page_size: u64) -> Geometry {
        let block = 1u64 << (class as u32 + MIN_CLASS_SHIFT);
        let bitmap_words = (page_size / block).div_ceil(64);
        let first_block = (BITMAP_AT + bitmap_words * 8).div_ceil(block) * block;
        let capacity = (page_size - first_block) / block;
        Geometry { block, capacity, first_block, bitmap_words }
    }

    /// Index of the block at `offset` in the page, or why it is not a block.
    pub fn block_index(&self, offset: u64) -> std::result::Result<u64, String> {
        if offset < self.first_block {
            return Err(format!("it points into the header of a slab of {}-byte blocks", self.block));
        }
        let relative = offset - self.first_block;
        let index = relative / self.block;
        if relative % self.block != 0 {
            return Err(format!(
                "it points {} bytes into a {}-byte block",
                relative % self.block,
                self.block
            ));
        }
        if index >= self.capacity {
            return Err(format!("it points past the last block of a slab of {}-byte blocks", self.block));
        }
        Ok(index)
    }
}

/// One slab as its allocating node sees it.
#[derive(Clone, Copy, Debug)]
pub struct Slab {
    /// Global address of the slab page.
    pub page_addr: u64,
    pub home: NodeId,
    /// Offset of the page in the home node's segment.
    pub offset: u64,
    pub geometry: Geometry,
    /// Bitmap word to start the next search at.
    pub hint: u64,
}

impl Slab {
    /// Writes a fresh header and bitmap into a newly taken page.
    pub fn initialise(words: &Words, home: NodeId, offset: u64, class: u8, geometry: Geometry) -> Result<()> {
        for word in 0..geometry.bitmap_words {
            let first = word * 64;
            let bits = if first >= geometry.capacity {
                u64::MAX
            } else if geometry.capacity - first < 64 {
                !0u64 << (geometry.capacity - first)
            } else {
                0
            };
            words.store(home, offset + BITMAP_AT + word * 8, bits)?;
        }
        words.store(home, offset + CLASS_AT, class as u64)?;
        words.store(home, offset + CAPACITY_AT, geometry.capacity)?;
        words.store(home, offset + USED_AT, 0)?;
        words.store(home, offset + MAGIC_AT, SLAB_MAGIC)
    }

    /// Claims a free block and returns its global address, or `None` when the
    /// slab is full.
    #[inline]
    pub fn claim(&mut self, words: &Words) -> Result<Option<u64>> {
        let words_count = self.geometry.bitmap_words;
        for step in 0..words_count {
            let word = (self.hint + step) % words_count;
            let at = self.offset + BITMAP_AT + word * 8;
            let mut current = words.load(self.home, at)?;
            while current != u64::MAX {
                let bit = (!current).trailing_zeros() as u64;
                let previous = words.fetch_or(self.home, at, 1 << bit)?;
                if previous & (1 << bit) == 0 {
                    words.fetch_add(self.home, self.offset + USED_AT, 1)?;
                    self.hint = word;
                    let index = word * 64 + bit;
                    return Ok(Some(self.page_addr + self.geometry.first_block + index * self.geometry.block));
                }
                current = previous | (1 << bit);
            }
        }
        Ok(None)
    }

    /// Blocks in use, as counted in the slab header.
    pub fn used(&self, words: &Words) -> Result<u64> {
        words.load(self.home, self.offset + USED_AT)
    }
}

/// Frees the block at `offset` of the slab page held at `page_offset` of
/// `home`'s segment. Any node may call this.
pub fn free_block(words: &Words, home: NodeId, page_offset: u64, page_size: u64, addr: u64, offset: u64) -> Result<()> {
    let magic = words.load(home, page_offset + MAGIC_AT)?;
    if magic != SLAB_MAGIC {
        return Err(Error::Corrupt { node: home, reason: format!("slab page at offset {page_offset:#x} has magic {magic:#x}") });
    }
    let class = words.load(home, page_offset + CLASS_AT)? as u8;
    let geometry = Geometry::new(class, page_size);
    let index = geometry.block_index(offset).map_err(|reason| Error::InvalidFree { addr, reason })?;
    let at = page_offset + BITMAP_AT + (index / 64) * 8;
    let bit = 1u64 << (index % 64);
    let previous = words.fetch_and(home, at, !bit)?;
    if previous & bit == 0 {
        return Err(Error::DoubleFree { addr });
    }
    words.fetch_add(home, page_offset + USED_AT, u64::MAX)?;
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
    }

    #[test]
    fn geometry_fits_the_page() {
        for page in [4096u64, 2 << 20] {
            let mut class = 0;
            while let Some(g) = (16u64 << class <= page / 8).then(|| Geometry::new(class, page)) {
                assert!(g.first_block >= BITMAP_AT + g.bitmap_words * 8);
                assert_eq!(g.first_block % g.block, 0);
                assert!(g.first_block + g.capacity * g.block <= page);
                assert!(g.capacity >= 4, "class {class} page {page}: {g:?}");
                assert!(g.bitmap_words * 64 >= g.capacity);
                class += 1;
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
}
