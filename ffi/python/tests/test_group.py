"""Groups of four node processes under the launcher, using pool memory from
Python, numpy, torch and the example C++ extension."""

import os

import pytest

from conftest import run_group

torch = pytest.importorskip("torch", reason="torch is not installed; ffi/python/setup-venv.sh installs it")
pytest.importorskip("numpy", reason="numpy is not installed; ffi/python/setup-venv.sh installs it")


def test_every_node_reads_every_tensor_in_place():
    run_group("tensors")


@pytest.fixture(scope="module")
def extension():
    import sys
    from conftest import REPO

    sys.path.insert(0, str(REPO / "examples" / "torch_extension"))
    from build import load_extension

    return load_extension()


def test_extension_reads_neighbour_tensor(extension):
    run_group("extension")


def test_join_through_a_torch_distributed_all_gather():
    run_group("allgather")


def test_torch_all_gather_across_hosts():
    """torch.distributed's own store listens on MASTER_PORT at node 0, so this
    passes only if the pool starts no rendezvous server there."""
    if os.geteuid() != 0:
        pytest.skip("simulated hosts need root to create network namespaces")
    run_group("allgather", hosts=2)
