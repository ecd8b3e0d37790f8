//! The C ABI of meshmem: `libmeshmem.so`, `libmeshmem.a` and `meshmem.h`.
//!
//! Conventions, the same for every function:
//!
//! - Every function returns a [`meshmem_status`]; `MESHMEM_OK` is zero.
//!   Results go through out-pointers, which are written only on success, so
//!   a failed call changes nothing the caller can see.
//! - After a failure, [`meshmem_last_error_message`] returns the calling
//!   thread's message. It names the argument or value that was wrong and
//!   tells what to do.
//! - No panic crosses the boundary: every body runs under `catch_unwind`, and
//!   a panic becomes `MESHMEM_ERR_INTERNAL` with the panic's message.
//! - Pools and buffers are opaque handles: a slot index and a generation in a
//!   registry, never a pointer. A handle that was never issued, or whose pool
//!   left or whose buffer was released, is detected and refused with
//!   `MESHMEM_ERR_INVALID_HANDLE`; nothing is dereferenced. The zero handle is
//!   "no pool" or "no buffer", so a call before `meshmem_join` fails cleanly.
//! - Global addresses are `uint64_t`. On the shared-memory backend they are
//!   pointers valid in every process of the group once their pages are
//!   mapped (`meshmem_local_ptr` maps them).
//!
//! Module map: [`registry`] holds handles, [`join`] creates and ends pools,
//! [`ops`] covers queries, allocation, data movement and statistics,
//! [`buffer`] covers reference-counted buffers and their DLPack export.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use meshmem_core::Error;

pub mod buffer;
pub mod join;
pub mod ops;
pub mod registry;

/// Outcome of every call. Zero is success; every other value has a message
/// from [`meshmem_last_error_message`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum meshmem_status {
    MESHMEM_OK = 0,
    /// An argument is null, out of range, unknown or overflows; the message
    /// names it.
    MESHMEM_ERR_INVALID_ARGUMENT = 1,
    /// A pool or buffer handle is zero, was never issued, or its pool left or
    /// its buffer was released.
    MESHMEM_ERR_INVALID_HANDLE = 2,
    /// A configuration value (from the options or the environment) is wrong.
    MESHMEM_ERR_CONFIG = 3,
    /// Joining the group failed: a node disagreed, timed out, or the window
    /// could not be reserved.
    MESHMEM_ERR_JOIN = 4,
    /// The placement cannot be met, or the arena has no address space left.
    MESHMEM_ERR_OUT_OF_MEMORY = 5,
    /// An address is outside the window or not inside an allocation, or a
    /// free was repeated or does not start an allocation.
    MESHMEM_ERR_INVALID_ADDRESS = 6,
    /// A 64-bit atomic was given an address that is not 8-byte aligned.
    MESHMEM_ERR_UNALIGNED = 7,
    /// A collective failed: a node left or died, or nodes called different
    /// collectives.
    MESHMEM_ERR_COLLECTIVE = 8,
    /// The transport or the operating system failed.
    MESHMEM_ERR_SYSTEM = 9,
    /// An output array is too small; the needed count was written.
    MESHMEM_ERR_BUFFER_TOO_SMALL = 10,
    /// The caller's all-gather callback returned non-zero or returned
    /// descriptors that do not fit together.
    MESHMEM_ERR_CALLBACK = 11,
    /// A bug in meshmem (a caught panic); the message says where.
    MESHMEM_ERR_INTERNAL = 12,
}

use meshmem_status::*;

/// A failed call: its status and the message kept for the calling thread.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: meshmem_status,
    pub message: String,
}

pub(crate) type Outcome<T = ()> = Result<T, Failure>;

impl Failure {
    pub fn new(status: meshmem_status, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }

    pub fn argument(message: impl Into<String>) -> Failure {
        Failure::new(MESHMEM_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        let status = match &error {
            Error::InvalidMesh { .. }
            | Error::NodeOutOfRange { .. }
            | Error::CoordOutOfRange { .. }
            | Error::InvalidLayout { .. } => MESHMEM_ERR_INVALID_ARGUMENT,
            Error::InvalidConfig { .. } | Error::MeshSizeMismatch { .. } => MESHMEM_ERR_CONFIG,
            Error::ConfigMismatch { .. } | Error::WindowUnavailable { .. } | Error::Join { .. } => MESHMEM_ERR_JOIN,
            Error::OutOfMemory { .. } | Error::OutOfAddressSpace { .. } => MESHMEM_ERR_OUT_OF_MEMORY,
            Error::DoubleFree { .. }
            | Error::InvalidFree { .. }
            | Error::InvalidAddress { .. }
            | Error::OutOfBounds { .. } => MESHMEM_ERR_INVALID_ADDRESS,
            Error::Unaligned { .. } | Error::UnalignedOffset { .. } => MESHMEM_ERR_UNALIGNED,
            Error::Collective { .. } => MESHMEM_ERR_COLLECTIVE,
            _ => MESHMEM_ERR_SYSTEM,
        };
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Failure { status, message }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs cannot appear in a C string; they become spaces.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

/// Runs a call's body: catches panics, records the message of a failure for
/// this thread, and returns the status.
pub(crate) fn call(function: &str, body: impl FnOnce() -> Outcome) -> meshmem_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => MESHMEM_OK,
        Ok(Err(failure)) => {
            set_last_error(&format!("{function}: {}", failure.message));
            failure.status
        }
        Err(panic) => failed_by_panic(function, panic),
    }
}

#[cold]
fn failed_by_panic(function: &str, panic: Box<dyn std::any::Any + Send>) -> meshmem_status {
    let reason = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    set_last_error(&format!("{function}: internal error, please report it: {reason}"));
    MESHMEM_ERR_INTERNAL
}

/// Checks an out-pointer and returns it as a reference.
///
/// # Safety
///
/// `ptr` is null or valid for writes of a `T`.
pub(crate) unsafe fn out<'a, T>(ptr: *mut T, name: &str) -> Outcome<&'a mut T> {
    // SAFETY: the caller promises that a non-null `ptr` is valid for writes.
    unsafe { ptr.as_mut() }
        .ok_or_else(|| Failure::argument(format!("`{name}` is null; pass a pointer to where the result goes")))
}

/// The message of the last failed call on the calling thread, or an empty
/// string when none failed yet. Never null.
///
/// # Safety
///
/// The pointer is valid until the next call into meshmem on the same thread;
/// copy the text to keep it.
#[no_mangle]
pub extern "C" fn meshmem_last_error_message() -> *const c_char {
    catch_unwind(|| LAST_ERROR.with(|last| last.borrow().as_ptr()))
        .unwrap_or(c"meshmem_last_error_message: internal error".as_ptr())
}

/// A static, human-readable name of `status` (such as "MESHMEM_ERR_UNALIGNED"),
/// or "unknown status" for a value that is not a status. Never null.
///
/// # Safety
///
/// None; any value is accepted, and the pointer is valid for the whole run.
#[no_mangle]
pub extern "C" fn meshmem_status_name(status: i32) -> *const c_char {
    let name = match status {
        0 => c"MESHMEM_OK",
        1 => c"MESHMEM_ERR_INVALID_ARGUMENT",
        2 => c"MESHMEM_ERR_INVALID_HANDLE",
        3 => c"MESHMEM_ERR_CONFIG",
        4 => c"MESHMEM_ERR_JOIN",
        5 => c"MESHMEM_ERR_OUT_OF_MEMORY",
        6 => c"MESHMEM_ERR_INVALID_ADDRESS",
        7 => c"MESHMEM_ERR_UNALIGNED",
        8 => c"MESHMEM_ERR_COLLECTIVE",
        9 => c"MESHMEM_ERR_SYSTEM",
        10 => c"MESHMEM_ERR_BUFFER_TOO_SMALL",
        11 => c"MESHMEM_ERR_CALLBACK",
        12 => c"MESHMEM_ERR_INTERNAL",
        _ => c"unknown status",
    };
    name.as_ptr()
}

/// The version of this library as "major.minor.patch". Never null.
///
/// # Safety
///
/// None; the pointer is valid for the whole run.
#[no_mangle]
pub extern "C" fn meshmem_version() -> *const c_char {
    const VERSION: &std::ffi::CStr =
        match std::ffi::CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(version) => version,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}
