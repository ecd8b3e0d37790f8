//! Drives the C ABI's argument checks with arbitrary handles, addresses,
//! lengths, placements, advice and tensor descriptions. Every call must
//! return a status; a crash or a panic that escapes is a bug.
//!
//! Pointers passed are either null or real buffers at least as long as the
//! length passed with them, because that is the callers' side of each
//! function's `# Safety` contract. Everything else is arbitrary.
//!
//! Run with `cargo fuzz run c_abi_arguments` from the repository root.
#![no_main]

use std::ffi::c_void;
use std::sync::OnceLock;

// The C ABI crate builds only a cdylib and a staticlib, so its sources are
// compiled into this target as a module. The glob re-export lets their
// `crate::` paths resolve here as they do in the library.
#[path = "../../ffi/src/lib.rs"]
#[allow(dead_code)]
mod ffi;
#[allow(unused_imports)]
pub use ffi::*;

use ffi::buffer::*;
use ffi::join::*;
use ffi::ops::*;

use libfuzzer_sys::fuzz_target;

/// Reads values off the fuzzer's bytes, zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u64(&mut self) -> u64 {
        let take = self.0.len().min(8);
        let mut bytes = [0u8; 8];
        bytes[..take].copy_from_slice(&self.0[..take]);
        self.0 = &self.0[take..];
        u64::from_le_bytes(bytes)
    }

    fn u32(&mut self) -> u32 {
        self.u64() as u32
    }
}

/// One small pool for the whole run, with one live allocation to aim at.
fn pool() -> (meshmem_pool, u64) {
    static POOL: OnceLock<(meshmem_pool, u64)> = OnceLock::new();
    *POOL.get_or_init(|| {
        let mut options = std::mem::MaybeUninit::uninit();
        let mut pool = meshmem_pool::default();
        let mut addr = 0;
        // SAFETY: every pointer is to a local of the right type.
        unsafe {
            meshmem_options_init(options.as_mut_ptr());
            let mut options = options.assume_init();
            options.rank = 0;
            options.size = 1;
            options.page_size = 65536;
            options.node_capacity = 16 << 20;
            assert_eq!(meshmem_join(&options, &mut pool), meshmem_status::MESHMEM_OK);
            meshmem_alloc(pool, 4096, 8, std::ptr::null(), meshmem_advice::default(), &mut addr);
        }
        (pool, addr)
    })
}

fuzz_target!(|data: &[u8]| {
    let (live, target) = pool();
    let mut input = Input(data);
    let mut scratch = vec![0u8; 4096];
    while !input.0.is_empty() {
        let op = input.u32() % 8;
        // Either the live pool or an arbitrary handle value.
        let handle = if input.u32() % 2 == 0 { live } else { meshmem_pool { id: input.u64() } };
        // Either near the live allocation or anywhere.
        let addr = if input.u32() % 2 == 0 { target.wrapping_add(input.u64() % 8192) } else { input.u64() };
        let len = input.u64() as usize;
        let (buf, len) = if input.u32() % 2 == 0 {
            (std::ptr::null_mut(), len)
        } else {
            (scratch.as_mut_ptr().cast::<c_void>(), len % (scratch.len() + 1))
        };
        let mut out = 0u64;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `buf` is null or holds at least `len` bytes, and every
        // out-pointer is a local of the right type.
        unsafe {
            match op {
                0 => drop(meshmem_read(handle, addr, buf, len)),
                1 => drop(meshmem_write(handle, addr, buf, len)),
                2 => drop(meshmem_fetch_add_u64(handle, addr, input.u64(), &mut out)),
                3 => drop(meshmem_compare_exchange_u64(handle, addr, input.u64(), input.u64(), &mut out)),
                4 => drop(meshmem_local_ptr(handle, addr, len, &mut ptr)),
                5 => {
                    let nodes = [input.u32(), input.u32()];
                    let placement = meshmem_placement {
                        kind: input.u32() % 7,
                        node: input.u32() % 4,
                        coord: meshmem_coord { x: input.u32() % 3, y: input.u32() % 3, z: input.u32() % 3 },
                        nodes: if input.u32() % 2 == 0 { std::ptr::null() } else { nodes.as_ptr() },
                        node_count: input.u64() as usize % 3,
                        pages_per_stripe: input.u64() as usize % 3,
                    };
                    let advice = meshmem_advice { kind: input.u32() % 7, node: input.u32() % 4 };
                    let size = input.u64() as usize % (1 << 20);
                    let align = 1usize << (input.u32() % 16);
                    if meshmem_alloc(handle, size, align, &placement, advice, &mut out) == meshmem_status::MESHMEM_OK {
                        meshmem_free(handle, out);
                    }
                }
                6 => {
                    let mut buffer = meshmem_buffer::default();
                    if meshmem_buffer_view(handle, addr, len, &mut buffer) == meshmem_status::MESHMEM_OK {
                        let shape = [input.u64() as i64, input.u64() as i64];
                        let strides = [input.u64() as i64, input.u64() as i64];
                        let desc = meshmem_tensor_desc {
                            ndim: input.u32() % 4 % 3,
                            shape: shape.as_ptr(),
                            strides: if input.u32() % 2 == 0 { std::ptr::null() } else { strides.as_ptr() },
                            dtype_code: input.u32() as u8,
                            dtype_bits: input.u32() as u8,
                            dtype_lanes: input.u32() as u16,
                            byte_offset: input.u64(),
                            versioned: input.u32() % 3,
                            read_only: input.u32() % 3,
                        };
                        let mut managed = std::ptr::null_mut();
                        if meshmem_buffer_dlpack(buffer, &desc, &mut managed) == meshmem_status::MESHMEM_OK {
                            meshmem_dlpack_delete(managed, desc.versioned);
                        }
                        meshmem_buffer_release(buffer);
                    }
                }
                _ => drop(meshmem_free(handle, addr)),
            }
        }
    }
});
