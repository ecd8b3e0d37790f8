//! Loom models of the migration, replication and reclamation protocols.
//!
//! Each model is a small copy of the real code's steps on loom's atomics
//! and threads, with the real code's memory orderings; its doc comment names
//! the functions it follows. Page contents, which the real code moves with
//! `memcpy` through shared memory, are `loom::cell::UnsafeCell`s where the
//! protocol claims exclusive access (so loom also reports a data race), and
//! relaxed atomics where readers and writers overlap on purpose (the
//! replica check works like a sequence lock).
//!
//! Loom treats `SeqCst` loads, stores and read-modify-writes as `AcqRel`,
//! but models `SeqCst` fences fully. So every access that the real code
//! makes `SeqCst` goes through one of the `sc_*` helpers, which put a
//! `SeqCst` fence right before it: two such accesses in one thread then have
//! a fence between them, which is what gives `SeqCst` accesses their total
//! order, while an `Acquire` load after a `SeqCst` write gets no fence,
//! exactly as in the real code.
//!
//! A mapping of a page in a process is a `Mutex<Mapping>`: an access through
//! the mapping holds it for the access, and `mmap`, `mprotect` and `munmap`
//! hold it for the change, which is how the kernel's page-table lock and TLB
//! shootdown order them.
//!
//! Run with `scripts/loom.sh`; the models are compiled only under
//! `--cfg loom`. Loom runs every model to completion unless a preemption
//! bound is given (`Builder::preemption_bound`); the models that need one to
//! finish in time say so.

#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU64, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// The migrating bit of a page-table entry (`Pte::MIGRATING`).
const MIGRATING: u64 = 1 << 52;
/// The old and the new frame of the migrating page.
const A: u64 = 0;
const B: u64 = 1;
/// The value a reused frame contains once its new owner writes it.
const POISON: u64 = 0xdead;
/// The slot value while a mapping slot is locked (`space::SLOT_LOCKED`).
const SLOT_LOCKED: u64 = 1 << 52;
/// Mailbox requests (`migrate::Request`).
const PROTECT: u64 = 1;
const REFRESH: u64 = 2;

fn sc_load(word: &AtomicU64) -> u64 {
    fence(Ordering::SeqCst);
    word.load(Ordering::SeqCst)
}

fn sc_store(word: &AtomicU64, value: u64) {
    fence(Ordering::SeqCst);
    word.store(value, Ordering::SeqCst);
}

fn sc_fetch_add(word: &AtomicU64, value: u64) -> u64 {
    fence(Ordering::SeqCst);
    word.fetch_add(value, Ordering::SeqCst)
}

fn sc_compare_exchange(word: &AtomicU64, current: u64, new: u64) -> Result<u64, u64> {
    fence(Ordering::SeqCst);
    word.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
}

/// A page's mapping slot in one process (`Window::mapped_slot`): the key
/// of what is mapped, or `SLOT_LOCKED`.
struct Slot {
    word: AtomicU64,
    /// Signalled after each unlock, for waiting lockers.
    unlocked: Event,
}

impl Slot {
    /// `space::lock_slot`: takes the slot and returns the key it held.
    fn lock(&self) -> u64 {
        loop {
            let seen = self.unlocked.now();
            let mut current = sc_load(&self.word);
            while current != SLOT_LOCKED {
                match sc_compare_exchange(&self.word, current, SLOT_LOCKED) {
                    Ok(_) => return current,
                    Err(actual) => current = actual,
                }
            }
            self.unlocked.wait_past(seen);
        }
    }

    /// `Window::unlock_slot`.
    fn unlock(&self, key: u64) {
        sc_store(&self.word, key);
        self.unlocked.signal();
    }
}

/// Returns the mapping key of frame `frame`, never 0 (which means unmapped).
fn key(frame: u64) -> u64 {
    frame + 1
}

/// Returns the frame an entry names.
fn frame_of(pte: u64) -> usize {
    (pte & !MIGRATING) as usize
}

/// A count that threads wait on to change. It stands for a wait that the
/// real code does by polling a word: loom would explore every poll that
/// reads a stale value, without end, so the models poll once and then
/// sleep until the polled word may have changed. The first poll is the
/// real load, so a stale first read is still explored.
struct Event {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Event {
    fn new() -> Self {
        Event { count: Mutex::new(0), changed: Condvar::new() }
    }

    fn now(&self) -> u64 {
        *self.count.lock().unwrap()
    }

    fn signal(&self) {
        *self.count.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    fn wait_past(&self, seen: u64) {
        let mut count = self.count.lock().unwrap();
        while *count == seen {
            count = self.changed.wait(count).unwrap();
        }
    }
}

/// How the operation path and the drain order their accesses: `SeqCst`,
/// as `for_each_piece` (`PageTable::load_pte_seqcst`) and
/// `drain_operations` (`Words::fetch_add`, `Words::load_seqcst`) do. With
/// `Acquire` loads on either side, the writer's counter increment and entry
/// load and the migrator's mark and counter load form a store-buffering
/// pattern, and loom finds a write that lands on the old frame after the
/// copy.
#[derive(Clone, Copy, Debug)]
enum Orderings {
    SeqCst,
}

impl Orderings {
    fn load(self, word: &AtomicU64) -> u64 {
        match self {
            Orderings::SeqCst => sc_load(word),
        }
    }

    fn fetch_add(self, word: &AtomicU64, value: u64) -> u64 {
        match self {
            Orderings::SeqCst => sc_fetch_add(word, value),
        }
    }
}

/// One node's operation epoch and its two counters (`hdr::EPOCH`,
/// `hdr::ACTIVE_EVEN`, `hdr::ACTIVE_ODD`).
struct Epochs {
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    /// Signalled after each exit, for the drain's wait.
    exits: Event,
}

impl Epochs {
    fn new() -> Self {
        Epochs { epoch: AtomicU64::new(0), active: [AtomicU64::new(0), AtomicU64::new(0)], exits: Event::new() }
    }

    /// `migrate::enter`.
    fn enter(&self) -> &AtomicU64 {
        let counter = &self.active[(sc_load(&self.epoch) % 2) as usize];
        sc_fetch_add(counter, 1);
        counter
    }

    /// `OpGuard::drop`.
    fn exit(&self, counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Release);
        self.exits.signal();
    }

    /// `Pool::drain_operations`, for one node.
    fn drain(&self, orderings: Orderings) {
        let previous = orderings.fetch_add(&self.epoch, 1);
        let counter = &self.active[(previous % 2) as usize];
        loop {
            let seen = self.exits.now();
            if orderings.load(counter) == 0 {
                return;
            }
            self.exits.wait_past(seen);
        }
    }
}

/// Two frames of one word each: the page's old and new home.
struct Frames([UnsafeCell<u64>; 2]);

impl Frames {
    fn new(value: u64) -> Self {
        Frames([UnsafeCell::new(value), UnsafeCell::new(value)])
    }

    fn read(&self, frame: usize) -> u64 {
        self.0[frame].with(|p| unsafe { *p })
    }

    fn write(&self, frame: usize, value: u64) {
        self.0[frame].with_mut(|p| unsafe { *p = value })
    }
}

struct MigrationState {
    pte: AtomicU64,
    epochs: Epochs,
    /// Frames of one word per writer.
    words: [Frames; 2],
    /// Signalled after the switch of the entry, for `wait_while_migrating`.
    switched: Event,
}

impl MigrationState {
    fn new(value: u64) -> Self {
        MigrationState {
            pte: AtomicU64::new(A),
            epochs: Epochs::new(),
            words: [Frames::new(value), Frames::new(value)],
            switched: Event::new(),
        }
    }
}

/// `migrate::wait_while_migrating`.
fn wait_while_migrating(pte: &AtomicU64, switched: &Event) {
    let seen = switched.now();
    if pte.load(Ordering::Acquire) & MIGRATING != 0 {
        switched.wait_past(seen);
    }
}

/// Writes through the API (`Pool::write` through `for_each_piece`): count
/// the operation, load the entry, wait out a migration outside the count
/// (`wait_while_migrating`), write the frame the entry names.
fn api_write(state: &MigrationState, orderings: Orderings, word: usize, value: u64) {
    loop {
        let counter = state.epochs.enter();
        let pte = orderings.load(&state.pte);
        if pte & MIGRATING != 0 {
            state.epochs.exit(counter);
            wait_while_migrating(&state.pte, &state.switched);
            continue;
        }
        state.words[word].write(frame_of(pte), value);
        state.epochs.exit(counter);
        return;
    }
}

/// Phases 1, 3, 4 and 5 of `Pool::move_pages` for one page from frame A to
/// frame B. Phase 2 (write-protect) concerns raw-pointer writers only; API
/// writers never use a mapping of the window.
fn migrate_page(state: &MigrationState, orderings: Orderings) {
    sc_compare_exchange(&state.pte, A, A | MIGRATING).expect("nothing else changes the entry");
    state.epochs.drain(orderings);
    for frames in &state.words {
        frames.write(B as usize, frames.read(A as usize));
    }
    sc_store(&state.pte, B);
    state.switched.signal();
}

/// Migration against API writers: `migrate::enter`, `Pool::for_each_piece`
/// and `Pool::write` on the writers' side, `Pool::move_pages` and
/// `Pool::drain_operations` on the migrator's. Two writers each write one
/// word of the page while it moves from A to B; afterwards B, the live
/// frame, must hold both words. Loom also fails the model if a write to A
/// can overlap the copy.
fn migration_against_writers(orderings: Orderings) {
    let mut builder = loom::model::Builder::new();
    // Two writers and a migrator: three preemptions cover every order of
    // the writers' steps against the mark, the drain and the copy, and keep
    // the run to seconds.
    builder.preemption_bound.get_or_insert(3);
    builder.check(move || {
        let state = Arc::new(MigrationState::new(0));
        let writers: Vec<_> = (0..2)
            .map(|word| {
                let state = state.clone();
                thread::spawn(move || api_write(&state, orderings, word, 10 + word as u64))
            })
            .collect();
        migrate_page(&state, orderings);
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(sc_load(&state.pte), B);
        for (word, frames) in state.words.iter().enumerate() {
            assert_eq!(frames.read(B as usize), 10 + word as u64, "the write of word {word} was lost");
        }
    });
}

#[test]
fn migration_keeps_every_write_with_seqcst_drain() {
    migration_against_writers(Orderings::SeqCst);
}

/// The generation bits of the generation word (`& 0xffff_ffff`).
const GENERATION_MASK: u64 = 0xffff_ffff;
/// The generation recorded while a replica is being filled.
const FILLING: u64 = u32::MAX as u64;
const OLD: u64 = 1;
const NEW: u64 = 2;

/// One read-mostly page, homed on one node with a replica on another.
struct ReplicaState {
    /// The page's contents at its home.
    home: AtomicU64,
    /// The page's data generation (`entry::GENERATION`).
    generation: AtomicU64,
    /// The replica table entry's value word: the generation it recorded
    /// (the frame is fixed in this model).
    recorded: AtomicU64,
    /// The replica's contents.
    replica: AtomicU64,
    /// The replica table's lock (`hdr::REPLICA_LOCK`).
    lock: AtomicU64,
    /// Set after the writer's write returned; not part of the protocol.
    written: AtomicU64,
}

/// `ReplicaTable::refresh` for a page whose entry exists.
fn refresh(state: &ReplicaState) {
    while sc_compare_exchange(&state.lock, 0, 1).is_err() {
        thread::yield_now();
    }
    sc_store(&state.recorded, FILLING);
    let before = sc_load(&state.generation) & GENERATION_MASK;
    state.replica.store(state.home.load(Ordering::Relaxed), Ordering::Relaxed);
    let after = sc_load(&state.generation) & GENERATION_MASK;
    let recorded = if before == after && before != FILLING { before } else { FILLING };
    sc_store(&state.recorded, recorded);
    sc_store(&state.lock, 0);
}

/// `Pool::read` of a read-mostly page on a node that is not its home,
/// through `Pool::read_replica`.
fn replica_read(state: &ReplicaState) -> u64 {
    for attempt in 0..2 {
        let current = sc_load(&state.generation) & GENERATION_MASK;
        let recorded = state.recorded.load(Ordering::Acquire);
        if recorded == current {
            let value = state.replica.load(Ordering::Relaxed);
            let unchanged = sc_load(&state.generation) & GENERATION_MASK == current
                && state.recorded.load(Ordering::Acquire) == recorded;
            if unchanged {
                return value;
            }
        } else if attempt == 0 {
            refresh(state);
        }
    }
    state.home.load(Ordering::Relaxed)
}

/// Replica invalidation against readers: `Pool::write` and
/// `Pool::invalidate_replicas` on the writer's side, `Pool::read_replica`
/// and `ReplicaTable::refresh` on the readers'. The page starts with a
/// current replica of OLD; one thread writes NEW and bumps the generation,
/// one reads through the replica, and one refreshes the replica as a
/// prefetch would. A read that starts after the write returned (it reads the
/// writer's flag) must return NEW.
#[test]
fn replica_read_after_write_is_never_stale() {
    let mut builder = loom::model::Builder::new();
    // Three threads with long paths. A bound of three preemptions keeps the
    // run to seconds, and a stale copy needs at most two: the refresh
    // between the writer's two steps, and the reader inside the refresh.
    builder.preemption_bound.get_or_insert(3);
    builder.check(|| {
        let state = Arc::new(ReplicaState {
            home: AtomicU64::new(OLD),
            generation: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            replica: AtomicU64::new(OLD),
            lock: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let writer = {
            let state = state.clone();
            thread::spawn(move || {
                state.home.store(NEW, Ordering::Relaxed);
                state.generation.fetch_add(1, Ordering::AcqRel);
                state.written.store(1, Ordering::Release);
            })
        };
        let prefetch = {
            let state = state.clone();
            thread::spawn(move || refresh(&state))
        };
        let after_write = state.written.load(Ordering::Acquire) == 1;
        let value = replica_read(&state);
        if after_write {
            assert_eq!(value, NEW, "a read that started after the write returned the old value");
        }
        writer.join().unwrap();
        prefetch.join().unwrap();
    });
}

/// What a process maps at the page: the frame and whether it is writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    frame: Option<usize>,
    writable: bool,
}

/// One node process other than the migrator's, as far as one page goes.
struct Process {
    slot: Slot,
    /// The kernel's mapping of the page.
    mapping: Mutex<Mapping>,
    /// The mailbox (`hdr::MAILBOX_SEQ`, `MAILBOX_ACK`, `MAILBOX_OP`).
    seq: AtomicU64,
    ack: AtomicU64,
    op: AtomicU64,
    /// Signalled after each post and each acknowledgement, for the futex
    /// waits of the service and the migrator.
    posted: Event,
    acked: Event,
}

impl Process {
    fn new(mapped: Option<u64>) -> Self {
        Process {
            slot: Slot { word: AtomicU64::new(mapped.map_or(0, key)), unlocked: Event::new() },
            mapping: Mutex::new(Mapping { frame: mapped.map(|f| f as usize), writable: mapped.is_some() }),
            seq: AtomicU64::new(0),
            ack: AtomicU64::new(0),
            op: AtomicU64::new(0),
            posted: Event::new(),
            acked: Event::new(),
        }
    }

    /// `migrate::serve` for `requests` requests, carrying out
    /// `Window::protect_run` and `Window::refresh_run`.
    fn serve(&self, requests: u64) {
        let mut done = self.ack.load(Ordering::Acquire);
        while done < requests {
            let seen = self.posted.now();
            let requested = self.seq.load(Ordering::Acquire);
            if requested == done {
                self.posted.wait_past(seen);
                continue;
            }
            let op = self.op.load(Ordering::Acquire);
            let key = self.slot.lock();
            match op {
                PROTECT => {
                    if key != 0 {
                        self.mapping.lock().unwrap().writable = false;
                    }
                    self.slot.unlock(key);
                }
                REFRESH => {
                    if key != 0 {
                        *self.mapping.lock().unwrap() = Mapping { frame: None, writable: false };
                    }
                    self.slot.unlock(0);
                }
                other => unreachable!("request {other}"),
            }
            done = requested;
            self.ack.store(done, Ordering::Release);
            self.acked.signal();
        }
    }

    /// `Pool::request_all` for this one process: post, then wait for the
    /// acknowledgement.
    fn request(&self, op: u64) {
        sc_store(&self.op, op);
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.posted.signal();
        loop {
            let seen = self.acked.now();
            if self.ack.load(Ordering::Acquire) >= seq {
                return;
            }
            self.acked.wait_past(seen);
        }
    }

    /// `fault::map_page`: maps the current frame if the page is not
    /// migrating; returns false where the handler would wait (this model's
    /// migration never finishes) or found the frame mapped already.
    fn map_on_fault(&self, pte: &AtomicU64) -> bool {
        let (now, mapped) = loop {
            let now = sc_load(pte);
            if now & MIGRATING != 0 {
                return false;
            }
            let mapped = self.slot.lock();
            if sc_load(pte) == now {
                break (now, mapped);
            }
            self.slot.unlock(mapped);
        };
        if mapped == key(now) {
            self.slot.unlock(mapped);
            return false;
        }
        *self.mapping.lock().unwrap() = Mapping { frame: Some(frame_of(now)), writable: true };
        if sc_load(pte) & MIGRATING != 0 {
            self.mapping.lock().unwrap().writable = false;
        }
        self.slot.unlock(key(now));
        true
    }

    /// `Pool::ensure_mapped` for one page that is not read-mostly: map
    /// what the entry names (`Window::map_run`), then check the entry again.
    /// Returns false where it would wait for a migration.
    fn ensure_mapped(&self, pte: &AtomicU64) -> bool {
        loop {
            let now = sc_load(pte);
            if now & MIGRATING != 0 {
                return false;
            }
            if self.slot.word.load(Ordering::Acquire) == key(now) {
                return true;
            }
            // Under the slot lock, check that the entry still names the
            // frame before mapping it (`Window::map_run`'s `current`).
            let held = self.slot.lock();
            if key(frame_of(sc_load(pte)) as u64) != key(now) {
                self.slot.unlock(held);
                continue;
            }
            *self.mapping.lock().unwrap() = Mapping { frame: Some(frame_of(now)), writable: true };
            self.slot.unlock(key(now));
            let again = sc_load(pte);
            if again & MIGRATING != 0 {
                let held = self.slot.lock();
                if held != 0 {
                    self.mapping.lock().unwrap().writable = false;
                }
                self.slot.unlock(held);
                return true;
            } else if key(frame_of(again) as u64) != key(now) {
                self.slot.lock();
                *self.mapping.lock().unwrap() = Mapping { frame: None, writable: false };
                self.slot.unlock(0);
                continue;
            }
            return true;
        }
    }

    /// A plain load through the page: through the mapping if there is
    /// one, else through the fault handler. `None` where the handler would
    /// wait for the migration.
    fn raw_load(&self, pte: &AtomicU64, frames: &Frames) -> Option<u64> {
        loop {
            {
                let mapping = self.mapping.lock().unwrap();
                if let Some(frame) = mapping.frame {
                    return Some(frames.read(frame));
                }
            }
            if !self.map_on_fault(pte) {
                return None;
            }
        }
    }
}

/// Phases 5 to 7 of `Pool::move_pages`, once the copy is done: switch the
/// entry to B, have the process drop its mapping (`request_all(Refresh)`),
/// release A; its next owner writes it (`Frames::release`, then an
/// allocation that takes the frame).
fn switch_and_release(pte: &AtomicU64, switched: &Event, process: &Process, frames: &Frames) {
    sc_store(pte, B);
    switched.signal();
    process.request(REFRESH);
    frames.write(A as usize, POISON);
}

/// Cross-process reclamation against a raw-pointer reader: phases 5 to 7 of
/// `Pool::move_pages`, `migrate::serve` with `Window::refresh_run`, and a
/// plain load through the window with `fault::map_page` behind it. The
/// process maps A when the migration has copied A to B; its reader loads
/// the page once. It must never see A after A was reused, and loom fails
/// the model if its load of A can overlap the reuse.
#[test]
fn reclaimed_frame_is_never_read_through_a_mapping() {
    let mut builder = loom::model::Builder::new();
    // Three threads; three preemptions let the reader's load fall anywhere
    // in the service's refresh and the migrator's release.
    builder.preemption_bound.get_or_insert(3);
    builder.check(|| {
        let pte = Arc::new(AtomicU64::new(A | MIGRATING));
        let switched = Event::new();
        let frames = Arc::new(Frames::new(7));
        let process = Arc::new(Process::new(Some(A)));
        let service = {
            let process = process.clone();
            thread::spawn(move || process.serve(1))
        };
        let reader = {
            let (pte, frames, process) = (pte.clone(), frames.clone(), process.clone());
            thread::spawn(move || process.raw_load(&pte, &frames))
        };
        switch_and_release(&pte, &switched, &process, &frames);
        service.join().unwrap();
        assert_eq!(reader.join().unwrap(), Some(7), "the reader saw the reused frame");
    });
}

/// Cross-process reclamation against an API reader: `Pool::read` through
/// `for_each_piece` (counted in the epoch, reading the frame the entry
/// names) against the whole of `Pool::move_pages`, with the frame reused
/// after phase 7. Needs the drain to wait for every read of A, so it runs
/// with the `SeqCst` orderings (see `migration_as_written_can_lose_a_write`
/// for the orderings as written).
#[test]
fn reclaimed_frame_is_never_read_through_the_api() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(3);
    builder.check(|| {
        let orderings = Orderings::SeqCst;
        let state = Arc::new(MigrationState::new(7));
        let process = Arc::new(Process::new(None));
        let service = {
            let process = process.clone();
            thread::spawn(move || process.serve(2))
        };
        let reader = {
            let state = state.clone();
            thread::spawn(move || loop {
                let counter = state.epochs.enter();
                let pte = orderings.load(&state.pte);
                if pte & MIGRATING != 0 {
                    state.epochs.exit(counter);
                    wait_while_migrating(&state.pte, &state.switched);
                    continue;
                }
                let value = state.words[0].read(frame_of(pte));
                state.epochs.exit(counter);
                return value;
            })
        };
        sc_compare_exchange(&state.pte, A, A | MIGRATING).expect("nothing else changes the entry");
        process.request(PROTECT);
        state.epochs.drain(orderings);
        state.words[0].write(B as usize, state.words[0].read(A as usize));
        switch_and_release(&state.pte, &state.switched, &process, &state.words[0]);
        service.join().unwrap();
        assert_eq!(reader.join().unwrap(), 7, "the reader saw the reused frame");
    });
}

/// `Pool::ensure_mapped` against a whole migration and a raw-pointer
/// reader in the same process: one thread of the process maps the page
/// through the API (`local_ptr`) while another already has a pointer into
/// it and loads through it. `ensure_mapped` loads the entry, takes the
/// page's slot lock, checks the entry again and only then maps, so it never
/// maps a frame that a migration has released; the reader never sees the
/// reused frame.
#[test]
fn ensure_mapped_never_maps_a_released_frame() {
    let mut builder = loom::model::Builder::new();
    // Four threads; the race needs two preemptions (the mapper after its
    // load of the entry, the reader after the mapper's mmap).
    builder.preemption_bound.get_or_insert(2);
    builder.check(|| {
        let state = Arc::new(MigrationState::new(7));
        let process = Arc::new(Process::new(None));
        let service = {
            let process = process.clone();
            thread::spawn(move || process.serve(2))
        };
        let mapper = {
            let (state, process) = (state.clone(), process.clone());
            thread::spawn(move || {
                process.ensure_mapped(&state.pte);
            })
        };
        let reader = {
            let (state, process) = (state.clone(), process.clone());
            thread::spawn(move || process.raw_load(&state.pte, &state.words[0]))
        };
        sc_compare_exchange(&state.pte, A, A | MIGRATING).expect("nothing else changes the entry");
        process.request(PROTECT);
        state.epochs.drain(Orderings::SeqCst);
        state.words[0].write(B as usize, state.words[0].read(A as usize));
        switch_and_release(&state.pte, &state.switched, &process, &state.words[0]);
        service.join().unwrap();
        mapper.join().unwrap();
        let seen = reader.join().unwrap();
        assert_ne!(seen, Some(POISON), "the reader saw the reused frame");
    });
}

/// The mapping-slot lock against a migration's write-protect: a thread of
/// the process maps the page for a store (`fault::map_page`, or
/// `Pool::ensure_mapped`) while the migrator marks the page and has the
/// process's service write-protect it (phases 1 and 2 of
/// `Pool::move_pages`, `Window::protect_run`). Once the migrator has the
/// acknowledgement, no writable mapping of A may remain.
fn slot_lock_against_protect(ensure_mapped: bool) {
    let mut builder = loom::model::Builder::new();
    // Three threads; three preemptions let the mapper's steps fall anywhere
    // in the mark and the service's write-protect.
    builder.preemption_bound.get_or_insert(3);
    builder.check(move || {
        let pte = Arc::new(AtomicU64::new(A));
        let process = Arc::new(Process::new(None));
        let service = {
            let process = process.clone();
            thread::spawn(move || process.serve(1))
        };
        let mapper = {
            let (pte, process) = (pte.clone(), process.clone());
            thread::spawn(move || {
                if ensure_mapped {
                    process.ensure_mapped(&pte);
                } else {
                    process.map_on_fault(&pte);
                }
            })
        };
        sc_compare_exchange(&pte, A, A | MIGRATING).expect("nothing else changes the entry");
        process.request(PROTECT);
        let seen_by_migrator = *process.mapping.lock().unwrap();
        mapper.join().unwrap();
        service.join().unwrap();
        let at_end = *process.mapping.lock().unwrap();
        assert!(
            !(at_end.frame == Some(A as usize) && at_end.writable),
            "a writable mapping of the migrating frame is left: {at_end:?} (the migrator saw {seen_by_migrator:?})"
        );
    });
}

#[test]
fn fault_mapping_is_write_protected_by_a_migration() {
    slot_lock_against_protect(false);
}

#[test]
fn api_mapping_is_write_protected_by_a_migration() {
    slot_lock_against_protect(true);
}

/// A node's frame free map with two frames (`Frames::reserve`,
/// `Frames::claim`, `Frames::release`): the free counter is lowered with a
/// compare-exchange loop before bits are claimed with `fetch_or`, and a
/// release clears the bit before it raises the counter.
struct FrameMap {
    free: AtomicU64,
    bits: AtomicU64,
}

impl FrameMap {
    fn reserve(&self) -> bool {
        let mut current = self.free.load(Ordering::Acquire);
        loop {
            if current == 0 {
                return false;
            }
            match self.free.compare_exchange(current, current - 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Claims the lowest clear bit; the reservation guarantees one.
    fn claim(&self) -> u64 {
        loop {
            let current = self.bits.load(Ordering::Acquire);
            let wanted = !current & (current + 1);
            assert!(wanted & 0b11 != 0, "a reservation found no clear bit: {current:#b}");
            let previous = self.bits.fetch_or(wanted, Ordering::SeqCst);
            if previous & wanted == 0 {
                return wanted.trailing_zeros() as u64;
            }
        }
    }

    fn release(&self, frame: u64) {
        let previous = self.bits.fetch_and(!(1 << frame), Ordering::SeqCst);
        assert!(previous & (1 << frame) != 0, "frame {frame} was released while free");
        self.free.fetch_add(1, Ordering::SeqCst);
    }
}

/// Three nodes take frames of one node with two frames while a fourth
/// returns one it held: no frame is handed out twice, a taker that finds
/// the counter at zero gets nothing, and the counter and the map agree at
/// the end (`Frames::validate`).
#[test]
fn frame_map_hands_out_each_frame_once() {
    let mut builder = loom::model::Builder::new();
    // Three threads with retry loops; unbounded, the model runs for minutes.
    builder.preemption_bound.get_or_insert(2);
    builder.check(|| {
        // Frame 0 is held by the releasing thread from the start.
        let map = Arc::new(FrameMap { free: AtomicU64::new(1), bits: AtomicU64::new(0b01) });
        let held = Arc::new(Mutex::new(Vec::new()));
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let (map, held) = (map.clone(), held.clone());
                thread::spawn(move || {
                    if map.reserve() {
                        let frame = map.claim();
                        let mut held = held.lock().unwrap();
                        assert!(!held.contains(&frame), "frame {frame} handed out twice");
                        held.push(frame);
                    }
                })
            })
            .collect();
        let releaser = {
            let map = map.clone();
            thread::spawn(move || map.release(0))
        };
        for taker in takers {
            taker.join().unwrap();
        }
        releaser.join().unwrap();
        let used = map.bits.load(Ordering::SeqCst).count_ones() as u64;
        let free = map.free.load(Ordering::SeqCst);
        assert_eq!(used + free, 2, "the counter and the map disagree");
        assert_eq!(used, held.lock().unwrap().len() as u64);
    });
}

/// A slab of two blocks (`Slab::claim`, `Slab::collect`, `free_block`):
/// the owner thread hands out blocks with plain loads and stores on the
/// allocation map; another node frees a block by setting its bit in the
/// remote-free map with `fetch_or`, after checking that it is allocated and
/// not already freed; the owner collects remote frees with `swap(0)`.
struct SlabModel {
    allocated: AtomicU64,
    remote: AtomicU64,
    /// The blocks' contents: the owner writes a block it hands out, and the
    /// remote freer reads its last value before it frees it.
    blocks: [UnsafeCell<u64>; 2],
}

impl SlabModel {
    fn claim(&self) -> Option<usize> {
        let current = self.allocated.load(Ordering::Relaxed);
        if current & 0b11 == 0b11 {
            return None;
        }
        let bit = (!current).trailing_zeros() as usize;
        self.allocated.store(current | 1 << bit, Ordering::Release);
        Some(bit)
    }

    fn collect(&self) {
        if self.remote.load(Ordering::Acquire) != 0 {
            let freed = self.remote.swap(0, Ordering::AcqRel);
            let current = self.allocated.load(Ordering::Relaxed);
            self.allocated.store(current & !freed, Ordering::Release);
        }
    }

    /// `free_block` from a thread that is not the owner; returns false for a
    /// double free.
    fn free_remote(&self, block: usize) -> bool {
        let bit = 1u64 << block;
        if self.allocated.load(Ordering::Acquire) & bit == 0 || self.remote.load(Ordering::Acquire) & bit != 0 {
            return false;
        }
        self.remote.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

/// The owner hands block 0 to another node, which uses and frees it
/// remotely; meanwhile the owner allocates again, collecting remote frees
/// when the slab is full. A block is never handed out twice, nor while its
/// previous holder still uses it (loom checks the contents for data
/// races). A second free of the block is not modelled: raced against the
/// owner's collect it can pass the checks, which `free_block` notes.
#[test]
fn slab_hands_out_each_block_once() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound.get_or_insert(3);
    builder.check(|| {
        let slab = Arc::new(SlabModel {
            allocated: AtomicU64::new(0),
            remote: AtomicU64::new(0),
            blocks: [UnsafeCell::new(0), UnsafeCell::new(0)],
        });
        let first = slab.claim().expect("an empty slab has a block");
        // SAFETY (model): the owner holds the block it just claimed.
        slab.blocks[first].with_mut(|b| unsafe { *b = 7 });

        let remote = {
            let slab = slab.clone();
            thread::spawn(move || {
                // The block reached this node through a published address.
                let seen = slab.blocks[first].with(|b| unsafe { *b });
                assert_eq!(seen, 7);
                assert!(slab.free_remote(first), "the free was refused");
            })
        };

        // The owner allocates until it gets a block, collecting remote
        // frees whenever the slab is full.
        let mut got = Vec::new();
        for _ in 0..3 {
            match slab.claim() {
                Some(block) => {
                    slab.blocks[block].with_mut(|b| unsafe { *b = 9 });
                    got.push(block);
                }
                None => slab.collect(),
            }
        }
        remote.join().unwrap();
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "a block was handed out twice: {got:?}");
    });
}
