//! Handles: slot indices with a generation, so that a stale handle is
//! refused instead of dereferenced.
//!
//! A handle is one `u64`: the slot index plus one in the low 32 bits and the
//! slot's generation in the high 32 bits. Zero is never issued. Removing a
//! value bumps its slot's generation, so every copy of the old handle stops
//! matching. A slot whose generation reached `u32::MAX` is retired rather
//! than wrapped, so a handle never matches a later value by accident.
//!
//! Values are `Arc`s: a lookup clones the `Arc` and drops the lock before the
//! call runs, so calls on one pool run in parallel, and a `leave` racing with
//! a call only drops the registry's reference; the pool ends when the last
//! call holding it returns.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::{Failure, Outcome};

struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

/// A table of live values of one kind, addressed by handle.
pub(crate) struct Registry<T> {
    kind: &'static str,
    slots: Mutex<Vec<Slot<T>>>,
}

impl<T> Registry<T> {
    pub const fn new(kind: &'static str) -> Self {
        Registry { kind, slots: parking_lot::const_mutex(Vec::new()) }
    }

    /// Stores `value` and returns its handle.
    pub fn insert(&self, value: Arc<T>) -> u64 {
        let mut slots = self.slots.lock();
        let index = match slots.iter().position(|s| s.value.is_none() && s.generation < u32::MAX) {
            Some(index) => index,
            None => {
                slots.push(Slot { generation: 0, value: None });
                slots.len() - 1
            }
        };
        let slot = &mut slots[index];
        slot.value = Some(value);
        (slot.generation as u64) << 32 | (index as u64 + 1)
    }

    /// The value of `handle`.
    pub fn get(&self, handle: u64) -> Outcome<Arc<T>> {
        let slots = self.slots.lock();
        let (index, generation) = self.split(handle)?;
        match slots.get(index) {
            Some(Slot { generation: g, value: Some(value) }) if *g == generation => Ok(value.clone()),
            Some(_) => Err(self.stale(handle)),
            None => Err(self.unknown(handle)),
        }
    }

    /// Takes the value of `handle` out; every copy of the handle is stale
    /// afterwards.
    pub fn remove(&self, handle: u64) -> Outcome<Arc<T>> {
        let mut slots = self.slots.lock();
        let (index, generation) = self.split(handle)?;
        match slots.get_mut(index) {
            Some(slot) if slot.generation == generation && slot.value.is_some() => {
                slot.generation = slot.generation.saturating_add(1);
                Ok(slot.value.take().expect("checked to be present"))
            }
            Some(_) => Err(self.stale(handle)),
            None => Err(self.unknown(handle)),
        }
    }

    fn split(&self, handle: u64) -> Outcome<(usize, u32)> {
        if handle == 0 {
            let remedy = if self.kind == "pool" { "join a pool with meshmem_join" } else { "create one with meshmem_buffer_alloc or meshmem_buffer_view" };
            return Err(Failure::new(
                crate::meshmem_status::MESHMEM_ERR_INVALID_HANDLE,
                format!("the {} handle is null (zero); {remedy} first", self.kind),
            ));
        }
        let index = (handle & 0xffff_ffff) as usize - 1;
        Ok((index, (handle >> 32) as u32))
    }

    #[cold]
    fn stale(&self, handle: u64) -> Failure {
        let ended = if self.kind == "pool" { "its pool left the group (meshmem_leave)" } else { "the buffer was released" };
        Failure::new(
            crate::meshmem_status::MESHMEM_ERR_INVALID_HANDLE,
            format!("{} handle {handle:#x} is stale: {ended}; use a live handle", self.kind),
        )
    }

    #[cold]
    fn unknown(&self, handle: u64) -> Failure {
        Failure::new(
            crate::meshmem_status::MESHMEM_ERR_INVALID_HANDLE,
            format!("{} handle {handle:#x} was never issued by this library", self.kind),
        )
    }
}
