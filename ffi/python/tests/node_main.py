"""The body of one node process in the group tests; run under the launcher:

    meshmem run --mesh 2x2x1 -- python node_main.py SCENARIO

Scenarios: `tensors` (numpy and torch views of every node's buffer),
`extension` (the example C++ extension), `allgather` (joining through
torch.distributed). Prints "node N: SCENARIO passed" and exits 0 when every
check held; an assertion exits non-zero and the launcher stops the others.
"""

import gc
import os
import struct
import sys
from pathlib import Path

import numpy
import torch

import meshmem

SHAPE = (256, 64)  # 64 KiB of float32: one page at the tests' page size


def gather_addrs(pool, addr):
    return [struct.unpack("<Q", raw)[0] for raw in pool.all_gather(struct.pack("<Q", addr))]


def frames(pool):
    return [s.frames_used for s in pool.stats()]


def tensors(pool):
    me, n = pool.node, pool.size

    # Fill a buffer on this node, which torch and numpy see without a copy.
    buf = pool.buffer(SHAPE, "float32")
    mine_t = torch.from_dlpack(buf)
    mine_a = numpy.from_dlpack(buf)
    assert mine_t.data_ptr() == buf.addr and mine_a.ctypes.data == buf.addr
    assert mine_t.shape == SHAPE and mine_t.stride() == (SHAPE[1], 1) and mine_t.dtype == torch.float32
    mine_t.fill_(me)
    assert (mine_a == me).all()

    # Read every node's buffer in place.
    addrs = gather_addrs(pool, buf.addr)
    pool.barrier()
    for owner, addr in enumerate(addrs):
        view = pool.view(addr, SHAPE, numpy.float32)
        t, a = torch.from_dlpack(view), numpy.from_dlpack(view)
        assert t.data_ptr() == addr and a.ctypes.data == addr, (owner, hex(addr))
        assert (t == owner).all() and (a == owner).all(), f"node {owner}'s tensor"
        assert pool.home_of(addr) == owner
        del t, a, view
    gc.collect()
    pool.barrier()

    # The allocation lives while any consumer holds it.
    held = frames(pool)
    pool.barrier()
    buf.release()
    assert frames(pool)[me] == held[me], "released while tensors still use it"
    del mine_t
    gc.collect()
    assert frames(pool)[me] == held[me]
    del mine_a
    gc.collect()
    pool.barrier()
    after = frames(pool)
    assert all(h - a == 1 for h, a in zip(held, after)), (held, after)

    # pool.tensor on the next node; memory returns when it is dropped.
    before = frames(pool)
    pool.barrier()
    t = pool.tensor(SHAPE, torch.float32, placement=meshmem.Node((me + 1) % n))
    assert pool.home_of(t.data_ptr()) == (me + 1) % n
    t.fill_(me)
    pool.barrier()
    assert all(f - b == 1 for f, b in zip(frames(pool), before))
    prev = gather_addrs(pool, t.data_ptr())[(me - 1) % n]
    assert (pool.tensor_at(prev, SHAPE) == (me - 1) % n).all()
    gc.collect()
    pool.barrier()
    del t
    gc.collect()
    pool.barrier()
    assert frames(pool) == before


def extension(pool):
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples" / "torch_extension"))
    from build import load_extension

    ext = load_extension()
    me, n = pool.node, pool.size
    before = frames(pool)
    pool.barrier()
    t = ext.alloc_on(pool.handle, (me + 1) % n, list(SHAPE))
    t.fill_(me)
    assert ext.home_of(pool.handle, t.data_ptr()) == (me + 1) % n
    addrs = gather_addrs(pool, t.data_ptr())
    pool.barrier()
    left = (me - 1) % n
    neighbour = ext.view_at(pool.handle, addrs[left], list(SHAPE))
    assert neighbour.data_ptr() == addrs[left]
    assert (neighbour == left).all(), f"node {left}'s tensor through the extension"
    assert (pool.tensor_at(addrs[left], SHAPE) == left).all()
    del neighbour
    gc.collect()
    pool.barrier()
    del t
    gc.collect()
    pool.barrier()
    assert frames(pool) == before


def allgather():
    import torch.distributed as dist

    os.environ.pop("MESHMEM_GROUP", None)  # the callback agrees on one instead
    host_addr = os.environ.get("MESHMEM_HOST_ADDR", "127.0.0.1")
    if not host_addr.startswith("127."):
        # On a simulated host gloo would pick loopback; point it at the
        # interface that carries this host's address.
        import subprocess

        listing = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
        interface = next(line.split()[1] for line in listing.splitlines() if f" {host_addr}/" in line)
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    pool = meshmem.Pool(allgather=meshmem.torch_allgather(), page_size=65536)
    assert pool.node == dist.get_rank()
    addrs = gather_addrs(pool, pool.alloc(8, placement=meshmem.Node(0)))
    for addr in addrs:
        pool.fetch_add(addr, 1)
    pool.barrier()
    assert sum(struct.unpack("<Q", pool.read(a, 8))[0] for a in addrs) == pool.size ** 2
    pool.barrier()
    pool.leave()
    dist.destroy_process_group()


def main():
    scenario = sys.argv[1]
    if scenario == "allgather":
        allgather()
        node = os.environ["RANK"]
    else:
        pool = meshmem.Pool.from_env()
        node = pool.node
        {"tensors": tensors, "extension": extension}[scenario](pool)
        pool.barrier()
        pool.leave()
    print(f"node {node}: {scenario} passed", flush=True)


if __name__ == "__main__":
    main()
