"""One node in this process: the Python API, DLPack export, and bad input,
which must raise with the library's message and change nothing."""

import ctypes
import gc

import pytest

import meshmem
from meshmem import _native
from meshmem._native import lib

numpy = pytest.importorskip("numpy", reason="numpy is not installed; ffi/python/setup-venv.sh installs it")


@pytest.fixture(scope="module")
def pool():
    pool = meshmem.Pool(page_size=65536, node_capacity=64 << 20)
    yield pool
    pool.leave()


def used(pool):
    return pool.stats()[0].frames_used


def test_queries(pool):
    assert (pool.node, pool.size, pool.mesh, pool.page_size) == (0, 1, (1, 1, 1, False), 65536)
    assert pool.coord() == (0, 0, 0)
    assert pool.hops(0, 0) == 0
    stats = pool.stats()[0]
    assert stats.replica_bytes == 0
    assert stats.capacity_bytes == 64 << 20
    assert pool.all_gather(b"abc") == [b"abc"]


def test_read_write_atomics(pool):
    # Advice applies to whole pages, so an advised allocation takes one.
    with pytest.raises(meshmem.InvalidArgument, match="whole pages"):
        pool.alloc(64, placement=meshmem.Node(0), advice=meshmem.Advice.READ_MOSTLY)
    addr = pool.alloc(pool.page_size, placement=meshmem.Node(0), advice=meshmem.Advice.READ_MOSTLY)
    pool.write(addr, b"\x01" + bytes(7))
    assert pool.fetch_add(addr, 4) == 1
    assert pool.compare_exchange(addr, 9, 7) == 5  # no swap
    assert pool.compare_exchange(addr, 5, 7) == 5
    assert pool.read(addr, 8) == (7).to_bytes(8, "little")
    assert pool.home_of(addr) == 0
    assert pool.local_ptr(addr, 8) == addr
    pool.quiet()
    pool.free(addr)


def test_capsules_follow_the_consumers_max_version(pool):
    buf = pool.buffer((3, 4), "int32")
    legacy = buf.__dlpack__()
    versioned = buf.__dlpack__(max_version=(1, 0))
    is_capsule = ctypes.pythonapi.PyCapsule_IsValid
    is_capsule.argtypes, is_capsule.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_int
    assert is_capsule(legacy, b"dltensor") and is_capsule(versioned, b"dltensor_versioned")
    assert buf.__dlpack_device__() == (1, 0)
    with pytest.raises(BufferError, match="copy"):
        buf.__dlpack__(copy=True)
    del legacy, versioned  # unconsumed capsules drop their references
    buf.release()


def test_numpy_views_without_copy_and_keeps_memory_alive(pool):
    before = used(pool)
    buf = pool.buffer((65536 // 8,), numpy.float64)
    array = numpy.from_dlpack(buf)
    assert array.ctypes.data == buf.addr and array.shape == (8192,) and array.dtype == numpy.float64
    array[:] = 2.5
    assert used(pool) == before + 1
    buf.release()
    assert used(pool) == before + 1 and array.sum() == 2.5 * 8192
    del array
    gc.collect()
    assert used(pool) == before


def test_torch_tensor_returns_memory_when_dropped(pool):
    torch = pytest.importorskip("torch", reason="torch is not installed; ffi/python/setup-venv.sh installs it")
    before = used(pool)
    t = pool.tensor((4, 16384), torch.float32)
    assert t.data_ptr() == pool.local_ptr(t.data_ptr(), 1) and t.shape == (4, 16384)
    t.fill_(1)
    view = pool.tensor_at(t.data_ptr(), (16384,), torch.float32)
    assert view.sum().item() == 16384
    assert used(pool) == before + 4
    del t, view
    gc.collect()
    assert used(pool) == before


# ---------------------------------------------------------------- bad input


def fails(kind, words, call, *args, **kwargs):
    with pytest.raises(kind) as raised:
        call(*args, **kwargs)
    for word in words:
        assert word in str(raised.value), str(raised.value)
    return raised.value


def test_calls_before_join_and_null_handles():
    not_joined = meshmem.Pool.attach(0)
    fails(meshmem.InvalidHandle, ["null", "meshmem_join"], lambda: not_joined.size)
    fails(meshmem.InvalidHandle, ["never issued"], meshmem.Pool.attach(0x7700000099).barrier)


def test_null_buffers_and_overflowing_lengths(pool):
    addr = pool.alloc(16)
    before = pool.read(addr, 16)
    fails(meshmem.InvalidArgument, ["`dst` is null"], lambda: meshmem._check(lib.meshmem_read(pool._handle, addr, None, 8)))
    fails(meshmem.InvalidArgument, ["`src` is null"], lambda: meshmem._check(lib.meshmem_write(pool._handle, addr, None, 8)))
    fails(meshmem.InvalidArgument, ["`len`"], lambda: meshmem._check(lib.meshmem_read(pool._handle, addr, b"x", 2**64 - 1)))
    fails(meshmem.InvalidArgument, ["overflows"], pool.write, 2**64 - 4, b"12345678")
    fails(meshmem.InvalidArgument, ["`node` is null"], lambda: meshmem._check(lib.meshmem_node(pool._handle, None)))
    fails(meshmem.InvalidArgument, ["`size`"], pool.alloc, 2**64 - 8)
    fails(meshmem.InvalidArgument, ["`align` 3"], pool.alloc, 8, align=3)
    assert pool.read(addr, 16) == before
    pool.free(addr)


def test_unaligned_atomics(pool):
    addr = pool.alloc(16)
    pool.write(addr, bytes(16))
    fails(meshmem.Unaligned, ["not aligned to 8"], pool.fetch_add, addr + 4, 1)
    fails(meshmem.Unaligned, ["not aligned to 8"], pool.compare_exchange, addr + 1, 0, 1)
    assert pool.read(addr, 16) == bytes(16)
    pool.free(addr)


def test_unknown_placement_and_advice(pool):
    before = used(pool)
    fails(meshmem.InvalidArgument, ["`placement.kind` 42"], pool.alloc, 64, placement=meshmem.Placement(42))
    fails(meshmem.InvalidArgument, ["`advice.kind` 17"], pool.alloc, 64, advice=meshmem.Advice(17))
    fails(meshmem.InvalidArgument, ["node 5", "outside the mesh"], pool.alloc, 64, placement=meshmem.Node(5))
    fails(meshmem.InvalidArgument, ["node 9"], pool.buffer, (8,), advice=meshmem.Advice.preferred_location(9))
    fails(TypeError, ["placement"], pool.alloc, 64, placement="node 0")
    assert used(pool) == before


def test_dtype_or_shape_that_overflows(pool):
    fails(meshmem.InvalidArgument, ["shape", "2^63"], pool.buffer, (2**40, 2**40), "float64")
    fails(meshmem.InvalidArgument, ["dtype", "float8"], pool.buffer, (4,), "float8")
    fails(meshmem.InvalidArgument, ["shape", "-3"], pool.buffer, (4, -3))
    buf = pool.buffer((4,), "float32")
    shape = (ctypes.c_int64 * 2)(2**62, 2**62)
    desc = _native.meshmem_tensor_desc(2, shape, None, 2, 32, 1, 0, 1, 0)
    managed = ctypes.c_void_p()
    export = lambda: meshmem._check(lib.meshmem_buffer_dlpack(buf._handle, ctypes.byref(desc), ctypes.byref(managed)))
    fails(meshmem.InvalidArgument, ["`shape`", "2^63"], export)
    shape[0], shape[1] = 5, 1
    fails(meshmem.InvalidArgument, ["ends 20 bytes into a buffer of 16"], export)
    assert managed.value is None
    buf.release()


def test_handle_used_after_leave():
    pool = meshmem.Pool(page_size=65536, node_capacity=16 << 20)
    buf = pool.buffer((16,), "uint8")
    array = numpy.from_dlpack(buf)
    pool.leave()
    fails(meshmem.InvalidHandle, ["stale", "left"], lambda: pool.size)
    fails(meshmem.InvalidHandle, ["stale"], pool.alloc, 8)
    fails(meshmem.InvalidHandle, ["stale"], pool.leave)
    array[:] = 7  # the buffer keeps the memory mapped after the pool left
    assert array.sum() == 7 * 16
    buf.release()


def test_buffer_used_after_free(pool):
    buf = pool.buffer((16384,), "float32")
    addr = buf.addr
    buf.release()
    fails(meshmem.InvalidHandle, ["released"], buf.__dlpack__)
    fails(meshmem.InvalidHandle, ["released"], buf.release)
    fails(meshmem.InvalidAddress, ["not allocated"], pool.read, addr, 4)
    fails(meshmem.InvalidAddress, ["not allocated"], pool.view, addr, (4,), "float32")
    fails(meshmem.InvalidAddress, ["0x"], pool.free, addr)
