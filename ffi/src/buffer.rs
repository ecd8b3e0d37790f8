//! Buffers: reference-counted ranges of pool memory, and their export as
//! DLPack tensors.
//!
//! A buffer either owns an allocation ([`meshmem_buffer_alloc`]) or views a
//! range that some node allocated ([`meshmem_buffer_view`]). Its handle is
//! one reference; each DLPack tensor exported from it is another. The
//! allocation is freed when the last reference goes: the handle released
//! with [`meshmem_buffer_release`] and every consumer's deleter called. Each
//! reference also holds the pool, so its mapping outlives `meshmem_leave`
//! until the last tensor is gone.
//!
//! A view frees nothing. The memory it shows is valid until the node that
//! owns the allocation frees it, so the program must order that free after
//! every use of the view (a barrier is enough).
//!
//! The DLPack structures follow `dlpack.h` version 1.0: the legacy
//! `DLManagedTensor` and `DLManagedTensorVersioned`. The tensor's device is
//! the CPU (`kDLCPU`), since this backend's pool memory is host memory
//! mapped into every process; its `data` is the global address, which is
//! the pointer in this process.

use std::ffi::c_void;
use std::sync::Arc;

use meshmem_core::{GlobalAddr, Pool};

use crate::join::{pool, meshmem_pool};
use crate::ops::{advice, allocate, meshmem_advice, meshmem_placement, placement, range};
use crate::registry::Registry;
use crate::{call, out, Failure, Outcome};

/// A buffer of pool memory. Zero is no buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct meshmem_buffer {
    pub id: u64,
}

struct Buffer {
    pool: Arc<Pool>,
    addr: GlobalAddr,
    len: usize,
    owned: bool,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.pool.free(self.addr) {
                // Drop cannot report to a caller; a failure here means the
                // allocation was freed behind the buffer's back through
                // `meshmem_free`, which is the caller's bug.
                tracing::error!(node = %self.pool.node(), addr = %self.addr, "freeing a released buffer failed: {e}");
            }
        }
    }
}

static BUFFERS: Registry<Buffer> = Registry::new("buffer");

fn register(buffer: Buffer, handle: &mut meshmem_buffer) {
    handle.id = BUFFERS.insert(Arc::new(buffer));
}

/// Allocates `size` bytes as [`crate::ops::meshmem_alloc`] does, maps them
/// into this process, and writes a buffer that owns them to `buffer`.
///
/// # Safety
///
/// `placement` is null or valid; `buffer` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_buffer_alloc(
    pool_handle: meshmem_pool,
    size: usize,
    align: usize,
    placement: *const meshmem_placement,
    advice: meshmem_advice,
    buffer: *mut meshmem_buffer,
) -> crate::meshmem_status {
    call("meshmem_buffer_alloc", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let buffer = unsafe { out(buffer, "buffer") }?;
        // SAFETY: the caller promises null or valid.
        let placement = unsafe { self::placement(placement, &pool) }?;
        let advice = self::advice(advice, &pool)?;
        let addr = allocate(&pool, size, align, placement, advice)?;
        let owned = Buffer { pool, addr, len: size, owned: true };
        // Mapped now, so that exported tensors are plain pointers; on failure
        // dropping `owned` frees the allocation again.
        owned.pool.local_ptr(addr, size)?;
        register(owned, buffer);
        Ok(())
    })
}

/// Views `len` bytes at `addr`, allocated by any node, maps them into this
/// process, and writes the buffer to `buffer`. Releasing a view frees
/// nothing.
///
/// # Safety
///
/// `buffer` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_buffer_view(pool_handle: meshmem_pool, addr: u64, len: usize, buffer: *mut meshmem_buffer) -> crate::meshmem_status {
    call("meshmem_buffer_view", || {
        let pool = pool(pool_handle)?;
        // SAFETY: the caller promises null or writable.
        let buffer = unsafe { out(buffer, "buffer") }?;
        range(addr, len)?;
        if len == 0 {
            return Err(Failure::argument("`len` is 0; a view covers at least one byte"));
        }
        pool.local_ptr(GlobalAddr(addr), len)?;
        register(Buffer { pool, addr: GlobalAddr(addr), len, owned: false }, buffer);
        Ok(())
    })
}

/// Writes the buffer's global address (its pointer in this process) and
/// length in bytes.
///
/// # Safety
///
/// `addr` and `len` are each null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_buffer_info(buffer: meshmem_buffer, addr: *mut u64, len: *mut usize) -> crate::meshmem_status {
    call("meshmem_buffer_info", || {
        let found = BUFFERS.get(buffer.id)?;
        // SAFETY: the caller promises null or writable for both.
        let (addr, len) = unsafe { (out(addr, "addr")?, out(len, "len")?) };
        *addr = found.addr.0;
        *len = found.len;
        Ok(())
    })
}

/// Releases the handle's reference: the handle becomes stale, and an owned
/// allocation is freed once no exported tensor uses it either.
///
/// # Safety
///
/// None; any handle value is accepted.
#[no_mangle]
pub extern "C" fn meshmem_buffer_release(buffer: meshmem_buffer) -> crate::meshmem_status {
    call("meshmem_buffer_release", || BUFFERS.remove(buffer.id).map(drop))
}

/// DLPack type codes (`DLDataTypeCode`) a tensor may use.
pub const MESHMEM_DL_INT: u8 = 0;
pub const MESHMEM_DL_UINT: u8 = 1;
pub const MESHMEM_DL_FLOAT: u8 = 2;
pub const MESHMEM_DL_BFLOAT: u8 = 4;
pub const MESHMEM_DL_COMPLEX: u8 = 5;
pub const MESHMEM_DL_BOOL: u8 = 6;

/// Most dimensions a tensor may have.
pub const MESHMEM_DL_MAX_DIMS: u32 = 64;

/// How to see a buffer as a tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct meshmem_tensor_desc {
    /// Number of dimensions, 0 to `MESHMEM_DL_MAX_DIMS`.
    pub ndim: u32,
    /// `ndim` sizes, each at least 0 (null when `ndim` is 0).
    pub shape: *const i64,
    /// `ndim` strides in elements, each at least 0; null for row-major.
    pub strides: *const i64,
    /// One of the `MESHMEM_DL_*` codes.
    pub dtype_code: u8,
    /// Bits per lane: a multiple of 8 from 8 to 256 (8 for bool).
    pub dtype_bits: u8,
    /// Lanes per element, at least 1.
    pub dtype_lanes: u16,
    /// Bytes from the buffer's start to the first element.
    pub byte_offset: u64,
    /// 1 for a `DLManagedTensorVersioned` (DLPack 1.0), 0 for the legacy
    /// `DLManagedTensor`.
    pub versioned: u32,
    /// 1 to mark a versioned tensor read-only (`DLPACK_FLAG_BITMASK_READ_ONLY`).
    pub read_only: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// `kDLCPU` in `dlpack.h`.
const DL_CPU: i32 = 1;
/// `DLPACK_FLAG_BITMASK_READ_ONLY` in `dlpack.h`.
const DL_READ_ONLY: u64 = 1;

/// A managed tensor with what it points at. `managed` comes first, so a
/// pointer to the export is a pointer to the DLPack structure.
#[repr(C)]
struct Export<M> {
    managed: M,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _buffer: Arc<Buffer>,
}

unsafe extern "C" fn delete_legacy(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` came from `meshmem_buffer_dlpack`, which boxed an
    // `Export<DLManagedTensor>` at this address; DLPack calls the deleter once.
    unsafe { delete::<DLManagedTensor>(managed) }
}

unsafe extern "C" fn delete_versioned(managed: *mut DLManagedTensorVersioned) {
    // SAFETY: as in `delete_legacy`, for the versioned structure.
    unsafe { delete::<DLManagedTensorVersioned>(managed) }
}

/// Drops an export; a panic in a drop is caught, since a deleter is called
/// by foreign code.
///
/// # Safety
///
/// `managed` is null or the pointer `meshmem_buffer_dlpack` returned for an
/// `Export<M>`, not deleted yet.
unsafe fn delete<M>(managed: *mut M) {
    if managed.is_null() {
        return;
    }
    // SAFETY: the caller promises a live, boxed `Export<M>` at this address.
    let export = unsafe { Box::from_raw(managed.cast::<Export<M>>()) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(export)));
}

/// The number of bytes a tensor of `desc` spans, checked for overflow.
fn span(desc: &meshmem_tensor_desc, shape: &[i64], strides: &[i64]) -> Outcome<u64> {
    let overflow = || Failure::argument(format!("the tensor of shape {shape:?}, strides {strides:?} and {} bits x {} lanes spans more than 2^64 bytes", desc.dtype_bits, desc.dtype_lanes));
    let item = (desc.dtype_bits as u64 / 8) * desc.dtype_lanes as u64;
    if shape.contains(&0) {
        return Ok(0);
    }
    let mut last = 0u64;
    for (&size, &stride) in shape.iter().zip(strides) {
        let step = (size as u64 - 1).checked_mul(stride as u64).ok_or_else(overflow)?;
        last = last.checked_add(step).ok_or_else(overflow)?;
    }
    last.checked_add(1).and_then(|n| n.checked_mul(item)).ok_or_else(overflow)
}

/// Row-major strides in elements for `shape`, checked for overflow.
fn row_major(shape: &[i64]) -> Outcome<Vec<i64>> {
    let mut strides = vec![0i64; shape.len()];
    let mut step = 1i64;
    for (i, &size) in shape.iter().enumerate().rev() {
        strides[i] = step;
        step = step.checked_mul(size.max(1)).ok_or_else(|| Failure::argument(format!("`shape` {shape:?} has more elements than 2^63")))?;
    }
    Ok(strides)
}

/// Exports the buffer as a DLPack tensor described by `desc` and writes a
/// pointer to the `DLManagedTensorVersioned` (when `desc.versioned` is 1) or
/// `DLManagedTensor` to `managed`. The tensor holds a reference to the
/// buffer until its deleter is called; the consumer must call it exactly
/// once. The tensor must lie inside the buffer.
///
/// # Safety
///
/// `desc` is null (an error) or valid, with `shape` and `strides` null or
/// holding `ndim` values; `managed` is null (an error) or writable.
#[no_mangle]
pub unsafe extern "C" fn meshmem_buffer_dlpack(
    buffer: meshmem_buffer,
    desc: *const meshmem_tensor_desc,
    managed: *mut *mut c_void,
) -> crate::meshmem_status {
    call("meshmem_buffer_dlpack", || {
        let found = BUFFERS.get(buffer.id)?;
        // SAFETY: the caller promises null or writable.
        let managed = unsafe { out(managed, "managed") }?;
        // SAFETY: the caller promises null or valid.
        let desc = unsafe { desc.as_ref() }.ok_or_else(|| Failure::argument("`desc` is null; describe the tensor"))?;

        // 1. The type.
        let code_ok = matches!(desc.dtype_code, MESHMEM_DL_INT | MESHMEM_DL_UINT | MESHMEM_DL_FLOAT | MESHMEM_DL_BFLOAT | MESHMEM_DL_COMPLEX | MESHMEM_DL_BOOL);
        if !code_ok {
            return Err(Failure::argument(format!("`desc.dtype_code` {} is not a DLPack type code; use 0 (int), 1 (uint), 2 (float), 4 (bfloat), 5 (complex) or 6 (bool)", desc.dtype_code)));
        }
        if desc.dtype_bits == 0 || desc.dtype_bits % 8 != 0 {
            return Err(Failure::argument(format!("`desc.dtype_bits` {} is not a whole number of bytes", desc.dtype_bits)));
        }
        if desc.dtype_lanes == 0 {
            return Err(Failure::argument("`desc.dtype_lanes` is 0; use at least 1"));
        }
        if desc.versioned > 1 || desc.read_only > 1 {
            return Err(Failure::argument(format!("`desc.versioned` {} and `desc.read_only` {} must each be 0 or 1", desc.versioned, desc.read_only)));
        }

        // 2. The shape and strides.
        if desc.ndim > MESHMEM_DL_MAX_DIMS {
            return Err(Failure::argument(format!("`desc.ndim` {} is above the limit of {MESHMEM_DL_MAX_DIMS}", desc.ndim)));
        }
        let ndim = desc.ndim as usize;
        if ndim > 0 && desc.shape.is_null() {
            return Err(Failure::argument(format!("`desc.shape` is null but `desc.ndim` is {ndim}")));
        }
        let shape: Vec<i64> = if ndim == 0 {
            Vec::new()
        } else {
            // SAFETY: non-null, and the caller promises `ndim` values.
            unsafe { std::slice::from_raw_parts(desc.shape, ndim) }.to_vec()
        };
        if let Some(bad) = shape.iter().find(|&&s| s < 0) {
            return Err(Failure::argument(format!("`desc.shape` {shape:?} has the negative size {bad}")));
        }
        let strides: Vec<i64> = if desc.strides.is_null() || ndim == 0 {
            row_major(&shape)?
        } else {
            // SAFETY: non-null, and the caller promises `ndim` values.
            unsafe { std::slice::from_raw_parts(desc.strides, ndim) }.to_vec()
        };
        if let Some(bad) = strides.iter().find(|&&s| s < 0) {
            return Err(Failure::argument(format!("`desc.strides` {strides:?} has the negative stride {bad}; only non-negative strides are supported")));
        }

        // 3. The tensor lies inside the buffer.
        let end = span(desc, &shape, &strides)?
            .checked_add(desc.byte_offset)
            .ok_or_else(|| Failure::argument(format!("`desc.byte_offset` {} plus the tensor's span overflows", desc.byte_offset)))?;
        if end > found.len as u64 {
            return Err(Failure::argument(format!(
                "the tensor ends {end} bytes into a buffer of {} bytes; shrink `desc.shape`, `desc.strides` or `desc.byte_offset`",
                found.len
            )));
        }
        let item = desc.dtype_bits as u64 / 8 * desc.dtype_lanes as u64;
        let align = if item.is_power_of_two() { item.min(16) } else { 1 };
        if (found.addr.0 + desc.byte_offset) % align != 0 {
            return Err(Failure::argument(format!("`desc.byte_offset` {} puts the first element off its {align}-byte alignment", desc.byte_offset)));
        }

        // 4. Build the export; the vectors' buffers do not move when the box
        // is built, so the pointers taken from them stay valid.
        let tensor = |shape: &mut Vec<i64>, strides: &mut Vec<i64>| DLTensor {
            data: found.addr.as_ptr(),
            device: DLDevice { device_type: DL_CPU, device_id: 0 },
            ndim: ndim as i32,
            dtype: DLDataType { code: desc.dtype_code, bits: desc.dtype_bits, lanes: desc.dtype_lanes },
            shape: shape.as_mut_ptr(),
            strides: strides.as_mut_ptr(),
            byte_offset: desc.byte_offset,
        };
        let (mut shape, mut strides) = (shape, strides);
        let pointer: *mut c_void = if desc.versioned == 1 {
            let dl_tensor = tensor(&mut shape, &mut strides);
            let flags = if desc.read_only == 1 { DL_READ_ONLY } else { 0 };
            let managed = DLManagedTensorVersioned {
                version: DLPackVersion { major: 1, minor: 0 },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned),
                flags,
                dl_tensor,
            };
            let raw = Box::into_raw(Box::new(Export { managed, shape, strides, _buffer: found }));
            // SAFETY: `raw` is the box just made; the context points at itself.
            unsafe { (*raw).managed.manager_ctx = raw.cast() };
            raw.cast()
        } else {
            let dl_tensor = tensor(&mut shape, &mut strides);
            let managed = DLManagedTensor { dl_tensor, manager_ctx: std::ptr::null_mut(), deleter: Some(delete_legacy) };
            let raw = Box::into_raw(Box::new(Export { managed, shape, strides, _buffer: found }));
            // SAFETY: as above.
            unsafe { (*raw).managed.manager_ctx = raw.cast() };
            raw.cast()
        };
        *managed = pointer;
        Ok(())
    })
}

/// Calls the deleter of a tensor that `meshmem_buffer_dlpack` returned and
/// no consumer took (such as a DLPack capsule dropped unconsumed). NULL is
/// accepted and does nothing.
///
/// # Safety
///
/// `managed` is null or a pointer from `meshmem_buffer_dlpack` with the same
/// `versioned` value, whose deleter has not been called.
#[no_mangle]
pub unsafe extern "C" fn meshmem_dlpack_delete(managed: *mut c_void, versioned: u32) -> crate::meshmem_status {
    call("meshmem_dlpack_delete", || {
        match versioned {
            // SAFETY: the caller promises a live export of this kind.
            0 => unsafe { delete::<DLManagedTensor>(managed.cast()) },
            // SAFETY: as above.
            1 => unsafe { delete::<DLManagedTensorVersioned>(managed.cast()) },
            other => return Err(Failure::argument(format!("`versioned` {other} must be 0 or 1"))),
        }
        Ok(())
    })
}
