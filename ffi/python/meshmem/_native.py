"""Loading libmeshmem and declaring its functions for ctypes.

The library is found, in order, at:

1. ``$MESHMEM_LIB`` (a path to ``libmeshmem.so``);
2. ``libmeshmem.so`` beside this file (a wheel that bundles it);
3. ``target/release`` or ``target/debug`` of the repository this package
   sits in, the newer of the two (``pip install -e ./ffi/python`` or
   ``PYTHONPATH=ffi/python``);
4. the system's library path (``ctypes.util.find_library``).

It is loaded with ``RTLD_GLOBAL``, so a C++ extension linked against the same
file shares its handles with Python.
"""

import ctypes
import ctypes.util
import os
from pathlib import Path

c_status = ctypes.c_int32


class meshmem_pool(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64)]


class meshmem_buffer(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64)]


class meshmem_coord(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint32), ("z", ctypes.c_uint32)]


class meshmem_mesh_shape(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint32), ("y", ctypes.c_uint32), ("z", ctypes.c_uint32), ("torus", ctypes.c_uint32)]


class meshmem_placement(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("node", ctypes.c_uint32),
        ("coord", meshmem_coord),
        ("nodes", ctypes.POINTER(ctypes.c_uint32)),
        ("node_count", ctypes.c_size_t),
        ("pages_per_stripe", ctypes.c_size_t),
    ]


class meshmem_advice(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("node", ctypes.c_uint32)]


class meshmem_options(ctypes.Structure):
    _fields_ = [
        ("rank", ctypes.c_int32),
        ("size", ctypes.c_int32),
        ("mesh", ctypes.c_char_p),
        ("group", ctypes.c_char_p),
        ("page_size", ctypes.c_uint64),
        ("node_capacity", ctypes.c_uint64),
        ("window_size", ctypes.c_uint64),
        ("join_timeout_ms", ctypes.c_uint64),
    ]


class meshmem_node_stats(ctypes.Structure):
    _fields_ = [
        ("node", ctypes.c_uint32),
        ("coord", meshmem_coord),
        ("capacity_bytes", ctypes.c_uint64),
        ("used_bytes", ctypes.c_uint64),
        ("frames_total", ctypes.c_uint64),
        ("frames_used", ctypes.c_uint64),
        ("bytes_local", ctypes.c_uint64),
        ("bytes_remote", ctypes.c_uint64),
        ("hop_bytes", ctypes.c_uint64),
        ("leaked_pages", ctypes.c_uint64),
        ("replica_bytes", ctypes.c_uint64),
    ]


class meshmem_tensor_desc(ctypes.Structure):
    _fields_ = [
        ("ndim", ctypes.c_uint32),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("dtype_code", ctypes.c_uint8),
        ("dtype_bits", ctypes.c_uint8),
        ("dtype_lanes", ctypes.c_uint16),
        ("byte_offset", ctypes.c_uint64),
        ("versioned", ctypes.c_uint32),
        ("read_only", ctypes.c_uint32),
    ]


allgather_fn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)

P = ctypes.POINTER
u32, u64, size_t, vp = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
pool_t, buf_t = meshmem_pool, meshmem_buffer

# name: argument types; every function returns a meshmem_status.
SIGNATURES = {
    "meshmem_options_init": [P(meshmem_options)],
    "meshmem_join_env": [P(pool_t)],
    "meshmem_join": [P(meshmem_options), P(pool_t)],
    "meshmem_join_with_allgather": [P(meshmem_options), allgather_fn, vp, P(pool_t)],
    "meshmem_leave": [pool_t],
    "meshmem_node": [pool_t, P(u32)],
    "meshmem_size": [pool_t, P(u32)],
    "meshmem_mesh": [pool_t, P(meshmem_mesh_shape)],
    "meshmem_coord_of": [pool_t, u32, P(meshmem_coord)],
    "meshmem_hops": [pool_t, u32, u32, P(u32)],
    "meshmem_page_size": [pool_t, P(u64)],
    "meshmem_alloc": [pool_t, size_t, size_t, P(meshmem_placement), meshmem_advice, P(u64)],
    "meshmem_free": [pool_t, u64],
    "meshmem_read": [pool_t, u64, vp, size_t],
    "meshmem_write": [pool_t, u64, vp, size_t],
    "meshmem_fetch_add_u64": [pool_t, u64, u64, P(u64)],
    "meshmem_compare_exchange_u64": [pool_t, u64, u64, u64, P(u64)],
    "meshmem_quiet": [pool_t],
    "meshmem_barrier": [pool_t],
    "meshmem_all_gather": [pool_t, vp, size_t, vp, size_t],
    "meshmem_local_ptr": [pool_t, u64, size_t, P(vp)],
    "meshmem_home_of": [pool_t, u64, P(u32)],
    "meshmem_stats": [pool_t, P(meshmem_node_stats), size_t, P(size_t)],
    "meshmem_buffer_alloc": [pool_t, size_t, size_t, P(meshmem_placement), meshmem_advice, P(buf_t)],
    "meshmem_buffer_view": [pool_t, u64, size_t, P(buf_t)],
    "meshmem_buffer_info": [buf_t, P(u64), P(size_t)],
    "meshmem_buffer_release": [buf_t],
    "meshmem_buffer_dlpack": [buf_t, P(meshmem_tensor_desc), P(vp)],
    "meshmem_dlpack_delete": [vp, u32],
}


def library_path():
    """Returns the path of libmeshmem.so that ``load`` uses, or None."""
    explicit = os.environ.get("MESHMEM_LIB")
    if explicit:
        return explicit
    here = Path(__file__).resolve().parent
    bundled = here / "libmeshmem.so"
    if bundled.exists():
        return str(bundled)
    for root in here.parents:
        built = [root / "target" / kind / "libmeshmem.so" for kind in ("release", "debug")]
        built = [path for path in built if path.exists()]
        if built:
            return str(max(built, key=lambda path: path.stat().st_mtime))
    return ctypes.util.find_library("meshmem")


def load():
    path = library_path()
    if path is None:
        raise OSError(
            "libmeshmem.so not found; build it with `cargo build -p meshmem-ffi` "
            "and set MESHMEM_LIB to target/debug/libmeshmem.so"
        )
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise OSError(f"cannot load libmeshmem from {path} ({e}); set MESHMEM_LIB to a built libmeshmem.so") from e
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = c_status
    for name in ("meshmem_last_error_message", "meshmem_version"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = []
    lib.meshmem_status_name.restype = ctypes.c_char_p
    lib.meshmem_status_name.argtypes = [ctypes.c_int32]
    lib.path = path
    return lib


lib = load()
