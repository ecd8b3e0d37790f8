//! Migration: moving the home of pages to another node while every node
//! keeps reading and writing them.
//!
//! Three mechanisms make it safe:
//!
//! - Operation epochs. Every data operation of the API (`read`, `write`,
//!   atomics) counts itself in its own node's header, in the counter of the
//!   node's current epoch, before it translates an address, and uncounts
//!   itself when done. A migrator first marks the pages migrating, then
//!   advances every node's epoch and waits until the previous epoch's
//!   counter drains: an operation that could have translated an address to
//!   the old frame has finished, and every later one loads the mark and
//!   waits for the migration.
//! - The service thread. Each node process runs one thread that sleeps on a
//!   futex in its header and carries out mapping requests from a migrator:
//!   write-protect the pages it maps, or drop them so that the next access
//!   maps the new frame. It acknowledges each request in the header.
//! - One migration at a time in the group, under a lock word in node 0's
//!   header.
//!
//! NOTE: with the fault handler installed, a plain store to a page being
//! migrated waits for the migration and then lands on the new frame.
//! Without it, such a store kills the process with `SIGSEGV` (the page is
//! write-protected), so callers keep raw-pointer writers off a range while
//! it migrates.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Pool;
use crate::alloc::Advice;
use crate::error::{Error, Result};
use crate::layout::{hdr, Words};
use crate::space::{Pte, Window};
use crate::topology::NodeId;

/// How long a migrator waits for a node to acknowledge a request or to
/// finish its operations before it gives up and rolls back.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// Mapping requests to a service thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Request {
    /// Make mapped pages read-only.
    Protect = 1,
    /// Drop mapped pages, so the next access maps the current frame.
    Refresh = 2,
}

/// Waits while the low 32 bits of `word` equal those of `expected`, for
/// `timeout` at most. The word may live in memory shared between processes.
fn futex_wait(word: &AtomicU64, expected: u64, timeout: Duration) {
    let spec = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: FUTEX_WAIT reads the aligned 32-bit word at the address, the
    // low half of `word` on little-endian targets; a spurious or early
    // return is handled by the callers, which re-check the word.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr() as *const u32, libc::FUTEX_WAIT, expected as u32, &spec as *const _);
    }
}

/// Wakes every waiter on `word`.
fn futex_wake(word: &AtomicU64) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr() as *const u32, libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the futex words assume a little-endian target");

/// A counted operation; uncounts itself when dropped.
pub(crate) struct OpGuard<'a> {
    counter: Option<&'a AtomicU64>,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        if let Some(counter) = self.counter {
            // Release: the operation's accesses happen before a migrator
            // that sees the counter drop copies the page.
            counter.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Counts an operation of `me`'s process in its current epoch.
pub(crate) fn enter<'a>(words: &'a Words, me: NodeId) -> OpGuard<'a> {
    let Some([epoch, even, odd]) = words.local_words(me, hdr::EPOCH, 3) else {
        return OpGuard { counter: None };
    };
    let counter = if epoch.load(Ordering::SeqCst) % 2 == 0 { even } else { odd };
    // SeqCst: the increment must be ordered before this operation's
    // page-table loads, against the migrator's mark, epoch advance and
    // counter read, which are SeqCst too.
    counter.fetch_add(1, Ordering::SeqCst);
    OpGuard { counter: Some(counter) }
}

/// Spins until the page is no longer migrating.
pub(crate) fn wait_while_migrating(pool: &Pool, page: u64) -> Result<()> {
    let deadline = Instant::now() + NODE_TIMEOUT * 4;
    let mut spins = 0u32;
    while pool.heap.table.load_pte(page)?.is_migrating() {
        if Instant::now() > deadline {
            return Err(Error::InvalidAddress {
                addr: pool.window.page_addr(page),
                end: pool.window.page_addr(page) + pool.layout.page_size,
                reason: "the page has been migrating for too long; the migrating node may have died".into(),
            });
        }
        spins += 1;
        if spins < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    Ok(())
}

/// The service thread of one node process.
pub(crate) struct Service {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    words: Words,
    me: NodeId,
}

impl Service {
    pub fn start(words: Words, me: NodeId, window: Arc<Window>) -> Result<Service> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_words = words.clone();
        let thread_stop = stop.clone();
        words.store(me, hdr::SERVICE_ALIVE, 1)?;
        let handle = std::thread::Builder::new()
            .name(format!("meshmem-service-{me}"))
            .spawn(move || serve(thread_words, me, window, thread_stop))
            .map_err(|e| Error::os("starting the service thread", e))?;
        Ok(Service { stop, handle: Some(handle), words, me })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Migrators skip a node whose service is gone: its process maps
        // nothing any more.
        if let Err(e) = self.words.store(self.me, hdr::SERVICE_ALIVE, 0) {
            tracing::warn!(node = %self.me, "marking the service stopped failed: {e}");
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some([seq]) = self.words.local_words(self.me, hdr::MAILBOX_SEQ, 1) {
            futex_wake(seq);
        }
        if let Some(handle) = self.handle.take() {
            // A panic in the thread has already been reported by the panic
            // hook; nothing more to do with it here.
            let _ = handle.join();
        }
    }
}

fn serve(words: Words, me: NodeId, window: Arc<Window>, stop: Arc<AtomicBool>) {
    let Some([seq, ack, op, first, pages]) = words.local_words(me, hdr::MAILBOX_SEQ, 5) else {
        tracing::error!(node = %me, "the service thread cannot reach its own segment");
        return;
    };
    let mut done = ack.load(Ordering::Acquire);
    while !stop.load(Ordering::SeqCst) {
        let requested = seq.load(Ordering::Acquire);
        if requested == done {
            futex_wait(seq, requested, Duration::from_millis(200));
            continue;
        }
        let (first, pages) = (first.load(Ordering::Acquire), pages.load(Ordering::Acquire));
        match op.load(Ordering::Acquire) {
            x if x == Request::Protect as u64 => window.protect_run(first, pages),
            x if x == Request::Refresh as u64 => window.refresh_run(first, pages),
            other => tracing::error!(node = %me, op = other, "unknown mapping request ignored"),
        }
        done = requested;
        // Release: the mapping change happens before the migrator that sees
        // the acknowledgement goes on.
        ack.store(done, Ordering::Release);
        futex_wake(ack);
    }
}

/// A migration or replication running on a background thread.
pub struct Prefetch {
    handle: Option<JoinHandle<Result<()>>>,
    addr: u64,
}

impl Prefetch {
    /// Waits for the prefetch to finish and returns its outcome. A second
    /// call fails: the outcome was already taken.
    pub fn wait(&mut self) -> Result<()> {
        let handle = self.handle.take().ok_or_else(|| Error::InvalidConfig {
            name: "prefetch",
            value: format!("{:#x}", self.addr),
            reason: "this prefetch was already waited for".into(),
        })?;
        handle.join().unwrap_or_else(|_| {
            Err(Error::InvalidAddress { addr: self.addr, end: self.addr, reason: "the prefetch worker panicked".into() })
        })
    }

    /// Whether the prefetch has finished (or was waited for).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }
}

impl Pool {
    /// Moves the home of every page of `len` bytes at `addr` to `target`.
    ///
    /// After it returns every access from any node reaches the new home, and
    /// no write is lost: an API write concurrent with the migration lands
    /// before the copy or after the switch. The range must lie inside one
    /// page-granular allocation. Fails and changes nothing when `target` is
    /// outside the mesh or lacks free frames (naming the pages requested and
    /// free), or when a page is advised to prefer another node.
    pub fn migrate(&self, addr: crate::GlobalAddr, len: usize, target: NodeId) -> Result<()> {
        self.mesh.check(target)?;
        self.window.check(addr.0, len as u64)?;
        let (first, pages) = crate::coherence::pages_of(&self.heap, addr.0, len as u64)?;
        for page in first..first + pages {
            if let Some(preferred) = crate::coherence::query_page(&self.heap, page)?.preferred_location {
                if preferred != target {
                    return Err(Error::InvalidAddress {
                        addr: addr.0,
                        end: addr.0 + len as u64,
                        reason: format!(
                            "the page at {:#x} is advised PreferredLocation(node {preferred}), so it never migrates away; unset that advice first",
                            self.window.page_addr(page)
                        ),
                    });
                }
            }
        }

        let _lock = self.lock_migrations()?;
        let moving: Vec<(u64, Pte)> = (first..first + pages)
            .map(|page| Ok((page, self.heap.table.load_pte(page)?)))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|(_, pte)| pte.home() != target)
            .collect();
        if moving.is_empty() {
            return Ok(());
        }
        let frames = self.heap.frames.take(target, moving.len() as u64).map_err(|e| match e {
            Error::OutOfMemory { node, free, .. } => Error::OutOfMemory {
                node,
                requested: moving.len() as u64 * self.layout.page_size,
                free,
            },
            other => other,
        })?;
        let outcome = self.move_pages(&moving, target, &frames);
        if outcome.is_err() {
            self.heap.frames.release(target, &frames)?;
        }
        outcome
    }

    /// Phases 1 to 7 of a migration; on failure the pages keep their old
    /// homes and the caller returns the new frames.
    fn move_pages(&self, moving: &[(u64, Pte)], target: NodeId, frames: &[u32]) -> Result<()> {
        let first = moving.iter().map(|(p, _)| *p).min().expect("not empty");
        let last = moving.iter().map(|(p, _)| *p).max().expect("not empty");
        let span = last - first + 1;

        // 1. Mark every page migrating, so that new operations wait.
        for &(page, pte) in moving {
            self.heap.table.compare_exchange(page, pte, pte.with_migrating(true))?.map_err(|now| Error::Corrupt {
                node: pte.home(),
                reason: format!("page {page} changed from {pte:?} to {now:?} while the migration lock was held"),
            })?;
        }

        let rollback = |error: Error| -> Result<()> {
            for &(page, pte) in moving {
                self.heap.table.store_pte(page, pte)?;
            }
            // Drop the read-only mappings, so the next access maps the old
            // frame writable again.
            self.request_all(Request::Refresh, first, span).ok();
            Err(error)
        };

        // 2. Write-protect the pages in every process that maps them.
        if let Err(e) = self.request_all(Request::Protect, first, span) {
            return rollback(e);
        }

        // 3. Wait for operations that started before the mark.
        if let Err(e) = self.drain_operations() {
            return rollback(e);
        }

        // 4. Copy each page to its new frame: one copy between the two
        //    segments where both are mapped here, else through a buffer.
        let page_size = self.layout.page_size as usize;
        let mut buffer = Vec::new();
        for (&(_, pte), &frame) in moving.iter().zip(frames) {
            let from = self.layout.frame_offset(pte.frame());
            let to = self.layout.frame_offset(frame);
            let views = (self.transport.local_view(pte.home()), self.transport.local_view(target));
            let copied = match views {
                (Some(source), Some(destination)) if from + page_size as u64 <= source.len && to + page_size as u64 <= destination.len => {
                    // SAFETY: both ranges are whole frames inside live
                    // mappings of two different frames, so they do not
                    // overlap; no process writes the source (it is
                    // write-protected and drained) or the destination (it is
                    // not yet in the page table).
                    unsafe {
                        std::ptr::copy_nonoverlapping(source.ptr.add(from as usize), destination.ptr.add(to as usize), page_size)
                    };
                    self.transport.count_copy(pte.home(), target, page_size as u64);
                    Ok(())
                }
                _ => {
                    buffer.resize(page_size, 0);
                    self.transport
                        .read(pte.home(), from, &mut buffer)
                        .and_then(|_| self.transport.write(target, to, &buffer))
                }
            };
            if let Err(e) = copied {
                return rollback(e);
            }
        }

        // 5. Switch each entry to the new home, with a new version, which
        //    also clears the mark and releases waiting operations.
        for (&(page, pte), &frame) in moving.iter().zip(frames) {
            let moved = Pte::new(target, frame, pte.version() + 1, pte.advice());
            self.heap.table.store_pte(page, moved)?;
        }

        // 6. Make every process drop its mapping of the old frames.
        if let Err(e) = self.request_all(Request::Refresh, first, span) {
            // The switch is done and correct; a process that did not answer
            // still maps an old frame, so keep those frames out of use.
            tracing::error!(node = %self.me, "a node did not drop its old mappings; {} frames stay reserved: {e}", moving.len());
            return Ok(());
        }

        // 7. No process maps the old frames and no operation uses them.
        for &(_, pte) in moving {
            self.heap.frames.release(pte.home(), &[pte.frame()])?;
        }
        Ok(())
    }

    /// Sends a mapping request to every node's service and carries it out
    /// here, then waits for every acknowledgement.
    fn request_all(&self, request: Request, first: u64, pages: u64) -> Result<()> {
        let words = &self.heap.words;
        let mut pending = Vec::new();
        for node in self.mesh.nodes() {
            if node == self.me {
                continue;
            }
            if words.load(node, hdr::SERVICE_ALIVE)? == 0 {
                continue;
            }
            words.store(node, hdr::MAILBOX_OP, request as u64)?;
            words.store(node, hdr::MAILBOX_FIRST, first)?;
            words.store(node, hdr::MAILBOX_PAGES, pages)?;
            let seq = words.fetch_add(node, hdr::MAILBOX_SEQ, 1)? + 1;
            // NOTE: a node on another host has no local view, so no futex
            // wakes its service thread. The thread finds the request on its
            // next poll, up to 200 ms later (`serve`), so each migration
            // waits up to that long for a node on another host.
            if let Some([word]) = words.local_words(node, hdr::MAILBOX_SEQ, 1) {
                futex_wake(word);
            }
            pending.push((node, seq));
        }
        match request {
            Request::Protect => self.window.protect_run(first, pages),
            Request::Refresh => self.window.refresh_run(first, pages),
        }
        for (node, seq) in pending {
            let deadline = Instant::now() + NODE_TIMEOUT;
            loop {
                let acked = words.load(node, hdr::MAILBOX_ACK)?;
                if acked >= seq || words.load(node, hdr::SERVICE_ALIVE)? == 0 || !self.node_alive(node) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Transport {
                        node,
                        reason: format!("did not acknowledge a mapping request within {NODE_TIMEOUT:?}; it may have died"),
                        source: None,
                    });
                }
                match words.local_words(node, hdr::MAILBOX_ACK, 1) {
                    Some([word]) => futex_wait(word, acked, Duration::from_millis(50)),
                    // Each check of a node on another host is a round trip;
                    // its service polls every 200 ms, so check each ms.
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        Ok(())
    }

    /// Advances every node's epoch and waits until the operations of the
    /// previous one have finished.
    fn drain_operations(&self) -> Result<()> {
        let words = &self.heap.words;
        for node in self.mesh.nodes() {
            let previous = words.fetch_add(node, hdr::EPOCH, 1)?;
            let counter = if previous % 2 == 0 { hdr::ACTIVE_EVEN } else { hdr::ACTIVE_ODD };
            let deadline = Instant::now() + NODE_TIMEOUT;
            // SeqCst, like the epoch advance above and the operation's
            // increment and entry load in `enter` and `for_each_piece`.
            while words.load_seqcst(node, counter)? != 0 && self.node_alive(node) {
                if Instant::now() > deadline {
                    return Err(Error::Transport {
                        node,
                        reason: format!("its operations did not finish within {NODE_TIMEOUT:?}"),
                        source: None,
                    });
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Whether `node`'s process still exists; a dead one maps nothing and
    /// runs no operation, so migrations stop waiting for it.
    fn node_alive(&self, node: NodeId) -> bool {
        match self.pids.get(node.index()) {
            Some(&pid) if pid != 0 => {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                !matches!(nix::sys::signal::kill(pid, None), Err(nix::errno::Errno::ESRCH))
            }
            _ => true,
        }
    }

    fn lock_migrations(&self) -> Result<MigrationLock<'_>> {
        let words = &self.heap.words;
        let holder = self.me.0 as u64 + 1;
        let mut spins = 0u32;
        while words.compare_exchange(NodeId(0), hdr::MIGRATE_LOCK, 0, holder)?.is_err() {
            spins += 1;
            if spins < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        Ok(MigrationLock { words })
    }

    /// Copies the read-mostly pages `first..first + pages` into replicas on
    /// `target`, skipping pages homed there. Stops quietly when `target`
    /// runs out of frames: reads then go to the home.
    fn replicate(&self, first: u64, pages: u64, target: NodeId) -> Result<()> {
        let replicas = crate::replica::ReplicaTable::new(&self.heap.words, &self.layout, target);
        for page in first..first + pages {
            let _guard = enter(&self.heap.words, self.me);
            let pte = self.heap.table.load_pte_seqcst(page)?;
            if pte.home() == target || pte.is_migrating() {
                continue;
            }
            if !replicas.refresh(self.me, &self.heap.table, &self.heap.frames, self.transport.as_ref(), page)? {
                break;
            }
        }
        Ok(())
    }

    /// Starts moving `len` bytes at `addr` to `target` on a background
    /// thread, or, for read-mostly pages, copying them into replicas there,
    /// and returns a handle to wait on.
    pub fn prefetch(self: &Arc<Self>, addr: crate::GlobalAddr, len: usize, target: NodeId) -> Result<Prefetch> {
        self.mesh.check(target)?;
        self.window.check(addr.0, len as u64)?;
        let (first, pages) = crate::coherence::pages_of(&self.heap, addr.0, len as u64)?;
        let read_mostly = crate::coherence::query_page(&self.heap, first)?.read_mostly;
        let pool = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("meshmem-prefetch-{}", self.me))
            .spawn(move || if read_mostly { pool.replicate(first, pages, target) } else { pool.migrate(addr, len, target) })
            .map_err(|e| Error::os("starting a prefetch worker", e))?;
        Ok(Prefetch { handle: Some(handle), addr: addr.0 })
    }

    /// Carries out advice just set: a preferred location moves the pages
    /// there; read-mostly pages become read-only in every process.
    pub(crate) fn apply_advice(&self, addr: crate::GlobalAddr, len: usize, advice: Advice) -> Result<()> {
        match advice {
            Advice::PreferredLocation(node) => self.migrate(addr, len, node),
            Advice::ReadMostly => {
                let (first, pages) = crate::coherence::pages_of(&self.heap, addr.0, len as u64)?;
                let _lock = self.lock_migrations()?;
                self.request_all(Request::Protect, first, pages)
            }
            _ => Ok(()),
        }
    }

    /// Carries out advice just unset: read-mostly pages lose their replicas
    /// (once no read that may use one is in flight) and become writable.
    pub(crate) fn withdraw_advice(&self, addr: crate::GlobalAddr, len: usize, advice: Advice) -> Result<()> {
        if advice != Advice::ReadMostly {
            return Ok(());
        }
        let (first, pages) = crate::coherence::pages_of(&self.heap, addr.0, len as u64)?;
        let _lock = self.lock_migrations()?;
        self.drain_operations()?;
        for page in first..first + pages {
            crate::replica::drop_all(&self.heap.words, &self.layout, &self.heap.table, &self.heap.frames, self.me, self.size(), page)?;
        }
        self.request_all(Request::Refresh, first, pages)
    }
}

/// The held group-wide migration lock.
struct MigrationLock<'a> {
    words: &'a Words,
}

impl Drop for MigrationLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.words.store(NodeId(0), hdr::MIGRATE_LOCK, 0) {
            tracing::error!("releasing the migration lock failed: {e}");
        }
    }
}
