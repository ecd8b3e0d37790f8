"""meshmem for Python: a global address space over a 3D mesh of node
processes, through the C library libmeshmem (ctypes).

    import meshmem, torch
    pool = meshmem.Pool.from_env()                 # under `meshmem run`
    t = pool.tensor((1024,), torch.float32, placement=meshmem.Node(1))
    t.fill_(pool.node)                             # pool memory, homed on node 1

Every failure raises a ``MeshmemError`` (or a subclass) carrying the
library's message, which names the argument or value that was wrong.

Buffers implement DLPack (``__dlpack__``, ``__dlpack_device__``), so
``numpy.from_dlpack(buf)`` and ``torch.from_dlpack(buf)`` view pool memory
without copying; the array's data pointer is the global address. The
allocation stays alive until every consumer drops its array or tensor.
"""

import ctypes
import math
from collections import namedtuple

from . import _native
from ._native import lib

__all__ = [
    "Pool", "Buffer", "MeshmemError", "InvalidArgument", "InvalidHandle", "OutOfMemory",
    "InvalidAddress", "Unaligned", "Placement", "Local", "Node", "Nearest", "Interleave",
    "Balanced", "Advice", "NodeStats", "library_path", "torch_allgather",
]

library_path = _native.library_path

# ---------------------------------------------------------------- errors


class MeshmemError(Exception):
    """A call into libmeshmem failed; ``status`` is its meshmem_status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.status_name = lib.meshmem_status_name(status).decode()


class InvalidArgument(MeshmemError, ValueError):
    pass


class InvalidHandle(MeshmemError):
    pass


class OutOfMemory(MeshmemError, MemoryError):
    pass


class InvalidAddress(MeshmemError):
    pass


class Unaligned(MeshmemError, ValueError):
    pass


_ERRORS = {1: InvalidArgument, 2: InvalidHandle, 5: OutOfMemory, 6: InvalidAddress, 7: Unaligned}


def _check(status):
    if status != 0:
        message = lib.meshmem_last_error_message().decode(errors="replace")
        raise _ERRORS.get(status, MeshmemError)(status, message)


def _argument(message):
    return InvalidArgument(1, message)

# ------------------------------------------------------- placement, advice


class Placement:
    """Where new pages live; ``kind`` is a MESHMEM_PLACE_* value. Use the
    helpers ``Local()``, ``Node(n)``, ``Nearest(x, y, z)``,
    ``Interleave(nodes, pages_per_stripe)`` and ``Balanced()``."""

    LOCAL, NODE, NEAREST, INTERLEAVE, BALANCED = range(5)

    def __init__(self, kind, node=0, coord=(0, 0, 0), nodes=None, pages_per_stripe=1):
        self.kind, self.node, self.coord = kind, node, tuple(coord)
        self.nodes, self.pages_per_stripe = nodes, pages_per_stripe

    def _c(self):
        c = _native.meshmem_placement()
        c.kind, c.node = self.kind, self.node
        c.coord = _native.meshmem_coord(*self.coord)
        if self.nodes is not None:
            ids = (ctypes.c_uint32 * len(self.nodes))(*self.nodes)
            c.nodes, c.node_count = ids, len(self.nodes)
            c._keep = ids
        c.pages_per_stripe = self.pages_per_stripe
        return c

    def __repr__(self):
        return f"Placement(kind={self.kind}, node={self.node}, coord={self.coord}, nodes={self.nodes})"


def Local():
    return Placement(Placement.LOCAL)


def Node(node):
    return Placement(Placement.NODE, node=node)


def Nearest(x, y, z):
    return Placement(Placement.NEAREST, coord=(x, y, z))


def Interleave(nodes=None, pages_per_stripe=1):
    return Placement(Placement.INTERLEAVE, nodes=nodes, pages_per_stripe=pages_per_stripe)


def Balanced():
    return Placement(Placement.BALANCED)


def _placement(placement):
    if placement is None:
        return None
    if isinstance(placement, bool) or not isinstance(placement, (int, Placement)):
        raise TypeError(f"placement {placement!r} is not a meshmem.Placement or a node id")
    placement = Node(placement) if isinstance(placement, int) else placement
    return ctypes.pointer(placement._c())


class Advice:
    """A coherence hint; ``kind`` is a MESHMEM_ADVICE_* value."""

    NONE_KIND, READ_MOSTLY_KIND, PREFERRED_LOCATION_KIND, ACCESSED_BY_KIND, STREAMING_KIND = range(5)

    def __init__(self, kind=0, node=0):
        self.kind, self.node = kind, node

    @classmethod
    def preferred_location(cls, node):
        return cls(cls.PREFERRED_LOCATION_KIND, node)

    @classmethod
    def accessed_by(cls, node):
        return cls(cls.ACCESSED_BY_KIND, node)

    def _c(self):
        return _native.meshmem_advice(self.kind, self.node)


Advice.NONE = Advice(Advice.NONE_KIND)
Advice.READ_MOSTLY = Advice(Advice.READ_MOSTLY_KIND)
Advice.STREAMING = Advice(Advice.STREAMING_KIND)

# ------------------------------------------------------------------ dtypes

# name: (DLPack type code, bits)
_DTYPES = {
    "bool": (6, 8),
    "int8": (0, 8), "int16": (0, 16), "int32": (0, 32), "int64": (0, 64),
    "uint8": (1, 8), "uint16": (1, 16), "uint32": (1, 32), "uint64": (1, 64),
    "float16": (2, 16), "float32": (2, 32), "float64": (2, 64),
    "bfloat16": (4, 16),
    "complex64": (5, 64), "complex128": (5, 128),
}


def _dtype_name(dtype):
    """Accepts a name, a numpy dtype or type, or a torch dtype."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).replace("torch.", "")
    else:
        try:
            import numpy
            name = numpy.dtype(dtype).name
        except Exception:
            name = str(dtype)
    if name not in _DTYPES:
        raise _argument(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return name


def _shape(shape):
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape {shape!r} is not a sequence of sizes") from None
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _argument(f"shape {shape} has the size {size!r}; sizes are whole numbers of at least 0")
    return shape


def _nbytes(shape, dtype):
    nbytes = math.prod(shape) * _DTYPES[dtype][1] // 8
    if nbytes >= 2**63:
        raise _argument(f"shape {shape} of {dtype} spans {nbytes} bytes, more than 2^63; use a smaller shape")
    return nbytes

# ------------------------------------------------------------------ DLPack

_DL_CPU = 1
_LEGACY, _VERSIONED = b"dltensor", b"dltensor_versioned"

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_destructor_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _destructor_t]


def _make_destructor(name, versioned):
    # A capsule that a consumer took was renamed "used_..." and is not ours
    # to delete; one still named `name` was never consumed, so its tensor's
    # reference is dropped here (the DLPack protocol's rule).
    def destroy(capsule):
        try:
            if _capsule_is_valid(capsule, name):
                lib.meshmem_dlpack_delete(_capsule_pointer(capsule, name), versioned)
        except Exception:
            pass  # at interpreter exit the module may be half torn down

    return _destructor_t(destroy)


# Kept for the life of the module: capsules call them when they are freed.
_DESTROY_LEGACY = _make_destructor(_LEGACY, 0)
_DESTROY_VERSIONED = _make_destructor(_VERSIONED, 1)

# --------------------------------------------------------------- buffers


class Buffer:
    """A range of pool memory seen as an array of ``shape`` and ``dtype``.

    ``Pool.buffer`` makes one that owns its allocation; ``Pool.view`` one
    over memory any node allocated. The allocation is freed when the buffer
    is released (``release()`` or garbage collection) and every array or
    tensor exported from it is gone."""

    def __init__(self, pool, handle, shape, dtype, strides=None, owned=True):
        self._pool, self._handle, self._owned = pool, handle, owned
        self.shape, self.dtype, self.strides = shape, dtype, strides
        addr, nbytes = ctypes.c_uint64(), ctypes.c_size_t()
        _check(lib.meshmem_buffer_info(handle, ctypes.byref(addr), ctypes.byref(nbytes)))
        self.addr, self.nbytes = addr.value, nbytes.value

    @property
    def owned(self):
        return self._owned

    def __dlpack_device__(self):
        return (_DL_CPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if stream not in (None, -1):
            raise BufferError(f"stream {stream!r} given for a CPU tensor; pass None")
        if dl_device is not None and tuple(dl_device) != (_DL_CPU, 0):
            raise BufferError(f"dl_device {dl_device!r} asked for; meshmem buffers are on the CPU (1, 0)")
        if copy:
            raise BufferError("copy=True asked for; meshmem buffers are exported without copies")
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        code, bits = _DTYPES[self.dtype]
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * ndim)(*self.shape)
        strides = (ctypes.c_int64 * ndim)(*self.strides) if self.strides is not None else None
        desc = _native.meshmem_tensor_desc(ndim, shape, strides, code, bits, 1, 0, int(versioned), 0)
        managed = ctypes.c_void_p()
        _check(lib.meshmem_buffer_dlpack(self._handle, ctypes.byref(desc), ctypes.byref(managed)))
        if versioned:
            return _capsule_new(managed, _VERSIONED, _DESTROY_VERSIONED)
        return _capsule_new(managed, _LEGACY, _DESTROY_LEGACY)

    def numpy(self):
        import numpy
        return numpy.from_dlpack(self)

    def torch(self):
        import torch
        return torch.from_dlpack(self)

    def release(self):
        """Drops this buffer's reference; using it afterwards raises
        InvalidHandle. Arrays and tensors exported earlier stay valid."""
        _check(lib.meshmem_buffer_release(self._handle))

    def __del__(self):
        try:
            lib.meshmem_buffer_release(self._handle)
        except Exception:
            pass

    def __repr__(self):
        return f"Buffer(addr={self.addr:#x}, shape={self.shape}, dtype={self.dtype}, owned={self._owned})"

# ------------------------------------------------------------------- pools


NodeStats = namedtuple(
    "NodeStats",
    "node coord capacity_bytes used_bytes frames_total frames_used bytes_local bytes_remote hop_bytes leaked_pages replica_bytes",
)


def torch_allgather(group=None):
    """An all-gather for ``Pool(allgather=...)`` over torch.distributed,
    which must be initialised (gloo works on CPU)."""
    import torch
    import torch.distributed as dist

    def gather(data):
        mine = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        return b"".join(part.numpy().tobytes() for part in parts)

    return gather


class Pool:
    """One node's membership in a group.

    ``Pool()`` joins with the environment (as ``meshmem run`` or torchrun
    set it) overridden by the keyword arguments. With ``allgather``, a
    function taking this node's bytes and returning every node's bytes in
    rank order (concatenated or as a list), the nodes first agree on the
    group id and check each other's configuration through it. When
    ``MESHMEM_SECRET`` is set the group spans hosts, and ``allgather``
    carries the multi-host descriptors instead, so no rendezvous server is
    started at ``MASTER_ADDR:MASTER_PORT``; see
    ``meshmem_join_with_allgather`` in meshmem.h."""

    def __init__(self, *, rank=None, size=None, mesh=None, group=None, page_size=None,
                 node_capacity=None, window_size=None, join_timeout_ms=None, allgather=None):
        options = _native.meshmem_options()
        _check(lib.meshmem_options_init(ctypes.byref(options)))
        if rank is not None:
            options.rank = rank
        if size is not None:
            options.size = size
        if mesh is not None:
            options.mesh = str(mesh).encode()
        if group is not None:
            options.group = str(group).encode()
        options.page_size = page_size or 0
        options.node_capacity = node_capacity or 0
        options.window_size = window_size or 0
        options.join_timeout_ms = join_timeout_ms or 0
        handle = _native.meshmem_pool()
        if allgather is None:
            _check(lib.meshmem_join(ctypes.byref(options), ctypes.byref(handle)))
        else:
            self._join_with(allgather, options, handle)
        self._handle = handle

    @staticmethod
    def _join_with(allgather, options, handle):
        failure = []

        def gather(_user, send, length, recv):
            try:
                parts = allgather(ctypes.string_at(send, length))
                data = b"".join(parts) if isinstance(parts, (list, tuple)) else bytes(parts)
                if len(data) % length != 0:
                    raise ValueError(f"the all-gather returned {len(data)} bytes, not a multiple of {length}")
                ctypes.memmove(recv, data, len(data))
                return 0
            except Exception as e:  # reported after the join returns
                failure.append(e)
                return -1

        callback = _native.allgather_fn(gather)
        status = lib.meshmem_join_with_allgather(ctypes.byref(options), callback, None, ctypes.byref(handle))
        if status != 0 and failure:
            try:
                _check(status)
            except MeshmemError as e:
                raise e from failure[0]
        _check(status)

    @classmethod
    def from_env(cls):
        """Joins with everything from the environment."""
        return cls()

    @classmethod
    def attach(cls, handle):
        """Wraps a pool handle (an int) that C or C++ code joined."""
        pool = cls.__new__(cls)
        pool._handle = _native.meshmem_pool(handle)
        return pool

    @property
    def handle(self):
        """The pool's C handle as an int, for C or C++ extensions."""
        return self._handle.id

    def leave(self):
        """Leaves the group; every later call on this pool raises
        InvalidHandle. Buffers and tensors keep their memory."""
        _check(lib.meshmem_leave(self._handle))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.leave()

    def _get(self, function, ctype, *args):
        value = ctype()
        _check(function(self._handle, *args, ctypes.byref(value)))
        return value

    @property
    def node(self):
        return self._get(lib.meshmem_node, ctypes.c_uint32).value

    @property
    def size(self):
        return self._get(lib.meshmem_size, ctypes.c_uint32).value

    @property
    def mesh(self):
        """(x, y, z, torus)."""
        s = self._get(lib.meshmem_mesh, _native.meshmem_mesh_shape)
        return (s.x, s.y, s.z, bool(s.torus))

    @property
    def page_size(self):
        return self._get(lib.meshmem_page_size, ctypes.c_uint64).value

    def coord(self, node=None):
        c = self._get(lib.meshmem_coord_of, _native.meshmem_coord, self.node if node is None else node)
        return (c.x, c.y, c.z)

    def hops(self, a, b):
        return self._get(lib.meshmem_hops, ctypes.c_uint32, a, b).value

    def alloc(self, nbytes, align=8, placement=None, advice=None):
        """Allocates ``nbytes`` and returns the global address."""
        advice = (advice or Advice.NONE)._c()
        return self._get(lib.meshmem_alloc, ctypes.c_uint64, nbytes, align, _placement(placement), advice).value

    def free(self, addr):
        _check(lib.meshmem_free(self._handle, addr))

    def read(self, addr, nbytes):
        data = ctypes.create_string_buffer(nbytes)
        _check(lib.meshmem_read(self._handle, addr, data, nbytes))
        return data.raw

    def write(self, addr, data):
        data = bytes(data)
        _check(lib.meshmem_write(self._handle, addr, data, len(data)))

    def fetch_add(self, addr, value):
        """Adds to the 64-bit word at ``addr``; returns its old value."""
        return self._get(lib.meshmem_fetch_add_u64, ctypes.c_uint64, addr, value).value

    def compare_exchange(self, addr, expected, desired):
        """Swaps in ``desired`` if the word holds ``expected``; returns the
        value it held (equal to ``expected`` exactly when it swapped)."""
        return self._get(lib.meshmem_compare_exchange_u64, ctypes.c_uint64, addr, expected, desired).value

    def quiet(self):
        _check(lib.meshmem_quiet(self._handle))

    def barrier(self):
        _check(lib.meshmem_barrier(self._handle))

    def all_gather(self, data):
        """Every node's ``data`` (all of one length), in rank order."""
        data = bytes(data)
        size = self.size
        out = ctypes.create_string_buffer(len(data) * size)
        _check(lib.meshmem_all_gather(self._handle, data, len(data), out, len(out)))
        return [out.raw[i * len(data):(i + 1) * len(data)] for i in range(size)]

    def local_ptr(self, addr, nbytes):
        """Maps the range and returns its pointer in this process."""
        return self._get(lib.meshmem_local_ptr, ctypes.c_void_p, addr, nbytes).value

    def home_of(self, addr):
        return self._get(lib.meshmem_home_of, ctypes.c_uint32, addr).value

    def stats(self):
        count = ctypes.c_size_t()
        nodes = (_native.meshmem_node_stats * 1024)()
        _check(lib.meshmem_stats(self._handle, nodes, len(nodes), ctypes.byref(count)))
        return [
            NodeStats(s.node, (s.coord.x, s.coord.y, s.coord.z), s.capacity_bytes, s.used_bytes, s.frames_total,
                      s.frames_used, s.bytes_local, s.bytes_remote, s.hop_bytes, s.leaked_pages,
                      s.replica_bytes)
            for s in nodes[:count.value]
        ]

    def buffer(self, shape, dtype="float32", placement=None, advice=None, align=None):
        """A new buffer of ``shape`` and ``dtype`` that owns its memory."""
        shape, dtype = _shape(shape), _dtype_name(dtype)
        nbytes = max(_nbytes(shape, dtype), 1)
        align = align or max(_DTYPES[dtype][1] // 8, 8)
        handle = _native.meshmem_buffer()
        advice = (advice or Advice.NONE)._c()
        _check(lib.meshmem_buffer_alloc(self._handle, nbytes, align, _placement(placement), advice, ctypes.byref(handle)))
        return Buffer(self, handle, shape, dtype)

    def view(self, addr, shape, dtype="float32", strides=None):
        """A buffer over memory at ``addr`` that any node allocated; it
        frees nothing."""
        shape, dtype = _shape(shape), _dtype_name(dtype)
        nbytes = _nbytes(shape, dtype)
        if nbytes == 0:
            raise _argument(f"shape {shape} is empty; a view covers at least one element")
        handle = _native.meshmem_buffer()
        _check(lib.meshmem_buffer_view(self._handle, addr, nbytes, ctypes.byref(handle)))
        return Buffer(self, handle, shape, dtype, strides=strides, owned=False)

    def tensor(self, shape, dtype=None, placement=None, advice=None):
        """A torch tensor in pool memory (float32 unless ``dtype`` says);
        the memory returns to the pool when the tensor is freed."""
        import torch
        return torch.from_dlpack(self.buffer(shape, dtype or torch.float32, placement, advice))

    def tensor_at(self, addr, shape, dtype=None):
        """A torch tensor viewing memory at ``addr`` without a copy."""
        import torch
        return torch.from_dlpack(self.view(addr, shape, dtype or torch.float32))

    def __repr__(self):
        return f"meshmem.Pool(handle={self.handle:#x})"
