//! The window, the page table and translation.
//!
//! The window is one range of virtual addresses reserved `PROT_NONE` at the
//! same base in every process of a host, so a [`GlobalAddr`] is a real
//! pointer in each of them. It is split into one arena per node: node `n`
//! hands out addresses only from arena `n`, so nodes never contend for
//! address space, while the pages of an allocation may live anywhere.
//!
//! Each page of an arena has a page-table entry in the segment of the node
//! that owns the arena: a [`Pte`] word (valid bit, home node, frame, advice,
//! version) and an [`Aux`] word that records which allocation the page
//! belongs to. Leaves of the table sit at fixed offsets in the segment, so a
//! translation is one atomic load; the segment is sparse, so only leaves
//! that were touched take memory.
//!
//! A process maps a page by mapping the home node's segment at the frame's
//! offset onto the page's address (`MAP_SHARED | MAP_FIXED`); the CPU then
//! translates. Pages are mapped lazily, when an API call first needs them.
//! Each process remembers, per page, the entry it mapped; a page whose entry
//! changed since (freed and reused, or moved) is mapped again.

use std::fmt;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::layout::{SegmentLayout, Words, ENTRY_BYTES, LEAF_PAGES};
use crate::topology::NodeId;

/// A byte address in the global window; a valid pointer in every process of
/// the host once its page is mapped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct GlobalAddr(pub u64);

impl GlobalAddr {
    #[inline]
    pub fn add(self, bytes: u64) -> GlobalAddr {
        GlobalAddr(self.0 + bytes)
    }

    #[inline]
    pub fn as_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }
}

impl fmt::Debug for GlobalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GlobalAddr({:#x})", self.0)
    }
}

impl fmt::Display for GlobalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A page-table entry.
///
/// ```text
/// 63      valid
/// 53..63  version, bumped whenever the page is (re)assigned a frame
/// 52      migrating
/// 48..52  advice bits
/// 32..48  home node
///  0..32  frame index in the home node's segment
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Pte(pub u64);

impl Pte {
    const VALID: u64 = 1 << 63;
    const MIGRATING: u64 = 1 << 52;
    const VERSION_SHIFT: u32 = 53;
    const VERSION_MASK: u64 = 0x3ff;
    const ADVICE_SHIFT: u32 = 48;
    const ADVICE_MASK: u64 = 0xf;

    pub fn new(home: NodeId, frame: u32, version: u64, advice: u8) -> Pte {
        Pte(Self::VALID
            | ((version & Self::VERSION_MASK) << Self::VERSION_SHIFT)
            | ((advice as u64 & Self::ADVICE_MASK) << Self::ADVICE_SHIFT)
            | ((home.0 as u64) << 32)
            | frame as u64)
    }

    #[inline]
    pub fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }

    #[inline]
    pub fn home(self) -> NodeId {
        NodeId((self.0 >> 32) as u16)
    }

    #[inline]
    pub fn frame(self) -> u32 {
        self.0 as u32
    }

    #[inline]
    pub fn version(self) -> u64 {
        (self.0 >> Self::VERSION_SHIFT) & Self::VERSION_MASK
    }

    /// Returns whether a migration is moving the page.
    #[inline]
    pub fn is_migrating(self) -> bool {
        self.0 & Self::MIGRATING != 0
    }

    /// Returns the entry with the migrating bit set or cleared.
    pub fn with_migrating(self, migrating: bool) -> Pte {
        if migrating {
            Pte(self.0 | Self::MIGRATING)
        } else {
            Pte(self.0 & !Self::MIGRATING)
        }
    }

    #[inline]
    pub fn advice(self) -> u8 {
        ((self.0 >> Self::ADVICE_SHIFT) & Self::ADVICE_MASK) as u8
    }

    /// Returns the entry with its advice bits replaced.
    pub fn with_advice(self, advice: u8) -> Pte {
        Pte((self.0 & !(Self::ADVICE_MASK << Self::ADVICE_SHIFT)) | ((advice as u64 & Self::ADVICE_MASK) << Self::ADVICE_SHIFT))
    }

    /// The entry with its valid bit cleared, keeping the version so that the
    /// next assignment gets a new one.
    pub fn invalidated(self) -> Pte {
        Pte(self.0 & !Self::VALID)
    }

    /// Returns the fields a process's mapping depends on: validity, home,
    /// frame and version.
    #[inline]
    pub fn mapping_key(self) -> u64 {
        self.0 & !(Self::ADVICE_MASK << Self::ADVICE_SHIFT) & !Self::MIGRATING
    }
}

impl fmt::Debug for Pte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_valid() {
            write!(f, "Pte(home {}, frame {}, v{})", self.home(), self.frame(), self.version())
        } else {
            write!(f, "Pte(invalid, v{})", self.version())
        }
    }
}

/// The allocation a page belongs to, kept beside its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aux {
    /// Not allocated.
    Free,
    /// First page of a large allocation of `pages` pages.
    Head { pages: u32 },
    /// Page `index` (from 1) of a large allocation.
    Tail { index: u32 },
    /// A slab page of small blocks of size class `class`.
    Slab { class: u8 },
    /// The first page of a large allocation that was freed; kept until the
    /// address space is reused, so that a second free is reported as such.
    FreedHead,
}

impl Aux {
    const KIND_SHIFT: u32 = 62;
    const FREED: u64 = 1 << 61;

    pub fn encode(self) -> u64 {
        match self {
            Aux::Free => 0,
            Aux::FreedHead => Self::FREED,
            Aux::Head { pages } => (1 << Self::KIND_SHIFT) | pages as u64,
            Aux::Tail { index } => (2 << Self::KIND_SHIFT) | index as u64,
            Aux::Slab { class } => (3 << Self::KIND_SHIFT) | class as u64,
        }
    }

    pub fn decode(word: u64) -> Aux {
        let low = word as u32;
        match word >> Self::KIND_SHIFT {
            0 if word & Self::FREED != 0 => Aux::FreedHead,
            0 => Aux::Free,
            1 => Aux::Head { pages: low },
            2 => Aux::Tail { index: low },
            _ => Aux::Slab { class: low as u8 },
        }
    }
}

/// The page table of the whole window, spread over the nodes' segments.
#[derive(Clone)]
pub struct PageTable {
    words: Words,
    layout: SegmentLayout,
    nodes: u64,
    /// log2 of the arena's pages, which `Config` makes a power of two.
    arena_shift: u32,
}

impl PageTable {
    pub fn new(words: Words, layout: SegmentLayout, nodes: u64) -> Self {
        assert!(layout.arena_pages.is_power_of_two(), "arena pages must be a power of two");
        PageTable { words, layout, nodes, arena_shift: layout.arena_pages.trailing_zeros() }
    }

    pub fn words(&self) -> &Words {
        &self.words
    }

    /// Returns the node whose arena contains global page `page`, and the
    /// page's index in that arena.
    #[inline]
    pub fn owner(&self, page: u64) -> Option<(NodeId, u64)> {
        let node = page >> self.arena_shift;
        (node < self.nodes).then(|| (NodeId(node as u16), page & (self.layout.arena_pages - 1)))
    }

    #[inline]
    fn entry_offset(&self, page: u64) -> Result<(NodeId, u64)> {
        let (node, index) = self.owner(page).ok_or_else(|| Error::InvalidAddress {
            addr: page,
            end: page,
            reason: format!("page {page} is beyond the last arena"),
        })?;
        Ok((node, self.layout.leaves + index * ENTRY_BYTES))
    }

    /// Loads the entry and the allocation record of global page `page`.
    #[inline]
    pub fn load(&self, page: u64) -> Result<(Pte, Aux)> {
        let (node, offset) = self.entry_offset(page)?;
        if let Some([pte, aux]) = self.words.local_words(node, offset, 2) {
            // Acquire: pairs with the Release stores in `store`.
            return Ok((Pte(pte.load(Ordering::Acquire)), Aux::decode(aux.load(Ordering::Acquire))));
        }
        let pte = Pte(self.words.load(node, offset)?);
        let aux = Aux::decode(self.words.load(node, offset + 8)?);
        Ok((pte, aux))
    }

    #[inline]
    pub fn load_pte(&self, page: u64) -> Result<Pte> {
        let (node, offset) = self.entry_offset(page)?;
        Ok(Pte(self.words.load(node, offset)?))
    }

    /// Loads the entry with sequentially consistent ordering.
    pub fn load_pte_seqcst(&self, page: u64) -> Result<Pte> {
        let (node, offset) = self.entry_offset(page)?;
        Ok(Pte(self.words.load_seqcst(node, offset)?))
    }

    /// Stores the allocation record, then the entry, and clears the page's
    /// node-valued advice, so that an allocation never inherits the advice
    /// of an earlier one at the same address. Readers that see the new entry
    /// see the record too.
    pub fn store(&self, page: u64, pte: Pte, aux: Aux) -> Result<()> {
        let (node, offset) = self.entry_offset(page)?;
        let index = page & (self.layout.arena_pages - 1);
        let leaf_word = self.layout.directory + (index / LEAF_PAGES) * 8;
        if self.words.load(node, leaf_word)? == 0 {
            self.words.store(node, leaf_word, 1)?;
        }
        self.words.store(node, offset + crate::layout::entry::PREFERRED, 0)?;
        self.words.store(node, offset + crate::layout::entry::ACCESSED_BY, 0)?;
        self.words.store(node, offset + 8, aux.encode())?;
        self.words.store(node, offset, pte.0)
    }

    /// Loads the node-valued advice of `page`: the preferred location word
    /// (bit 63 set when present, the node in the low bits) and the
    /// accessed-by mask (bit `n` for node `n`).
    pub fn load_advice(&self, page: u64) -> Result<(u64, u64)> {
        let (node, offset) = self.entry_offset(page)?;
        Ok((self.words.load(node, offset + crate::layout::entry::PREFERRED)?, self.words.load(node, offset + crate::layout::entry::ACCESSED_BY)?))
    }

    /// Stores the node-valued advice of `page`, then its entry with `pte`'s
    /// advice bits.
    pub fn store_advice(&self, page: u64, pte: Pte, preferred: u64, accessed_by: u64) -> Result<()> {
        let (node, offset) = self.entry_offset(page)?;
        self.words.store(node, offset + crate::layout::entry::PREFERRED, preferred)?;
        self.words.store(node, offset + crate::layout::entry::ACCESSED_BY, accessed_by)?;
        self.words.store(node, offset, pte.0)
    }

    /// Returns the node and segment offset of word `word` of `page`'s entry.
    pub fn entry_word(&self, page: u64, word: u64) -> Result<(NodeId, u64)> {
        let (node, offset) = self.entry_offset(page)?;
        Ok((node, offset + word))
    }

    /// Stores the entry word alone.
    pub fn store_pte(&self, page: u64, pte: Pte) -> Result<()> {
        let (node, offset) = self.entry_offset(page)?;
        self.words.store(node, offset, pte.0)
    }

    /// Replaces the entry if it still is `current`.
    pub fn compare_exchange(&self, page: u64, current: Pte, new: Pte) -> Result<std::result::Result<Pte, Pte>> {
        let (node, offset) = self.entry_offset(page)?;
        Ok(self.words.compare_exchange(node, offset, current.0, new.0)?.map(Pte).map_err(Pte))
    }

    /// Number of page-table leaves in use on `node`.
    pub fn leaves_in_use(&self, node: NodeId) -> Result<u64> {
        let leaves = self.layout.arena_pages.div_ceil(LEAF_PAGES);
        let mut used = 0;
        for leaf in 0..leaves {
            used += (self.words.load(node, self.layout.directory + leaf * 8)? != 0) as u64;
        }
        Ok(used)
    }
}

/// The window reserved in this process, and which pages this process mapped.
pub struct Window {
    base: u64,
    len: u64,
    page_size: u64,
    page_shift: u32,
    /// Per page of the window, the [`Pte::mapping_key`] this process mapped,
    /// or 0. An anonymous `MAP_NORESERVE` array, so untouched parts cost no
    /// memory; atomics, because a fault handler may update it.
    mapped: *mut AtomicU64,
    mapped_len: usize,
}

// SAFETY: the window reservation and the `mapped` array live until `Drop`;
// `mapped` is only touched through atomics.
unsafe impl Send for Window {}
// SAFETY: as above.
unsafe impl Sync for Window {}

impl Window {
    /// Reserves `len` bytes of address space, `PROT_NONE`, aligned to
    /// `page_size`: anywhere when `base` is `None`, else exactly at `base`
    /// with `MAP_FIXED_NOREPLACE` (never over an existing mapping).
    pub fn reserve(base: Option<u64>, len: u64, page_size: u64) -> Result<Window> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let base = match base {
            Some(base) => {
                if base % page_size != 0 {
                    return Err(Error::WindowUnavailable {
                        base,
                        len,
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("the base is not aligned to the page size of {page_size} bytes"),
                        ),
                    });
                }
                // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing
                // mapping; it fails with EEXIST instead.
                let got = unsafe {
                    libc::mmap(base as *mut _, len as usize, libc::PROT_NONE, flags | libc::MAP_FIXED_NOREPLACE, -1, 0)
                };
                if got == libc::MAP_FAILED {
                    return Err(Error::WindowUnavailable { base, len, source: std::io::Error::last_os_error() });
                }
                if got as u64 != base {
                    // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat the
                    // address as a hint.
                    // SAFETY: unmapping the range this call just mapped.
                    unsafe { libc::munmap(got, len as usize) };
                    return Err(Error::WindowUnavailable {
                        base,
                        len,
                        source: std::io::Error::from_raw_os_error(libc::EEXIST),
                    });
                }
                base
            }
            None => {
                // Try fixed candidates first: far below where the kernel puts
                // libraries and mappings, so the peers are likely to have
                // the same range free.
                for candidate in Self::candidates(len) {
                    if let Ok(window) = Self::reserve(Some(candidate), len, page_size) {
                        return Ok(window);
                    }
                }
                let padded = len + page_size;
                // SAFETY: a fresh reservation placed by the kernel.
                let got = unsafe { libc::mmap(ptr::null_mut(), padded as usize, libc::PROT_NONE, flags, -1, 0) };
                if got == libc::MAP_FAILED {
                    return Err(Error::WindowUnavailable { base: 0, len, source: std::io::Error::last_os_error() });
                }
                let start = got as u64;
                let aligned = start.div_ceil(page_size) * page_size;
                // SAFETY: trimming the unaligned head and the tail of the
                // reservation this call just made; both lie inside it.
                unsafe {
                    if aligned > start {
                        libc::munmap(got, (aligned - start) as usize);
                    }
                    let end = start + padded;
                    let tail = end - (aligned + len);
                    if tail > 0 {
                        libc::munmap((aligned + len) as *mut _, tail as usize);
                    }
                }
                aligned
            }
        };

        let pages = (len / page_size) as usize;
        let mapped_len = pages * std::mem::size_of::<AtomicU64>();
        // SAFETY: a fresh private anonymous mapping placed by the kernel.
        let mapped = unsafe {
            libc::mmap(ptr::null_mut(), mapped_len.max(1), libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0)
        };
        if mapped == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            // SAFETY: releasing the reservation made above.
            unsafe { libc::munmap(base as *mut _, len as usize) };
            return Err(Error::os(format!("mmap of the {mapped_len}-byte mapping table"), source));
        }
        Ok(Window {
            base,
            len,
            page_size,
            page_shift: page_size.trailing_zeros(),
            mapped: mapped.cast(),
            mapped_len: mapped_len.max(1),
        })
    }

    /// Bases node 0 tries before it lets the kernel choose: every 1 TiB from
    /// 16 TiB up to 64 TiB. On x86-64 and Arm64 with 47- or 48-bit user
    /// addresses, executables sit near 0x5555_5555_0000 (85 TiB) and the
    /// kernel places mappings top-down from near 128 TiB, so this range is
    /// normally empty in every process.
    fn candidates(len: u64) -> impl Iterator<Item = u64> {
        const TIB: u64 = 1 << 40;
        let step = len.div_ceil(TIB).max(1) * TIB;
        (0..).map(move |i| 16 * TIB + i * step).take_while(move |&base| base + len <= 64 * TIB)
    }

    #[inline]
    pub fn base(&self) -> u64 {
        self.base
    }

    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Global page index of `addr`, which must be inside the window.
    #[inline]
    pub fn page_of(&self, addr: u64) -> u64 {
        (addr - self.base) >> self.page_shift
    }

    #[inline]
    pub fn page_addr(&self, page: u64) -> u64 {
        self.base + (page << self.page_shift)
    }

    /// Checks that `len` bytes at `addr` lie inside the window.
    #[inline]
    pub fn check(&self, addr: u64, len: u64) -> Result<()> {
        let end = addr.checked_add(len);
        match end {
            Some(end) if addr >= self.base && end <= self.base + self.len => Ok(()),
            _ => Err(Error::InvalidAddress {
                addr,
                end: end.unwrap_or(u64::MAX),
                reason: format!(
                    "outside this pool's window {:#x}..{:#x}",
                    self.base,
                    self.base + self.len
                ),
            }),
        }
    }

    #[inline]
    fn mapped_slot(&self, page: u64) -> &AtomicU64 {
        debug_assert!((page as usize) < self.mapped_len / 8);
        // SAFETY: `page` is a page of the window (callers check the address),
        // so the slot lies inside the `mapped` array, which lives as long as
        // `self`.
        unsafe { &*self.mapped.add(page as usize) }
    }

    /// Takes the lock of `page`'s mapping slot and returns the key it held.
    /// Every change to a page's mapping in this process happens under it, so
    /// the slot always names what is mapped. Only `mmap`, `mprotect` and
    /// loads of the page table run under it, never an access to the page, so
    /// a fault cannot wait for a lock its own thread holds.
    #[inline]
    pub(crate) fn lock_slot(&self, page: u64) -> u64 {
        lock_slot(self.mapped_slot(page))
    }

    /// Releases `page`'s slot with `key` as what is mapped.
    #[inline]
    pub(crate) fn unlock_slot(&self, page: u64, key: u64) {
        self.mapped_slot(page).store(key, Ordering::SeqCst);
    }

    /// Maps `pages` consecutive pages starting at `page` onto `fd` at
    /// `offset`, shared, read-write or read-only, and records `keys` as
    /// mapped. `current` returns a page's mapping key as the page table has
    /// it now; when any differs from `keys` once the slots are locked (a
    /// migration or a free moved the page since the caller looked), nothing
    /// is mapped and the result is `false`, so the caller looks again.
    pub fn map_run(
        &self,
        page: u64,
        fd: RawFd,
        offset: u64,
        keys: &[u64],
        writable: bool,
        current: impl Fn(u64) -> Option<u64>,
    ) -> Result<bool> {
        let addr = self.page_addr(page);
        let len = keys.len() as u64 * self.page_size;
        let previous: Vec<u64> = (0..keys.len() as u64).map(|i| self.lock_slot(page + i)).collect();
        // Under the locks, a migration's mapping requests wait for us, and
        // its old frame is not released before they are served. So frames
        // that are still current here stay valid until the slots show them.
        let unchanged = keys.iter().enumerate().all(|(i, &key)| current(page + i as u64) == Some(key));
        if !unchanged {
            for (i, &key) in previous.iter().enumerate() {
                self.unlock_slot(page + i as u64, key);
            }
            return Ok(false);
        }
        // SAFETY: the range is inside our own window reservation (the caller
        // translated it from page-table entries of this window), which no
        // other code maps. Replacing it with MAP_FIXED is what the window is
        // reserved for.
        let got = unsafe {
            libc::mmap(
                addr as *mut _,
                len as usize,
                if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ },
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            let error = std::io::Error::last_os_error();
            for (i, &key) in previous.iter().enumerate() {
                self.unlock_slot(page + i as u64, key);
            }
            return Err(Error::os(format!("mapping {len:#x} bytes at {addr:#x} onto segment offset {offset:#x}"), error));
        }
        for (i, &key) in keys.iter().enumerate() {
            self.unlock_slot(page + i as u64, key);
        }
        Ok(true)
    }

    /// Returns `pages` pages starting at `page` to `PROT_NONE` in this process.
    pub fn unmap_run(&self, page: u64, pages: u64) {
        for p in page..page + pages {
            self.lock_slot(p);
            self.reserve_page(p);
            self.unlock_slot(p, 0);
        }
    }

    /// Replaces one page's mapping with the window's `PROT_NONE` reservation.
    /// The caller has locked the page's slot.
    fn reserve_page(&self, page: u64) {
        let addr = self.page_addr(page);
        // SAFETY: as in `map_run`; the replacement is the same reservation the
        // window started with.
        let got = unsafe {
            libc::mmap(
                addr as *mut _,
                self.page_size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        // NOTE: a failure here (only ENOMEM from the mapping count limit) leaves
        // the old frame mapped in this process. The page table no longer
        // points at it, so the next `ensure_mapped` replaces it.
        if got == libc::MAP_FAILED {
            tracing::warn!(addr = format_args!("{addr:#x}"), "unmapping a page failed: {}", std::io::Error::last_os_error());
        }
    }

    /// Makes the mapped pages of `pages` pages at `page` read-only in this
    /// process, so that a plain store faults while they migrate.
    pub fn protect_run(&self, page: u64, pages: u64) {
        for p in page..page + pages {
            let key = self.lock_slot(p);
            if key != 0 {
                let addr = self.page_addr(p);
                // SAFETY: the page is inside our window and mapped; mprotect
                // only narrows the access of that mapping.
                let failed = unsafe { libc::mprotect(addr as *mut _, self.page_size as usize, libc::PROT_READ) } != 0;
                if failed {
                    tracing::warn!(addr = format_args!("{addr:#x}"), "write-protecting a migrating page failed: {}", std::io::Error::last_os_error());
                }
            }
            self.unlock_slot(p, key);
        }
    }

    /// Drops this process's mapping of every mapped page of `pages` pages at
    /// `page`, so that the next access maps the current frame.
    pub fn refresh_run(&self, page: u64, pages: u64) {
        for p in page..page + pages {
            let key = self.lock_slot(p);
            if key != 0 {
                self.reserve_page(p);
            }
            self.unlock_slot(p, 0);
        }
    }

    /// The per-page array of mapping keys, for the fault handler.
    pub(crate) fn mapped_keys(&self) -> *const AtomicU64 {
        self.mapped
    }

    /// Returns whether this process has `key` mapped at `page`.
    #[inline]
    pub fn is_mapped(&self, page: u64, key: u64) -> bool {
        self.mapped_slot(page).load(Ordering::Acquire) == key
    }
}

/// The slot value of a page whose mapping is being changed. Never a mapping
/// key: keys have the migrating bit clear.
pub(crate) const SLOT_LOCKED: u64 = 1 << 52;

/// Takes a mapping-slot lock; see [`Window::lock_slot`]. Async-signal-safe.
#[inline]
pub(crate) fn lock_slot(slot: &AtomicU64) -> u64 {
    loop {
        let current = slot.load(Ordering::SeqCst);
        if current != SLOT_LOCKED
            && slot.compare_exchange(current, SLOT_LOCKED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        {
            return current;
        }
        // SAFETY: a system call without arguments.
        unsafe { libc::sched_yield() };
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: both ranges are the reservations made in `reserve`. munmap
        // of a range we own fails only on invalid arguments, which these are
        // not; the address space is released at exit either way.
        unsafe {
            libc::munmap(self.base as *mut _, self.len as usize);
            libc::munmap(self.mapped.cast(), self.mapped_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pte_fields_round_trip() {
        let pte = Pte::new(NodeId(513), 0xdead_beef, 1023, 0b1010);
        assert!(pte.is_valid());
        assert_eq!(pte.home(), NodeId(513));
        assert_eq!(pte.frame(), 0xdead_beef);
        assert_eq!(pte.version(), 1023);
        assert_eq!(pte.advice(), 0b1010);
        let gone = pte.invalidated();
        assert!(!gone.is_valid());
        assert_eq!(gone.version(), 1023);
        assert_ne!(gone.mapping_key(), pte.mapping_key());
    }

    #[test]
    fn aux_round_trips() {
        for aux in [Aux::Free, Aux::FreedHead, Aux::Head { pages: 7 }, Aux::Tail { index: 3 }, Aux::Slab { class: 5 }] {
            assert_eq!(Aux::decode(aux.encode()), aux);
        }
    }

    #[test]
    fn window_at_occupied_base_is_rejected() {
        let first = Window::reserve(None, 64 << 20, 2 << 20).unwrap();
        assert_eq!(first.base() % (2 << 20), 0);
        let err = Window::reserve(Some(first.base()), 64 << 20, 2 << 20).err().unwrap();
        assert!(matches!(err, Error::WindowUnavailable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{:#x}", first.base())), "{text}");
        assert!(text.contains(&format!("{:#x}", 64u64 << 20)), "{text}");
    }

    #[test]
    fn window_checks_ranges() {
        let window = Window::reserve(None, 8 << 20, 2 << 20).unwrap();
        assert!(window.check(window.base(), 8 << 20).is_ok());
        assert!(window.check(window.base() + 1, 8 << 20).is_err());
        assert!(window.check(window.base() - 1, 1).is_err());
        assert!(window.check(u64::MAX, 2).is_err());
    }
}

#[cfg(test)]
mod model_tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::transport::shm::{Segment, ShmTransport};

    fn table(arena_pages: u64) -> PageTable {
        assert!(arena_pages.is_power_of_two());
        let layout = SegmentLayout::new(3, 4096, 8, arena_pages);
        let segments: Vec<Segment> = (0..3)
            .map(|n| {
                let segment = Segment::create(NodeId(n), layout.len).unwrap();
                // SAFETY: fresh segment of `layout.len` bytes, private to this test.
                unsafe { layout.initialise(segment.as_ptr(), NodeId(n)) };
                segment
            })
            .collect();
        let words = Words::new(Arc::new(ShmTransport::new(NodeId(1), segments, layout)), 3);
        PageTable::new(words, layout, 3)
    }

    proptest! {
        /// The table returns what was stored last, and nothing else, for
        /// pages spread over every node's arena and several leaves.
        #[test]
        fn page_table_matches_model(
            ops in prop::collection::vec((0u64..3 * 2048, any::<u16>(), any::<u32>(), 0u64..1024, 0u8..4), 1..200)
        ) {
            let table = table(2048);
            let mut model: HashMap<u64, (Pte, Aux)> = HashMap::new();
            for (page, home, frame, version, kind) in ops {
                let pte = Pte::new(NodeId(home), frame, version, kind);
                let aux = match kind {
                    0 => Aux::Head { pages: frame },
                    1 => Aux::Tail { index: frame },
                    2 => Aux::Slab { class: frame as u8 },
                    _ => Aux::FreedHead,
                };
                table.store(page, pte, aux).unwrap();
                model.insert(page, (pte, aux));
            }
            for page in 0..3 * 2048 {
                let expected = model.get(&page).copied().unwrap_or((Pte(0), Aux::Free));
                prop_assert_eq!(table.load(page).unwrap(), expected, "page {}", page);
            }
            prop_assert!(table.load(3 * 2048).is_err());
            let leaves: u64 = (0..3).map(|n| table.leaves_in_use(NodeId(n)).unwrap()).sum();
            let touched: std::collections::HashSet<(u64, u64)> =
                model.keys().map(|p| (p / 2048, (p % 2048) / LEAF_PAGES)).collect();
            prop_assert_eq!(leaves, touched.len() as u64);
        }
    }
}
