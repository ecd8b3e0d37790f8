//! The opt-in fault handler: maps a valid page of the window when a plain
//! load or store touches it, so that pointers stored in pool memory by one
//! node can be dereferenced by another without an API call first.
//!
//! `Pool::install_fault_handler` registers the pool's window in a fixed
//! table and installs a `SIGSEGV` handler once per process. On a fault the
//! handler looks the address up in the table; inside a window it reads the
//! page-table entry (an atomic load on the home's segment, mapped in this
//! process) and, for a valid page, maps the home's frame onto the page with
//! `mmap` and returns, so the faulting instruction runs again. Everything
//! it calls is async-signal-safe: atomic loads and stores and the `mmap`
//! system call. Any other fault goes to the handler installed before this
//! one, or to the default action (a core dump), as if no handler were here.
//!
//! NOTE: the handler maps pages that are not mapped at all. A page this
//! process mapped before it was freed and handed out again by another node
//! stays mapped to its old frame until an API call on that range (which
//! checks the entry) maps it again; raw pointers into memory that other
//! nodes free and reuse need such a call, or a barrier and `local_ptr`.

use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};
use crate::space::Pte;

/// Windows the handler serves at once, in one process.
const SLOTS: usize = 16;

/// One pool's window and page table, as plain values and raw pointers that
/// the handler can use without locks.
pub(crate) struct FaultTarget {
    pub base: u64,
    pub len: u64,
    pub page_shift: u32,
    pub arena_shift: u32,
    /// Per node: the first page-table entry of its arena in this process;
    /// null for a node on another host, whose arena the handler leaves alone.
    pub leaves: Vec<*const AtomicU64>,
    /// Per node: the descriptor of its segment; -1 for a node on another
    /// host, whose pages are never mapped here.
    pub fds: Vec<RawFd>,
    pub frames_offset: u64,
    /// Per page of the window: the mapping key this process mapped.
    pub mapped: *const AtomicU64,
}

struct Slot {
    target: AtomicPtr<FaultTarget>,
    /// Handlers running on this slot; unregistering waits for zero.
    active: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { target: AtomicPtr::new(ptr::null_mut()), active: AtomicUsize::new(0) };
static SLOTS_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

static INSTALL: Once = Once::new();
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registration; unregisters on drop.
pub(crate) struct Registration {
    slot: usize,
    target: *mut FaultTarget,
}

// SAFETY: the registration owns its boxed target and knows its slot index;
// `Drop` may run on any thread.
unsafe impl Send for Registration {}
// SAFETY: `&Registration` gives no access to anything.
unsafe impl Sync for Registration {}

/// Registers `target` and installs the handler if this process has none.
pub(crate) fn register(target: FaultTarget) -> Result<Registration> {
    install()?;
    let boxed = Box::into_raw(Box::new(target));
    for (index, slot) in SLOTS_TABLE.iter().enumerate() {
        if slot.target.compare_exchange(ptr::null_mut(), boxed, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return Ok(Registration { slot: index, target: boxed });
        }
    }
    // SAFETY: `boxed` came from Box::into_raw above and was never shared.
    drop(unsafe { Box::from_raw(boxed) });
    Err(Error::InvalidConfig {
        name: "fault handler",
        value: format!("{SLOTS} pools"),
        reason: "every slot of the fault handler is in use; leave a pool first".into(),
    })
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &SLOTS_TABLE[self.slot];
        slot.target.store(ptr::null_mut(), Ordering::SeqCst);
        // A handler that loaded the pointer before the store above has
        // raised `active` first; wait until it is done with the target.
        while slot.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // SAFETY: the target came from Box::into_raw in `register`, is no
        // longer reachable from the table, and no handler is using it.
        drop(unsafe { Box::from_raw(self.target) });
    }
}

fn install() -> Result<()> {
    let mut failure = None;
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // is an `extern "C"` function with the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handle as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGSEGV, &action, &mut previous) != 0 {
                failure = Some(std::io::Error::last_os_error());
                return;
            }
            // Written once, before any fault can reach `handle` through
            // this installation.
            PREVIOUS = Some(previous);
        }
    });
    match failure {
        Some(e) => Err(Error::os("installing the SIGSEGV handler", e)),
        None => Ok(()),
    }
}

/// Maps the page at `addr` if it belongs to a registered window and is
/// valid. Returns whether it did.
fn resolve(addr: u64) -> bool {
    for slot in &SLOTS_TABLE {
        slot.active.fetch_add(1, Ordering::SeqCst);
        let target = slot.target.load(Ordering::SeqCst);
        // SAFETY: a non-null target stays alive while `active` is raised.
        let handled = !target.is_null() && unsafe { map_page(&*target, addr) };
        slot.active.fetch_sub(1, Ordering::SeqCst);
        if handled {
            return true;
        }
    }
    false
}

/// # Safety
///
/// The target's pointers must be live, which registration guarantees.
unsafe fn map_page(target: &FaultTarget, addr: u64) -> bool {
    if addr < target.base || addr >= target.base + target.len {
        return false;
    }
    let page = (addr - target.base) >> target.page_shift;
    let node = (page >> target.arena_shift) as usize;
    let Some(&leaves) = target.leaves.get(node).filter(|l| !l.is_null()) else { return false };
    let index = page & ((1u64 << target.arena_shift) - 1);
    // SAFETY: entries of the arena lie in the node's mapped segment, each
    // ENTRY_BYTES long with the entry word first.
    let words_per_entry = (crate::layout::ENTRY_BYTES / 8) as usize;
    let entry = unsafe { &*leaves.add(index as usize * words_per_entry) };
    // SAFETY: `page` is a page of the window, inside the mapped-key array.
    let slot = unsafe { &*target.mapped.add(page as usize) };

    // Take the page's slot with an entry that is not migrating. A store to a
    // page that is migrating waits for the switch, then maps the new frame;
    // the wait happens outside the slot lock, which the migration's
    // mapping requests need. sched_yield is async-signal-safe.
    let (pte, mapped) = loop {
        let pte = Pte(entry.load(Ordering::SeqCst));
        if pte.is_valid() && pte.is_migrating() {
            // SAFETY: a system call without arguments.
            unsafe { libc::sched_yield() };
            continue;
        }
        let mapped = crate::space::lock_slot(slot);
        if Pte(entry.load(Ordering::SeqCst)) == pte {
            break (pte, mapped);
        }
        slot.store(mapped, Ordering::SeqCst);
    };
    if !pte.is_valid() {
        slot.store(mapped, Ordering::SeqCst);
        return false;
    }
    let Some(&fd) = target.fds.get(pte.home().index()).filter(|&&fd| fd >= 0) else {
        slot.store(mapped, Ordering::SeqCst);
        return false;
    };
    if mapped == pte.mapping_key() {
        // The current frame is mapped already: a real access violation, such
        // as a store to a read-only mapping.
        slot.store(mapped, Ordering::SeqCst);
        return false;
    }
    let page_addr = target.base + (page << target.page_shift);
    let offset = target.frames_offset + ((pte.frame() as u64) << target.page_shift);
    // SAFETY: the page lies in the window this pool reserved; mapping the
    // home's frame over it is what the window exists for.
    let got = unsafe {
        libc::mmap(
            page_addr as *mut _,
            1usize << target.page_shift,
            if pte.advice() & crate::coherence::bits::READ_MOSTLY != 0 {
                // Read-mostly pages are read-only in every process.
                libc::PROT_READ
            } else {
                libc::PROT_READ | libc::PROT_WRITE
            },
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd,
            offset as libc::off_t,
        )
    };
    if got == libc::MAP_FAILED {
        slot.store(mapped, Ordering::SeqCst);
        return false;
    }
    // SeqCst, with the lock taken above: either a migrator that marks the
    // page after the lock sees this mapping (its service waits for the lock)
    // and write-protects it, or this load sees the mark and protects it here.
    if Pte(entry.load(Ordering::SeqCst)).is_migrating() {
        // SAFETY: narrowing the access of the mapping made just above.
        unsafe { libc::mprotect(page_addr as *mut _, 1usize << target.page_shift, libc::PROT_READ) };
    }
    slot.store(pte.mapping_key(), Ordering::SeqCst);
    true
}

extern "C" fn handle(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as u64;
    if resolve(addr) {
        return;
    }
    // Not ours: behave as the handler before us would have.
    // SAFETY: PREVIOUS was written before this handler was installed and
    // never changes afterwards.
    let previous = unsafe { ptr::addr_of!(PREVIOUS).read() };
    match previous {
        Some(previous) if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN => {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so it has this signature.
                let chained: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                chained(signal, info, context);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let chained: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous.sa_sigaction) };
                chained(signal);
            }
        }
        _ => {
            // Restore the default action; returning re-runs the faulting
            // instruction, which now terminates the process as usual.
            // SAFETY: resetting a signal to its default is async-signal-safe.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGSEGV, &default, ptr::null_mut());
            }
        }
    }
}
