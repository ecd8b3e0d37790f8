"""Shared fixtures: paths of the built artifacts and a runner for groups of
node processes under the launcher."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LAUNCHER = REPO / "target" / "debug" / "meshmem"
NODE_MAIN = Path(__file__).resolve().parent / "node_main.py"

# Small pages keep each test's allocations to a few frames.
os.environ.setdefault("MESHMEM_PAGE_SIZE", "64K")


def run_group(scenario, mesh="2x2x1", timeout=240, hosts=None):
    """Runs node_main.py SCENARIO on every node of `mesh`, on `hosts`
    simulated hosts when given, and returns the launcher's output. Fails with
    that output unless every node passed. On a timeout the launcher gets
    SIGTERM, which stops and reaps its nodes and deletes its namespaces."""
    if not LAUNCHER.exists():
        pytest.fail(f"{LAUNCHER} is missing; build it with `cargo build`")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(NODE_MAIN.parents[1]), os.environ.get("PYTHONPATH")])))
    command = [str(LAUNCHER), "run", "--mesh", mesh, "--env", "MESHMEM_PAGE_SIZE=64K"]
    if hosts is not None:
        command += ["--hosts", str(hosts)]
    command += ["--", sys.executable, str(NODE_MAIN), scenario]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher.send_signal(signal.SIGTERM)
        try:
            output, _ = launcher.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            output, _ = launcher.communicate()
        pytest.fail(f"{scenario} did not finish within {timeout} s:\n{output}")
    nodes = 1
    for size in mesh.split(":")[0].split("x"):
        nodes *= int(size)
    assert launcher.returncode == 0, f"{scenario} failed (exit {launcher.returncode}):\n{output}"
    for node in range(nodes):
        assert f"node {node}: {scenario} passed" in output, f"node {node} did not finish {scenario}:\n{output}"
    return output
