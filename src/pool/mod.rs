//! `Pool`: one node's membership in a group, and the public API.
//!
//! A pool owns, for its process: its own segment and a mapping of every
//! other node's (through the transport), the window reserved at the group's
//! base, the allocator state, and the control connections of the group.
//! Lifecycle: `join` creates and initialises this node's segment, meets the
//! group, maps the window and every segment; `leave` (or drop) unmaps them.
//! A segment's memory lives until the last process that maps it exits, so a
//! node may leave while others still read its pages.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use bytemuck::Pod;

use crate::alloc::{Advice, Freed, GlobalAlloc, Heap, Placement};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout::{hdr, SegmentLayout, Words};
use crate::space::{GlobalAddr, Pte, Window};

mod migrate;
#[cfg(feature = "tcp")]
mod span;
pub use migrate::Prefetch;
use crate::topology::{Coord, Mesh3d, NodeId};
use crate::transport::rendezvous::{self, Group, Hello};
use crate::transport::shm::{Segment, ShmTransport};
use crate::transport::{Transport, TransportKind};

/// A typed range of pool memory: `len` values of `T` at `addr`.
#[derive(Debug)]
pub struct GlobalSlice<T> {
    addr: GlobalAddr,
    len: usize,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for GlobalSlice<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for GlobalSlice<T> {}

impl<T> GlobalSlice<T> {
    /// Views `len` values of `T` at `addr`. Nothing is checked until the
    /// slice is used.
    pub fn from_raw_parts(addr: GlobalAddr, len: usize) -> Self {
        GlobalSlice { addr, len, _type: PhantomData }
    }

    pub fn addr(&self) -> GlobalAddr {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Address of element `index`.
    pub fn at(&self, index: usize) -> GlobalAddr {
        self.addr.add((index * std::mem::size_of::<T>()) as u64)
    }
}

/// One page's part of a range, as `for_each_piece` hands it out.
struct Piece {
    pte: Pte,
    page: u64,
    in_page_offset: u64,
    /// Offset of the piece in the home node's segment.
    offset: u64,
}

impl Piece {
    fn is_read_mostly(&self) -> bool {
        self.pte.advice() & crate::coherence::bits::READ_MOSTLY != 0
    }
}

/// One node's capacity, use and traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStats {
    pub node: NodeId,
    pub coord: Coord,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub frames_total: u64,
    pub frames_used: u64,
    /// Bytes this node moved to or from itself.
    pub bytes_local: u64,
    /// Bytes this node moved to or from other nodes.
    pub bytes_remote: u64,
    /// Bytes this node moved, each weighted by its hop distance.
    pub hop_bytes: u64,
    /// Address space given up because its arena's extent list was full.
    pub leaked_pages: u64,
    /// Bytes of this node's frames that hold replicas of read-mostly pages
    /// homed elsewhere; part of `used_bytes`.
    pub replica_bytes: u64,
}

/// Statistics of the whole group, read from every node's segment header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    pub nodes: Vec<NodeStats>,
    /// `traffic[src][dst]`: bytes node `src` read from or wrote to `dst`.
    pub traffic: Vec<Vec<u64>>,
    /// `operations[src][dst]`: operations node `src` issued to `dst`.
    pub operations: Vec<Vec<u64>>,
    /// Sum of bytes times hop distance over every pair.
    pub hop_bytes: u64,
    /// `transport[src][dst]`: the transport that carries `src`'s operations
    /// on `dst`'s memory.
    pub transport: Vec<Vec<TransportKind>>,
}

impl Stats {
    /// Returns the bytes moved over each transport kind, summed over every
    /// pair: with simulated or real hosts, `Shm` is the traffic inside a
    /// host and `Tcp` or `Rdma` the traffic between hosts.
    pub fn bytes_by_transport(&self) -> Vec<(TransportKind, u64)> {
        let mut totals: Vec<(TransportKind, u64)> = Vec::new();
        for (row, kinds) in self.traffic.iter().zip(&self.transport) {
            for (&bytes, &kind) in row.iter().zip(kinds) {
                match totals.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, total)) => *total += bytes,
                    None => totals.push((kind, bytes)),
                }
            }
        }
        totals
    }
}

/// One node's membership in a group.
pub struct Pool {
    /// Dropped first: the fault handler must stop using the window and the
    /// segments before they are unmapped.
    fault: parking_lot::Mutex<Option<crate::fault::Registration>>,
    me: NodeId,
    mesh: Mesh3d,
    layout: SegmentLayout,
    group: Group,
    transport: Arc<dyn Transport>,
    /// `plan[src][dst]`: the transport kind of each pair.
    plan: Vec<Vec<TransportKind>>,
    heap: Heap,
    /// Stopped before the window goes: it changes this process's mappings.
    _service: migrate::Service,
    /// Serves this node's segment to other hosts; `None` on one host.
    #[cfg(feature = "tcp")]
    _server: Option<crate::transport::tcp::TcpServer>,
    window: Arc<Window>,
    pids: Vec<u32>,
}

/// The state that either join path hands to [`Pool::assemble`].
struct Parts {
    me: NodeId,
    mesh: Mesh3d,
    layout: SegmentLayout,
    group: Group,
    transport: Arc<dyn Transport>,
    plan: Vec<Vec<TransportKind>>,
    #[cfg(feature = "tcp")]
    server: Option<crate::transport::tcp::TcpServer>,
    window: Window,
    pids: Vec<u32>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("node", &self.me)
            .field("mesh", &self.mesh)
            .field("group", &self.group.name())
            .field("window", &format_args!("{:#x}+{:#x}", self.window.base(), self.window.len()))
            .finish()
    }
}

impl Pool {
    /// Joins the group that `config` describes, and returns once every node
    /// has joined. Fails naming the field when nodes disagree on the mesh,
    /// page size, window size or capacity, and naming the base when the
    /// window cannot be reserved at node 0's base.
    pub fn join(config: Config) -> Result<Pool> {
        let resolved = config.resolve()?;
        #[cfg(feature = "tcp")]
        if let Some(hosts) = resolved.hosts.clone() {
            return Pool::assemble(span::join(&resolved, &hosts, None)?);
        }
        let me = NodeId(resolved.rank);
        let nodes = resolved.size as u64;
        let layout = SegmentLayout::new(nodes, resolved.page_size, resolved.frame_count, resolved.arena_pages);

        // Our segment is complete before anyone else can see it.
        let own = Segment::create(me, layout.len)?;
        // SAFETY: the segment was just created with `layout.len` bytes and no
        // other process has its descriptor yet.
        unsafe { layout.initialise(own.as_ptr(), me) };

        let hello = Hello::new(&resolved, layout.len);
        let mut window = None;
        let joined = rendezvous::join(&resolved.group, &hello, own.fd(), resolved.join_timeout, |base| {
            let reserved = Window::reserve(base.or(resolved.window_base), resolved.window_size, resolved.page_size)?;
            let base = reserved.base();
            window = Some(reserved);
            Ok(base)
        })?;
        let window = window.expect("the rendezvous reserves the window before it succeeds");

        let mut own = Some(own);
        let mut segments = Vec::with_capacity(nodes as usize);
        for (rank, fd) in joined.segments.into_iter().enumerate() {
            let segment = match fd {
                Some(fd) => Segment::open(fd)?,
                None => own.take().expect("only our own rank has no descriptor"),
            };
            if segment.len() != layout.len {
                return Err(Error::ConfigMismatch {
                    node: NodeId(rank as u16),
                    field: "segment length",
                    expected: layout.len.to_string(),
                    found: segment.len().to_string(),
                });
            }
            segments.push(segment);
        }
        let transport: Arc<dyn Transport> = Arc::new(ShmTransport::new(me, segments, layout));
        Pool::assemble(Parts {
            me,
            mesh: resolved.mesh,
            layout,
            group: joined.group,
            transport,
            plan: vec![vec![TransportKind::Shm; nodes as usize]; nodes as usize],
            #[cfg(feature = "tcp")]
            server: None,
            window,
            pids: joined.pids,
        })
    }

    /// Joins as [`join`](Self::join) does, except that a group that spans
    /// hosts (`config.hosts` is set) gathers its node descriptors through
    /// `allgather` instead of the rendezvous at `MASTER_ADDR:MASTER_PORT`,
    /// which is then neither started nor needed. `allgather` receives this
    /// node's bytes and returns every node's bytes in rank order, as
    /// `MPI_Allgatherv` or `torch.distributed.all_gather_object` do. It is
    /// called once, and an `Err` fails the join with its message.
    ///
    /// Node 0 still accepts one authenticated TCP connection from every
    /// other node, on an ephemeral port of its `MESHMEM_HOST_ADDR` that its
    /// descriptor names. These connections carry the group's collectives,
    /// as the rendezvous connections do in [`join`](Self::join).
    ///
    /// On one host (`config.hosts` is `None`) `allgather` is not called and
    /// the join is [`join`](Self::join)'s.
    #[cfg(feature = "tcp")]
    pub fn join_with_allgather(
        config: Config,
        mut allgather: impl FnMut(&[u8]) -> std::result::Result<Vec<Vec<u8>>, String>,
    ) -> Result<Pool> {
        let resolved = config.resolve()?;
        match resolved.hosts.clone() {
            Some(hosts) => Pool::assemble(span::join(&resolved, &hosts, Some(&mut allgather))?),
            None => Pool::join(config),
        }
    }

    /// Checks every node's segment and starts this node's services over the
    /// transport a join built.
    fn assemble(parts: Parts) -> Result<Pool> {
        let Parts { me, mesh, layout, group, transport, plan, window, pids, .. } = parts;
        let words = Words::new(transport.clone(), mesh.len());
        for node in mesh.nodes() {
            layout.validate(&words, node)?;
        }
        let window = Arc::new(window);
        let service = migrate::Service::start(words.clone(), me, window.clone())?;
        let heap = Heap::new(me, mesh, layout, words, window.base());
        tracing::info!(
            node = %me,
            group = group.name(),
            mesh = %mesh,
            window = format_args!("{:#x}", window.base()),
            "joined"
        );
        Ok(Pool {
            fault: parking_lot::Mutex::new(None),
            me,
            mesh,
            layout,
            group,
            transport,
            plan,
            heap,
            _service: service,
            #[cfg(feature = "tcp")]
            _server: parts.server,
            window,
            pids,
        })
    }

    /// Joins with the configuration in the environment ([`Config::from_env`]).
    pub fn join_from_env() -> Result<Pool> {
        Pool::join(Config::from_env()?)
    }

    /// Leaves the group: unmaps the window and every segment. On one host,
    /// other nodes keep access to this node's pages until they exit. In a
    /// group that spans hosts, leaving is collective (see `Drop`).
    pub fn leave(self) {
        tracing::info!(node = %self.me, group = self.group.name(), "left");
    }

    #[inline]
    pub fn node(&self) -> NodeId {
        self.me
    }

    #[inline]
    pub fn mesh(&self) -> Mesh3d {
        self.mesh
    }

    /// Number of nodes in the group.
    #[inline]
    pub fn size(&self) -> usize {
        self.mesh.len()
    }

    #[inline]
    pub fn page_size(&self) -> usize {
        self.layout.page_size as usize
    }

    /// This node's coordinate in the mesh.
    pub fn coord(&self) -> Coord {
        self.mesh.coord(self.me).expect("own id is in the mesh")
    }

    /// Base address and length of the window.
    pub fn window(&self) -> (GlobalAddr, u64) {
        (GlobalAddr(self.window.base()), self.window.len())
    }

    /// Process ids of the group's node processes, by node id.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Returns the group id.
    pub fn group(&self) -> &str {
        self.group.name()
    }

    /// Bytes of frames each node contributes.
    pub fn node_capacity(&self) -> u64 {
        self.layout.frame_count * self.layout.page_size
    }

    /// Allocates `layout.size()` bytes aligned to `layout.align()`, with
    /// pages homed on the nodes that `placement` picks.
    #[inline]
    pub fn alloc(&self, layout: Layout, placement: impl Into<Placement>, advice: Advice) -> Result<GlobalAlloc> {
        let addr = self.heap.alloc(layout, &placement.into(), advice)?;
        Ok(GlobalAlloc { addr, size: layout.size() })
    }

    /// Allocates `len` values of `T`.
    pub fn alloc_slice<T: Pod>(&self, len: usize, placement: impl Into<Placement>) -> Result<GlobalSlice<T>> {
        let layout = Layout::array::<T>(len).map_err(|_| Error::InvalidLayout {
            size: usize::MAX,
            align: std::mem::align_of::<T>(),
            reason: format!("{len} values of {} bytes overflow the address space", std::mem::size_of::<T>()),
        })?;
        let alloc = self.alloc(layout, placement, Advice::None)?;
        Ok(GlobalSlice::from_raw_parts(alloc.addr, len))
    }

    /// Frees the allocation that starts at `addr`. Any node may free any
    /// allocation. Freeing twice, freeing an address `alloc` did not return,
    /// or an address of another pool fails and changes nothing.
    #[inline]
    pub fn free(&self, addr: GlobalAddr) -> Result<()> {
        self.window.check(addr.0, 1).map_err(|_| Error::InvalidFree {
            addr: addr.0,
            reason: format!(
                "it is outside this pool's window {:#x}..{:#x}",
                self.window.base(),
                self.window.base() + self.window.len()
            ),
        })?;
        if let Freed::Pages { first_page, pages } = self.heap.free(addr.0)? {
            self.window.unmap_run(first_page, pages);
        }
        Ok(())
    }

    /// Splits `len` bytes at `addr` into per-page pieces and applies `op` to
    /// each with its home, segment offset and position in the range. Each
    /// piece runs as a counted operation; a piece whose page is migrating
    /// waits for the migration outside the count, then translates again.
    #[inline]
    fn for_each_piece(
        &self,
        addr: GlobalAddr,
        len: usize,
        mut op: impl FnMut(Piece, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        self.window.check(addr.0, len as u64)?;
        let page_size = self.layout.page_size;
        let mut done = 0usize;
        while done < len {
            let at = addr.0 + done as u64;
            let in_page = (page_size - at % page_size).min((len - done) as u64) as usize;
            let guard = migrate::enter(&self.heap.words, self.me);
            let page = self.window.page_of(at);
            // SeqCst: pairs with the migrator's mark and epoch advance (see
            // `migrate::enter`).
            let pte = self.heap.table.load_pte_seqcst(page)?;
            if pte.is_migrating() {
                drop(guard);
                migrate::wait_while_migrating(self, page)?;
                continue;
            }
            if !pte.is_valid() {
                return Err(Error::InvalidAddress {
                    addr: addr.0,
                    end: addr.0 + len as u64,
                    reason: format!("at {at:#x}: its page is not allocated"),
                });
            }
            let in_page_offset = at - self.window.page_addr(page);
            let piece = Piece { pte, page, in_page_offset, offset: self.layout.frame_offset(pte.frame()) + in_page_offset };
            op(piece, done..done + in_page)?;
            drop(guard);
            done += in_page;
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes from pool memory at `addr` (a one-sided get).
    /// A read-mostly page is read from this node's replica when it holds a
    /// current one, which the read creates or refreshes when it can.
    pub fn read(&self, addr: GlobalAddr, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        self.for_each_piece(addr, len, |piece, range| {
            if piece.is_read_mostly() && piece.pte.home() != self.me && self.read_replica(&piece, &mut dst[range.clone()])? {
                return Ok(());
            }
            self.transport.read(piece.pte.home(), piece.offset, &mut dst[range])
        })
    }

    /// Copies `src` into pool memory at `addr` (a one-sided put). A write to
    /// a read-mostly page invalidates every replica of it before returning.
    pub fn write(&self, addr: GlobalAddr, src: &[u8]) -> Result<()> {
        self.for_each_piece(addr, src.len(), |piece, range| {
            self.transport.write(piece.pte.home(), piece.offset, &src[range])?;
            if piece.is_read_mostly() {
                self.invalidate_replicas(piece.page)?;
            }
            Ok(())
        })
    }

    /// Serves a read of part of a read-mostly page from this node's replica;
    /// returns false when the caller must read the home instead.
    fn read_replica(&self, piece: &Piece, dst: &mut [u8]) -> Result<bool> {
        let words = &self.heap.words;
        let replicas = crate::replica::ReplicaTable::new(words, &self.layout, self.me);
        let (owner, generation) = self.heap.table.entry_word(piece.page, crate::layout::entry::GENERATION)?;
        for attempt in 0..2 {
            let current = words.load_seqcst(owner, generation)? & 0xffff_ffff;
            match replicas.lookup(piece.page)? {
                Some((frame, recorded)) if recorded == current => {
                    let at = self.layout.frame_offset(frame) + piece.in_page_offset;
                    self.transport.read(self.me, at, dst)?;
                    // The copy counts only if no write and no drop of the
                    // replica happened while it ran.
                    let unchanged = words.load_seqcst(owner, generation)? & 0xffff_ffff == current
                        && replicas.lookup(piece.page)? == Some((frame, recorded));
                    if unchanged {
                        return Ok(true);
                    }
                }
                _ if attempt == 0 => {
                    let frames = &self.heap.frames;
                    if !replicas.refresh(self.me, &self.heap.table, frames, self.transport.as_ref(), piece.page)? {
                        return Ok(false);
                    }
                }
                _ => {}
            }
        }
        Ok(false)
    }

    /// Bumps the data generation of a read-mostly page, which makes every
    /// replica of it stale.
    fn invalidate_replicas(&self, page: u64) -> Result<()> {
        let (owner, generation) = self.heap.table.entry_word(page, crate::layout::entry::GENERATION)?;
        self.heap.words.fetch_add(owner, generation, 1).map(|_| ())
    }

    /// Reads `dst.len()` values of `T` from `addr`.
    pub fn read_slice<T: Pod>(&self, addr: GlobalAddr, dst: &mut [T]) -> Result<()> {
        self.read(addr, bytemuck::cast_slice_mut(dst))
    }

    /// Writes `src` at `addr`.
    pub fn write_slice<T: Pod>(&self, addr: GlobalAddr, src: &[T]) -> Result<()> {
        self.write(addr, bytemuck::cast_slice(src))
    }

    /// Runs a 64-bit atomic at `addr` as a counted operation, waiting out a
    /// migration of its page.
    fn atomic<T>(&self, addr: GlobalAddr, op: impl Fn(NodeId, u64) -> Result<T>) -> Result<T> {
        if addr.0 % 8 != 0 {
            return Err(Error::Unaligned { addr: addr.0 });
        }
        // An aligned word lies in one page, so this is one piece.
        let mut outcome = None;
        self.for_each_piece(addr, 8, |piece, _| {
            outcome = Some(op(piece.pte.home(), piece.offset)?);
            if piece.is_read_mostly() {
                self.invalidate_replicas(piece.page)?;
            }
            Ok(())
        })?;
        outcome.ok_or(Error::InvalidAddress { addr: addr.0, end: addr.0 + 8, reason: "the word spans no page".into() })
    }

    /// Adds `value` to the 64-bit word at `addr` and returns its old value.
    pub fn fetch_add_u64(&self, addr: GlobalAddr, value: u64) -> Result<u64> {
        self.atomic(addr, |home, offset| self.transport.fetch_add_u64(home, offset, value))
    }

    /// Replaces the word at `addr` with `new` if it contains `current`:
    /// `Ok(Ok(previous))` on success, `Ok(Err(actual))` otherwise.
    pub fn compare_exchange_u64(
        &self,
        addr: GlobalAddr,
        current: u64,
        new: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let previous = self.atomic(addr, |home, offset| self.transport.compare_exchange_u64(home, offset, current, new))?;
        Ok(if previous == current { Ok(previous) } else { Err(previous) })
    }

    /// Waits until every operation this node issued is complete and visible
    /// to all nodes.
    pub fn quiet(&self) -> Result<()> {
        self.transport.quiet()
    }

    /// Maps every page of `len` bytes at `addr` into this process, so that
    /// `addr` can be used as a plain pointer, and returns it.
    ///
    /// The pointer stays valid until the allocation is freed by any node.
    /// Other nodes may write the same bytes at any time: synchronise with
    /// atomics placed in pool memory, a barrier, or `quiet` and a flag.
    pub fn local_ptr(&self, addr: GlobalAddr, len: usize) -> Result<NonNull<u8>> {
        self.ensure_mapped(addr, len.max(1))?;
        NonNull::new(addr.as_ptr()).ok_or(Error::InvalidAddress { addr: 0, end: len as u64, reason: "null".into() })
    }

    /// Borrows a slice of pool memory.
    ///
    /// # Safety
    ///
    /// No node may write the range while the slice lives, and the allocation
    /// must not be freed while it lives.
    pub unsafe fn as_slice<T: Pod>(&self, slice: GlobalSlice<T>) -> Result<&[T]> {
        self.check_typed(slice)?;
        let ptr = self.local_ptr(slice.addr, slice.byte_len())?;
        // SAFETY: the pages are mapped, the address is aligned for `T`
        // (checked), `T: Pod` accepts any bytes, and the caller rules out
        // writers and frees for the lifetime of the borrow.
        Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<T>(), slice.len) })
    }

    /// Borrows a slice of pool memory mutably.
    ///
    /// # Safety
    ///
    /// No other reference to the range may exist on any node while the slice
    /// lives, and the allocation must not be freed while it lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice<T: Pod>(&self, slice: GlobalSlice<T>) -> Result<&mut [T]> {
        self.check_typed(slice)?;
        let ptr = self.local_ptr(slice.addr, slice.byte_len())?;
        // SAFETY: as in `as_slice`, with exclusivity guaranteed by the caller.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<T>(), slice.len) })
    }

    fn check_typed<T>(&self, slice: GlobalSlice<T>) -> Result<()> {
        if slice.addr.0 % std::mem::align_of::<T>() as u64 != 0 {
            return Err(Error::InvalidAddress {
                addr: slice.addr.0,
                end: slice.addr.0 + slice.byte_len() as u64,
                reason: format!("it is not aligned to {} bytes", std::mem::align_of::<T>()),
            });
        }
        Ok(())
    }

    /// Maps the pages of a range that this process has not mapped, or that
    /// changed home or frame since it mapped them.
    pub fn ensure_mapped(&self, addr: GlobalAddr, len: usize) -> Result<()> {
        self.window.check(addr.0, len as u64)?;
        let first = self.window.page_of(addr.0);
        let last = self.window.page_of(addr.0 + len as u64 - 1);
        let mut page = first;
        while page <= last {
            let pte = self.heap.table.load_pte(page)?;
            if !pte.is_valid() {
                return Err(Error::InvalidAddress {
                    addr: addr.0,
                    end: addr.0 + len as u64,
                    reason: format!("page at {:#x} is not allocated", self.window.page_addr(page)),
                });
            }
            if pte.is_migrating() {
                migrate::wait_while_migrating(self, page)?;
                continue;
            }
            if self.window.is_mapped(page, pte.mapping_key()) {
                page += 1;
                continue;
            }

            // Gather a run of pages whose frames are consecutive on one home,
            // so that one mmap covers it.
            let mut keys = vec![pte.mapping_key()];
            while page + (keys.len() as u64) <= last {
                let next = self.heap.table.load_pte(page + keys.len() as u64)?;
                let consecutive = next.is_valid()
                    && !next.is_migrating()
                    && next.advice() & crate::coherence::bits::READ_MOSTLY == pte.advice() & crate::coherence::bits::READ_MOSTLY
                    && next.home() == pte.home()
                    && next.frame() as u64 == pte.frame() as u64 + keys.len() as u64;
                if !consecutive || self.window.is_mapped(page + keys.len() as u64, next.mapping_key()) {
                    break;
                }
                keys.push(next.mapping_key());
            }
            let fd = self.transport.mappable_fd(pte.home()).ok_or_else(|| self.unmappable(page, pte.home()))?;
            // Read-mostly pages are mapped read-only, so that a store through
            // a raw pointer faults rather than bypass replica invalidation.
            let writable = pte.advice() & crate::coherence::bits::READ_MOSTLY == 0;
            let table = &self.heap.table;
            let current = |p: u64| table.load_pte_seqcst(p).ok().map(|now| now.mapping_key());
            if !self.window.map_run(page, fd, self.layout.frame_offset(pte.frame()), &keys, writable, current)? {
                continue;
            }
            // Check the entries again. A migration that marked a page after
            // the loads above may have missed this mapping when it
            // write-protected the page, so protect it here (the slot locks
            // in `map_run`, this load and the migrator's mark are SeqCst).
            // An entry that changed meanwhile means this mapping may show an
            // old frame: drop it, and let the loop map the page again.
            let mut stable = true;
            for (i, &key) in keys.iter().enumerate() {
                let p = page + i as u64;
                let now = self.heap.table.load_pte_seqcst(p)?;
                let read_mostly = now.advice() & crate::coherence::bits::READ_MOSTLY != 0;
                if now.is_migrating() || (read_mostly && writable) {
                    self.window.protect_run(p, 1);
                } else if now.mapping_key() != key {
                    self.window.unmap_run(p, 1);
                    stable = false;
                }
            }
            if stable {
                page += keys.len() as u64;
            }
        }
        Ok(())
    }

    /// Builds the error for a page whose home's segment this process cannot
    /// map, because the home is on another host (reached by TCP or RDMA).
    #[cold]
    fn unmappable(&self, page: u64, home: NodeId) -> Error {
        let kind = self.plan.get(self.me.index()).and_then(|row| row.get(home.index())).copied();
        Error::Transport {
            node: home,
            reason: format!(
                "the page at {:#x} is homed on node {home}, which node {} reaches over {}, so it cannot be mapped into this process as a pointer; use Pool::read and Pool::write (or the atomics) on it",
                self.window.page_addr(page),
                self.me,
                kind.map_or_else(|| "no shared memory".to_string(), |k| k.to_string()),
            ),
            source: None,
        }
    }

    /// Sets `advice` on the pages of `len` bytes at `addr`, which must lie
    /// inside one page-granular allocation. `PreferredLocation` also
    /// migrates the pages to that node. Fails naming the range and
    /// changes nothing when the range is not allocated, crosses the end of
    /// its allocation, or the advice names a node outside the mesh.
    pub fn advise(&self, addr: GlobalAddr, len: usize, advice: Advice) -> Result<()> {
        self.window.check(addr.0, len as u64)?;
        crate::coherence::change(&self.heap, addr.0, len as u64, advice, crate::coherence::Change::Set)?;
        self.apply_advice(addr, len, advice)
    }

    /// Returns the nodes that may hold a replica of the page that contains
    /// `addr` (a replica made stale by a write stays listed until it is
    /// refreshed or dropped).
    pub fn replica_nodes(&self, addr: GlobalAddr) -> Result<Vec<NodeId>> {
        self.window.check(addr.0, 1)?;
        let page = self.window.page_of(addr.0);
        let (owner, word) = self.heap.table.entry_word(page, crate::layout::entry::REPLICAS)?;
        let mask = self.heap.words.load(owner, word)?;
        Ok(self.mesh.nodes().filter(|n| n.0 < 64 && mask & (1u64 << n.0) != 0).collect())
    }

    /// Unsets `advice` on the pages of `len` bytes at `addr`; fails and
    /// changes nothing when any of them does not have it set. Unsetting
    /// `ReadMostly` drops every replica of the pages.
    pub fn unadvise(&self, addr: GlobalAddr, len: usize, advice: Advice) -> Result<()> {
        self.window.check(addr.0, len as u64)?;
        crate::coherence::change(&self.heap, addr.0, len as u64, advice, crate::coherence::Change::Unset)?;
        self.withdraw_advice(addr, len, advice)
    }

    /// Returns the advice in force on the page that contains `addr`.
    pub fn advice(&self, addr: GlobalAddr) -> Result<crate::coherence::AdviceSet> {
        self.window.check(addr.0, 1)?;
        crate::coherence::query(&self.heap, addr.0)
    }

    /// Installs the process's `SIGSEGV` handler for this pool's window, so
    /// that a plain load or store to any allocated page maps it on first
    /// touch: pointers that other nodes stored in pool memory work directly.
    /// Faults outside the window go to the handler installed before, or to
    /// the default action. Calling it again does nothing.
    ///
    /// A page this process mapped earlier keeps its old frame when another
    /// node frees it and hands the address out again; an API call on the
    /// range (`local_ptr`, `read`, `write`) maps it afresh.
    pub fn install_fault_handler(&self) -> Result<()> {
        let mut fault = self.fault.lock();
        if fault.is_some() {
            return Ok(());
        }
        let words = &self.heap.words;
        let mut leaves = Vec::with_capacity(self.size());
        let mut fds = Vec::with_capacity(self.size());
        for node in self.mesh.nodes() {
            // A node on another host has no local view: the handler leaves
            // faults on its arena and on pages it homes to the handler
            // installed before, since those pages are never mapped here.
            match (words.local_words(node, self.layout.leaves, 2), self.transport.mappable_fd(node)) {
                (Some(entries), Some(fd)) => {
                    leaves.push(entries.as_ptr());
                    fds.push(fd);
                }
                _ => {
                    leaves.push(std::ptr::null());
                    fds.push(-1);
                }
            }
        }
        *fault = Some(crate::fault::register(crate::fault::FaultTarget {
            base: self.window.base(),
            len: self.window.len(),
            page_shift: self.layout.page_size.trailing_zeros(),
            arena_shift: self.layout.arena_pages.trailing_zeros(),
            leaves,
            fds,
            frames_offset: self.layout.frames,
            mapped: self.window.mapped_keys(),
        })?);
        Ok(())
    }

    /// Returns the home node of the page that contains `addr`.
    /// A page being migrated reports its new home once the move is done.
    pub fn home_of(&self, addr: GlobalAddr) -> Result<NodeId> {
        let mut home = None;
        self.for_each_piece(addr, 1, |piece, _| {
            home = Some(piece.pte.home());
            Ok(())
        })?;
        home.ok_or(Error::InvalidAddress { addr: addr.0, end: addr.0 + 1, reason: "no page contains it".into() })
    }

    /// Waits until every node of the group has called `barrier`.
    pub fn barrier(&self) -> Result<()> {
        self.quiet()?;
        self.group.all_gather("barrier", &[]).map(|_| ())
    }

    /// Returns `root`'s `data` at every node.
    pub fn broadcast(&self, root: NodeId, data: &[u8]) -> Result<Vec<u8>> {
        self.mesh.check(root)?;
        let mine = if self.me == root { data } else { &[] };
        let mut parts = self.group.all_gather("broadcast", mine)?;
        Ok(std::mem::take(&mut parts[root.index()]))
    }

    /// Returns every node's `data`, by node id, at every node.
    pub fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.group.all_gather("all_gather", data)
    }

    /// Reads every node's capacity, use and traffic counters.
    pub fn stats(&self) -> Result<Stats> {
        let words = &self.heap.words;
        let n = self.size();
        let mut traffic = vec![vec![0u64; n]; n];
        let mut operations = vec![vec![0u64; n]; n];
        let mut nodes = Vec::with_capacity(n);
        let mut total_hop_bytes = 0;
        for src in self.mesh.nodes() {
            let mut hop_bytes = 0;
            for dst in self.mesh.nodes() {
                let bytes = words.load(src, self.layout.traffic_bytes(dst))?;
                traffic[src.index()][dst.index()] = bytes;
                operations[src.index()][dst.index()] = words.load(src, self.layout.traffic_ops(dst))?;
                hop_bytes += bytes * self.mesh.hops(src, dst)? as u64;
            }
            total_hop_bytes += hop_bytes;
            let free = words.load(src, hdr::FREE_FRAMES)?;
            let frames_used = self.layout.frame_count - free;
            let row = &traffic[src.index()];
            nodes.push(NodeStats {
                node: src,
                coord: self.mesh.coord(src)?,
                capacity_bytes: self.node_capacity(),
                used_bytes: frames_used * self.layout.page_size,
                frames_total: self.layout.frame_count,
                frames_used,
                bytes_local: row[src.index()],
                bytes_remote: row.iter().sum::<u64>() - row[src.index()],
                hop_bytes,
                leaked_pages: words.load(src, hdr::LEAKED_PAGES)?,
                replica_bytes: words.load(src, hdr::REPLICA_FRAMES)? * self.layout.page_size,
            });
        }
        Ok(Stats { nodes, traffic, operations, hop_bytes: total_hop_bytes, transport: self.plan.clone() })
    }

    /// Checks every node's free map against its counter.
    pub fn validate(&self) -> Result<()> {
        self.mesh.nodes().try_for_each(|node| self.heap.frames.validate(node))
    }

    /// An [`allocator_api2::alloc::Allocator`] that places with `placement`:
    /// `Vec::new_in(pool.on(NodeId(3)))`.
    pub fn on(&self, placement: impl Into<Placement>) -> PoolAllocator<'_> {
        PoolAllocator { pool: self, placement: placement.into() }
    }
}

impl Drop for Pool {
    /// In a group that spans hosts, waits until every node leaves before
    /// this node's TCP server stops, because nodes on other hosts reach this
    /// node's pages only through it. A node that died fails the wait at
    /// once, and the failure is logged.
    // NOTE: a node that never leaves (hung, or still working) keeps the
    // others waiting here, as a barrier would.
    fn drop(&mut self) {
        #[cfg(feature = "tcp")]
        if self._server.is_some() {
            if let Err(e) = self.group.all_gather("leave", &[]) {
                tracing::warn!(node = %self.me, group = self.group.name(), error = %e, "leaving the group did not reach every node");
            }
        }
    }
}

/// Allocates from a pool with a fixed placement, for collections:
/// `allocator_api2::vec::Vec::new_in(pool.on(NodeId(3)))`.
#[derive(Clone, Debug)]
pub struct PoolAllocator<'a> {
    pool: &'a Pool,
    placement: Placement,
}

// SAFETY: blocks come from `Pool::alloc`, stay valid until `deallocate`
// frees them, are mapped into this process before they are returned, and a
// clone of the handle frees through the same pool.
unsafe impl allocator_api2::alloc::Allocator for PoolAllocator<'_> {
    fn allocate(&self, layout: Layout) -> std::result::Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        let layout = if layout.size() == 0 {
            // Collections ask for zero bytes; give them the smallest block.
            Layout::from_size_align(1, layout.align()).map_err(|_| allocator_api2::alloc::AllocError)?
        } else {
            layout
        };
        let alloc = self
            .pool
            .alloc(layout, self.placement.clone(), Advice::None)
            .map_err(|_| allocator_api2::alloc::AllocError)?;
        match self.pool.local_ptr(alloc.addr, layout.size()) {
            Ok(ptr) => Ok(NonNull::slice_from_raw_parts(ptr, layout.size())),
            Err(_) => {
                self.pool.free(alloc.addr).ok();
                Err(allocator_api2::alloc::AllocError)
            }
        }
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, _layout: Layout) {
        if let Err(e) = self.pool.free(GlobalAddr(ptr.as_ptr() as u64)) {
            // `deallocate` cannot fail; a bad pointer here is the caller's
            // bug, reported once in the log rather than by a panic.
            tracing::error!(node = %self.pool.me, "freeing {:p} from a pool allocator failed: {e}", ptr);
        }
    }
}
