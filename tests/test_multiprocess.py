"""Data-parallel `seqjax.fit` across two processes under `jax.distributed` (CPU collectives with Gloo), against the
same training in one process on one device.

Two subprocesses (tests/multiprocess_fit.py) each bring 2 emulated CPU devices; the mesh spans the 4. They run the
step loop with callable batches, the compiled loop (2 steps per call) with an iterator, and a run killed after
step 4 and resumed from its Orbax checkpoint (saved by both processes).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharded_fit_checks as checks  # tests/sharded_fit_checks.py

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiprocess")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_fit.py"), str(i), "2", port,
                               str(d / "out.json"), str(d / "ckpt")], env=env, cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return json.loads((d / "out.json").read_text())


def close(got, want, tol=1e-5):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b) / (1 + np.abs(b)), initial=0) < tol


@pytest.mark.slow
@pytest.mark.parametrize("case", ["loop-callable", "compiled-iterator"])
def test_two_processes_train_as_one_device(two_processes, case):
    assert (two_processes["process_count"], two_processes["devices"], two_processes["local_devices"]) == (2, 4, 2)
    state, history = checks.fit(case, None)
    got = two_processes[case]
    close(got["params"], jax.tree.leaves(state.params))
    close(got["losses"], checks.losses(history))


@pytest.mark.slow
def test_two_processes_resume_bit_exact(two_processes):
    """Killed after step 4 and resumed: the same bits as the uninterrupted two-process run."""
    assert two_processes["resumed"] == two_processes["compiled-iterator"]
