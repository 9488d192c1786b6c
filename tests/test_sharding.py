"""seqjax over a sharded batch on 4 emulated CPU devices, against the same computation on one device.

The device count is fixed when a process first starts JAX's CPU backend, so
the sharded runs happen in one subprocess (tests/sharded_checks.py, started
once for the module with ``--xla_force_host_platform_device_count=4`` added to
its XLA_FLAGS); the tests assert on what it reports. The rest of the suite
keeps its single device.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import seqjax
from seqjax.sharding import data_parallel

HERE = os.path.dirname(__file__)
CELLS = ("lstm", "gru", "rnn")
KERNELS = ("auto", "xla")
TOL = 2e-5  # float32: the sharded sums add the same terms in another order


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    done = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", CELLS)
def test_auto_mesh_keeps_the_batch_sharded_and_matches_one_device(report, cell, kernel):
    key = f"{cell}/{kernel}/auto"
    assert report[f"{key}/ys_spec"] == "P('b',)"
    assert report[f"{key}/carry_spec"] == "P('b',)"
    assert report[f"{key}/diff"] < TOL
    assert report[f"{key}/all_gather"] is False


@pytest.mark.parametrize("cell", CELLS)
def test_native_kernels_run_per_shard(report, cell):
    if not report["kernels_available"]:
        pytest.skip("seqjax's x86 kernels are not available here")
    backend = report[f"{cell}/auto/backend"]
    assert backend in ("avx2", "avx512")
    calls = dict(report[f"{cell}/auto/auto/kernel_calls"])
    # forward, backward and weight-gradient kernels, each on B/4 = 2 rows of the batch-major xs [B, T, I]
    assert set(calls) == {f"seqjax_{backend}_rnn_{k}" for k in ("forward", "backward", "weight_grads")}
    assert calls[f"seqjax_{backend}_rnn_forward"] == "f32[2,6,4]"
    assert calls[f"seqjax_{backend}_rnn_weight_grads"] == "f32[2,6,4]"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", CELLS)
def test_shard_map_with_check_vma(report, cell, kernel):
    assert report[f"{cell}/{kernel}/shard_map/diff"] < TOL


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", CELLS)
def test_explicit_mesh(report, cell, kernel):
    assert report[f"{cell}/{kernel}/explicit/diff"] < TOL
    assert report[f"{cell}/{kernel}/explicit/ys_spec"] == "P('b', None, None)"


@pytest.mark.parametrize("what", ["time", "hidden", "replicated"])
def test_other_shardings_fall_back_to_the_same_result(report, what):
    assert report[f"fallback/{what}/diff"] < TOL


def test_vmap_on_a_multi_device_host(report):
    assert report["vmap/diff"] < TOL


@pytest.mark.parametrize("schedule", ["8_8_loop", "5_8_scan"])
def test_tbptt_fit_data_parallel(report, schedule):
    key = f"tbptt/{schedule}"
    assert report[f"{key}/steps"] > 0
    assert report[f"{key}/diff"] < 1e-4  # two epochs of Adam steps on float32 gradients
    assert report[f"{key}/carry_spec"] == "P('b',)"
    assert report[f"{key}/params_spec"] == "P()"


def test_tbptt_fit_resumes_on_the_mesh(report):
    """`tbptt.fit(mesh=, checkpoint=, key=)`: stopped after window 7 and resumed, the same bits as never stopped."""
    assert report["tbptt/resume_on_mesh/same"] is True


def test_nnx_train_step_data_parallel(report):
    assert report["nnx/diff"] < 1e-4


def test_data_parallel_errors():
    import jax
    import numpy as np
    mesh = jax.make_mesh((1,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(TypeError, match="seqjax.sharding.data_parallel: mesh must be a jax.sharding.Mesh"):
        data_parallel("b")
    with pytest.raises(ValueError, match=r"axis must name axes of the mesh \('b',\), got 'x'"):
        data_parallel(mesh, "x")
    dp = data_parallel(mesh)
    assert dp.axis == "b" and dp.size == 1
    batch = dp.shard({"x": np.ones((4, 3)), "n": None})
    assert batch["n"] is None and batch["x"].sharding.spec == jax.sharding.PartitionSpec("b", None)
    with pytest.raises(ValueError, match="seqjax.tbptt.fit: axis must name axes"):
        seqjax.tbptt.fit(seqjax.tbptt.make_step(lambda p, c, x, **k: (c, x), lambda o, y: o, _sgd(), k1=2),
                         None, np.zeros((8, 2)), initial_carry=None, mesh=mesh, batch_axis="x")


def _sgd():
    import optax
    return optax.sgd(0.1)


FIT_CASES = ("loop-callable", "loop-iterator", "compiled-callable", "compiled-iterator", "lockstep-callable")


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_data_parallel_equals_one_device(report, case):
    """`seqjax.fit(mesh=)` (one step or two per call, callable batches or an iterator, runs in lockstep) against the
    same 6 Adam steps on one device with the same global batch (tests/sharded_fit_checks.py)."""
    assert report[f"fit/{case}/diff"] < 1e-5
    assert report[f"fit/{case}/params_spec"] == "P()" and report[f"fit/{case}/devices"] == 4
    if case.startswith("loop"):  # the step loop hands the step batches split by rows
        assert report[f"fit/{case}/batch_specs"] == ["P('b', None, None)"]


@pytest.mark.parametrize("case", ["loop-callable", "loop-iterator", "compiled-callable"])
def test_fit_rejects_a_batch_that_does_not_split(report, case):
    assert report[f"fit/error/{case}"] == (
        "seqjax.train.fit: with mesh=, every array of a batch from `batches` needs its batch rows (axis 0) to split "
        "evenly over the 4 devices of mesh axis 'b'; batch[0] has shape (6, 5, 3)")


def test_fit_resumes_on_another_mesh(report):
    """Killed after step 4 on 4 devices, resumed on 2: the run that never stopped, to float32 rounding."""
    assert report["fit/remesh/devices"] == 2
    assert report["fit/remesh/diff"] < 1e-5


@pytest.mark.parametrize("devices", [2, 1])
def test_checkpoint_restores_onto_a_smaller_mesh(report, devices):
    """Saved on 4 devices (replicated state, row-sharded array, PRNG key), restored onto `devices`: the same bits, in
    the target's shardings."""
    assert report[f"restore/{devices}/same"] is True
    assert report[f"restore/{devices}/rows_devices"] == devices and report[f"restore/{devices}/rows_spec"] == "P('b',)"
    assert report[f"restore/{devices}/state_devices"] == devices


@pytest.mark.parametrize("batches", ["iterator", "callable"])
def test_fit_compiled_loop_runs_the_kernels_per_shard(report, batches):
    """The compiled loop's program (2 steps per call; batches stacked [k, B, ...], or drawn inside the call): the
    kernels run on B/4 = 2 rows of xs [B, T, I] = [8, 5, 3], and the batch is never all-gathered."""
    assert report[f"fit/hlo/{batches}/all_gather"] is False
    if not report["kernels_available"]:
        pytest.skip("seqjax's x86 kernels are not available here")
    calls = dict(report[f"fit/hlo/{batches}/kernel_calls"])
    backend = next(iter(calls)).split("_")[1]
    assert backend in ("avx2", "avx512")
    assert set(calls) == {f"seqjax_{backend}_rnn_{k}" for k in ("forward", "backward", "weight_grads")}
    assert calls[f"seqjax_{backend}_rnn_forward"] == calls[f"seqjax_{backend}_rnn_weight_grads"] == "f32[2,5,3]"
