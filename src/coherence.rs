//! Coherence hints: advice attached to page ranges, modelled on
//! `cudaMemAdvise`.
//!
//! Advice lives in the page table beside each entry: flag bits in the
//! [`Pte`] word (read-mostly, preferred location, accessed-by, streaming),
//! the preferred node in the entry's third word and the accessed-by nodes as
//! a bit mask in its fourth. It applies to whole pages, so only page-granular
//! (large) allocations take advice; a range must lie inside one allocation.
//! Setting or unsetting checks every page first and changes nothing on
//! error.
//!
//! Setting a preferred location migrates the pages there, and a migration
//! never moves a page away from its preferred location.
//!
//! NOTE: read-mostly pages are not replicated yet: every read goes to the
//! home, which is correct, only slower. `AccessedBy` and `Streaming` are
//! recorded and reported only.

use crate::alloc::{Advice, Heap};
use crate::error::{Error, Result};
use crate::space::{Aux, Pte};
use crate::topology::NodeId;

/// The advice bits kept in a [`Pte`].
pub(crate) mod bits {
    pub const READ_MOSTLY: u8 = 1;
    pub const PREFERRED: u8 = 2;
    pub const ACCESSED_BY: u8 = 4;
    pub const STREAMING: u8 = 8;
}

/// Bit 63 of the preferred-location word marks it as set.
const PREFERRED_SET: u64 = 1 << 63;

/// Nodes an accessed-by mask can name: one bit each in a 64-bit word.
pub const MAX_ACCESSED_BY_NODE: u16 = 63;

/// The advice in force on a page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdviceSet {
    pub read_mostly: bool,
    pub preferred_location: Option<NodeId>,
    /// Nodes that keep their mapping of the page, in id order.
    pub accessed_by: Vec<NodeId>,
    pub streaming: bool,
}

impl AdviceSet {
    /// Returns whether no advice is set.
    pub fn is_empty(&self) -> bool {
        *self == AdviceSet::default()
    }
}

/// Whether advice is set or unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Set,
    Unset,
}

/// Returns the first page and page count of `len` bytes at `addr`, which
/// must lie inside one large allocation.
pub(crate) fn pages_of(heap: &Heap, addr: u64, len: u64) -> Result<(u64, u64)> {
    let invalid = |reason: String| Error::InvalidAddress { addr, end: addr.saturating_add(len), reason };
    if len == 0 {
        return Err(invalid("the range is empty; advice needs at least one byte".into()));
    }
    let page_size = heap.layout.page_size;
    let page = (addr - heap.window_base) / page_size;
    let (_, aux) = heap.table.load(page)?;
    let head = match aux {
        Aux::Head { .. } => page,
        Aux::Tail { index } => page - index as u64,
        Aux::Slab { .. } => {
            return Err(invalid(format!(
                "it is a small block inside a shared page; advice applies to whole pages, so allocate more than {} bytes",
                page_size / 8
            )))
        }
        Aux::Free | Aux::FreedHead => return Err(invalid("it is not allocated".into())),
    };
    let pages = match heap.table.load(head)?.1 {
        Aux::Head { pages } => pages as u64,
        _ => return Err(invalid("its allocation record is inconsistent".into())),
    };
    let start = heap.window_base + head * page_size;
    let end = start + pages * page_size;
    if addr.checked_add(len).is_none_or(|e| e > end) {
        return Err(invalid(format!("the range crosses the end of the allocation {start:#x}..{end:#x}")));
    }
    let last = (addr + len - 1 - heap.window_base) / page_size;
    Ok((page, last - page + 1))
}

/// Sets or unsets `advice` on every page of `len` bytes at `addr`.
pub(crate) fn change(heap: &Heap, addr: u64, len: u64, advice: Advice, change: Change) -> Result<()> {
    if advice == Advice::None {
        return Err(Error::InvalidConfig {
            name: "advice",
            value: "None".into(),
            reason: "name the advice to set or unset".into(),
        });
    }
    advice.validate(&heap.mesh)?;
    if let Advice::AccessedBy(node) = advice {
        if node.0 > MAX_ACCESSED_BY_NODE {
            return Err(Error::InvalidConfig {
                name: "advice",
                value: format!("{advice:?}"),
                reason: format!("accessed-by advice can name nodes 0 to {MAX_ACCESSED_BY_NODE}"),
            });
        }
    }
    let (first, pages) = pages_of(heap, addr, len)?;

    // Check every page before changing any.
    let mut updates = Vec::with_capacity(pages as usize);
    for page in first..first + pages {
        let pte = heap.table.load_pte(page)?;
        let (preferred, accessed_by) = heap.table.load_advice(page)?;
        let current = pte.advice();
        let page_addr = heap.window_base + page * heap.layout.page_size;
        let conflict = |what: &str| Error::InvalidAddress {
            addr,
            end: addr + len,
            reason: format!("the page at {page_addr:#x} {what}"),
        };
        let (flags, preferred, accessed_by) = match (advice, change) {
            (Advice::ReadMostly, Change::Set) if current & bits::STREAMING != 0 => {
                return Err(conflict("is advised Streaming, which excludes ReadMostly; unset Streaming first"))
            }
            (Advice::Streaming, Change::Set) if current & bits::READ_MOSTLY != 0 => {
                return Err(conflict("is advised ReadMostly, which excludes Streaming; unset ReadMostly first"))
            }
            (Advice::ReadMostly, Change::Set) => (current | bits::READ_MOSTLY, preferred, accessed_by),
            (Advice::Streaming, Change::Set) => (current | bits::STREAMING, preferred, accessed_by),
            (Advice::PreferredLocation(node), Change::Set) => {
                (current | bits::PREFERRED, PREFERRED_SET | node.0 as u64, accessed_by)
            }
            (Advice::AccessedBy(node), Change::Set) => {
                let mask = accessed_by | 1 << node.0;
                (current | bits::ACCESSED_BY, preferred, mask)
            }
            (Advice::ReadMostly, Change::Unset) if current & bits::READ_MOSTLY != 0 => {
                (current & !bits::READ_MOSTLY, preferred, accessed_by)
            }
            (Advice::Streaming, Change::Unset) if current & bits::STREAMING != 0 => {
                (current & !bits::STREAMING, preferred, accessed_by)
            }
            (Advice::PreferredLocation(node), Change::Unset) if preferred == PREFERRED_SET | node.0 as u64 => {
                (current & !bits::PREFERRED, 0, accessed_by)
            }
            (Advice::AccessedBy(node), Change::Unset) if accessed_by & 1 << node.0 != 0 => {
                let mask = accessed_by & !(1 << node.0);
                let flags = if mask == 0 { current & !bits::ACCESSED_BY } else { current };
                (flags, preferred, mask)
            }
            (_, Change::Unset) => {
                return Err(conflict(&format!("does not have {advice:?} set; nothing to unset")));
            }
            (Advice::None, _) => unreachable!("rejected above"),
        };
        updates.push((page, pte.with_advice(flags), preferred, accessed_by));
    }

    for (page, pte, preferred, accessed_by) in updates {
        heap.table.store_advice(page, pte, preferred, accessed_by)?;
    }
    Ok(())
}

/// Returns the advice in force on the page that contains `addr`.
pub(crate) fn query(heap: &Heap, addr: u64) -> Result<AdviceSet> {
    let (page, _) = pages_of(heap, addr, 1)?;
    query_page(heap, page)
}

/// Returns the advice in force on global page `page`.
pub(crate) fn query_page(heap: &Heap, page: u64) -> Result<AdviceSet> {
    let pte: Pte = heap.table.load_pte(page)?;
    let (preferred, accessed_by) = heap.table.load_advice(page)?;
    let flags = pte.advice();
    Ok(AdviceSet {
        read_mostly: flags & bits::READ_MOSTLY != 0,
        preferred_location: (preferred & PREFERRED_SET != 0).then(|| NodeId(preferred as u16)),
        accessed_by: (0..64u16).filter(|n| accessed_by & 1 << n != 0).map(NodeId).collect(),
        streaming: flags & bits::STREAMING != 0,
    })
}
