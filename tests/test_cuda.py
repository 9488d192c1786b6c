"""The persistent CUDA kernels (seqjax.backends._cuda, kernel="cuda"): numerics against NumPy and XLA's loop, errors.

The numerics need a Hopper GPU (compute capability 9.0) and run where the
default backend is a GPU (`bash bench/gpu.sh OUT cuda`); the build and planner checks need
only nvcc, and the error paths run everywhere.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax.backends import _cuda as cuda, _library as native
from reference import lstm_step
from test_onednn import _numpy_step

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="the kernels run on a GPU")
KINDS = {"lstm": lambda H: seqjax.lstm(H), "gru": lambda H: seqjax.gru(H), "rnn_tanh": lambda H: seqjax.rnn(H),
         "rnn_relu": lambda H: seqjax.rnn(H, activation="relu")}
# the CPU kernels (seqjax.backends._x86) also run the LSTM with peepholes and Greff et al.'s variants (here with peepholes)
CPU_KINDS = {**KINDS, "lstm_peep": lambda H: seqjax.lstm(H, peepholes=True),
             **{f"lstm_{v.lower()}": (lambda H, v=v: seqjax.lstm_variant(v, H))
                for v in ("NIG", "NFG", "NOG", "CIFG", "NIAF", "NOAF")},
             "lstm_cifg_np": lambda H: seqjax.lstm(H, coupled_input_forget=True)}


def _setup(kind, B, T, I, H, seed=0):
    cell = CPU_KINDS[kind](H)
    keys = jax.random.split(jax.random.key(seed), 5)
    params = cell.init(keys[0], I)
    params = jax.tree.map(lambda a, k: a + 0.3 * jax.random.normal(k, a.shape), params,
                          jax.tree.unflatten(jax.tree.structure(params),
                                             list(jax.random.split(keys[1], len(jax.tree.leaves(params))))))
    # the recurrent weights stay the (orthogonal) initial ones, scaled to contract, so rounding does not grow over time
    params = params._replace(w_h=0.9 * cell.init(keys[0], I).w_h)
    xs = jax.random.normal(keys[2], (B, T, I))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(keys[3], a.shape), cell.initial_carry(params, (B,)))
    return cell, params, xs, carry


# tests/reference.py's lstm_step options for the LSTM variants of CPU_KINDS
_LSTM_STEP = {"lstm_nig": dict(input_gate=False), "lstm_nfg": dict(forget_gate=False),
              "lstm_nog": dict(output_gate=False), "lstm_cifg": dict(coupled=True), "lstm_cifg_np": dict(coupled=True),
              "lstm_niaf": dict(in_act=lambda a: a), "lstm_noaf": dict(out_act=lambda a: a)}


def _numpy_scan(kind, params, xs, carry, reverse):
    """The recurrence in float64 NumPy (tests/reference.py's steps): ``(final, ys [B, T, H])``."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    state = (np.asarray(carry.h, np.float64), np.asarray(carry.c, np.float64), None) if kind.startswith("lstm") else \
        np.asarray(carry, np.float64)
    T = xs.shape[1]
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        x = np.asarray(xs[:, t], np.float64)
        state, ys[t] = lstm_step(p, state, x, **_LSTM_STEP[kind]) if kind in _LSTM_STEP else _numpy_step(kind, p, state, x)
    return state, np.stack(ys, axis=1)


needs_nvcc = pytest.mark.skipif(not native.cuda_installed(), reason="installed without the CUDA kernels (no nvcc)")


@needs_nvcc
def test_kernels_load():
    assert native.unavailable("cuda") is None and native.load_cuda() is native.load_cuda()  # opened once


@needs_nvcc
def test_planner_on_a_model_h100():
    """The launch planner's choices and limits, for a model H100 (no GPU needed)."""
    assert cuda.plan("lstm", 16, 128, model=True) == dict(cluster=16, forward_threads=256, backward_threads=256,
                                                           forward_smem=33296, backward_smem=43024)
    # the plans bench/results/gpu/cuda_sweep_gpu.json measured: a planner that changes them needs a new run
    measured = {("lstm", 16, 128): (256, 256), ("gru", 16, 128): (192, 384), ("rnn_tanh", 16, 128): (128, 256),
                ("lstm", 32, 64): (128, 256), ("gru", 32, 64): (128, 192), ("rnn_tanh", 32, 64): (128, 128)}
    for (kind, B, H), threads in measured.items():
        got = cuda.plan(kind, B, H, model=True)
        assert (got["cluster"], got["forward_threads"], got["backward_threads"]) == (16, *threads), (kind, B, H)
    for kind in cuda._CELLS:
        for B in (1, 2, 3, 16, 33, 64, 256):
            for H in (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024):
                try:
                    got = cuda.plan(kind, B, H, model=True)
                except ValueError as e:
                    assert "no launch plan" in str(e)
                    continue
                cs = got["cluster"]
                assert H % (4 * cs) == 0 and B * H // cs <= 1024, (kind, B, H, got)
                assert 32 <= got["forward_threads"] <= 512 and 32 <= got["backward_threads"] <= 512
                assert max(got["forward_smem"], got["backward_smem"]) <= 232448
    for B, H in [(2, 256), (16, 256), (32, 64), (1, 4)]:  # small batches always find a plan
        for kind in cuda._CELLS:
            cuda.plan(kind, B, H, model=True)


@needs_nvcc
@pytest.mark.parametrize("args, message", [
    (("lstm", 128, 256), r"B \* H / cluster = 128 \* 256 / 16 gate threads per block, more than 1024"),
    (("gru", 3, 6), "no cluster size divides H=6 into blocks of a multiple of 4 units"),
    (("rnn_tanh", 0, 8), "B=0 and H=8 must be positive"),
    (("lstm", 16, 128, 3), "no cluster size divides H=128"),
])
def test_planner_says_why_not(args, message):
    with pytest.raises(ValueError, match=message):
        cuda.plan(*args, model=True)


@needs_nvcc
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the answer without a GPU")
def test_plan_without_a_gpu_names_the_compute_capability():
    with pytest.raises(ValueError, match="thread-block clusters need compute capability 9.0"):
        cuda.plan("lstm", 16, 128)


@pytest.mark.parametrize("make_cell, message", [
    (lambda: seqjax.lstm(8, peepholes=True), "no form of lstm"),
    (lambda: seqjax.lstm(8, proj_size=4), "no form of lstm"),
    (lambda: seqjax.lstm_variant("CIFG", 8), "no form of lstm"),
    (lambda: seqjax.gru(8, reset_after=False), "no form of gru"),
    (lambda: seqjax.lstm(8, param_dtype=jnp.bfloat16), "float32 only"),
])
def test_kind_of_refuses_other_cells(make_cell, message):
    cell = make_cell()
    kind, why = cuda.kind_of(cell, cell.init(jax.random.key(0), 3))
    assert kind is None and message in why


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_cuda_kernel_refuses_the_cpu():
    cell, params, xs, _ = _setup("lstm", 2, 3, 4, 8)
    with pytest.raises(ValueError, match="kernel='cuda' cannot run this call: it is a GPU kernel and the run is "
                                         "placed on CPU"):
        seqjax.scan(cell, params, xs, kernel="cuda")


@on_gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B, T, I, H, cluster", [(3, 7, 5, 16, 0), (3, 7, 5, 16, 1), (5, 9, 3, 64, 2),
                                                  (16, 40, 8, 128, 0), (4, 12, 6, 128, 8), (2, 5, 3, 256, 16)])
def test_forward_matches_numpy(kind, reverse, B, T, I, H, cluster):
    cell, params, xs, carry = _setup(kind, B, T, I, H)
    xs_tm = jnp.swapaxes(xs, 0, 1)
    with jax.default_matmul_precision("highest"):  # the input projection is an XLA GEMM (TF32 by default on GPUs)
        final, ys = jax.jit(lambda p, x, c: cuda.cuda_scan(kind, p, x, c, reverse, cluster=cluster))(
            params, xs_tm, carry)
    want_final, want_ys = _numpy_scan(kind, params, xs, carry, reverse)
    np.testing.assert_allclose(np.swapaxes(np.asarray(ys), 0, 1), want_ys, rtol=2e-5, atol=2e-5)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(want_final)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@on_gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B, T, I, H, cluster", [(3, 7, 5, 16, 0), (5, 9, 3, 64, 4), (16, 40, 8, 128, 0),
                                                  (2, 5, 3, 256, 16)])
def test_gradients_match_xla(kind, reverse, B, T, I, H, cluster):
    with jax.default_matmul_precision("highest"):
        assert_gradients_match_xla("cuda", *_setup(kind, B, T, I, H, seed=1), reverse)


def assert_gradients_match_xla(kernel, cell, params, xs, carry, reverse, **scan_kwargs):
    """The loss's value and gradients (params, xs, carry) through ``kernel`` match XLA's loop's (autodiff);
    ``scan_kwargs`` (lengths, resets) go to both."""
    B, T, _ = xs.shape
    w = jax.random.normal(jax.random.key(7), (B, T, cell.hidden_size))

    def loss(kernel):
        def f(p, x, c):
            final, ys = seqjax.scan(cell, p, x, carry=c, reverse=reverse, kernel=kernel, **scan_kwargs)
            return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    got, want = loss(kernel)(params, xs, carry), loss("xla")(params, xs, carry)
    # the loss (leaf 0) sums B*T*H products of either sign: its rounding grows like their number's square root
    # while the sum itself may cancel to near zero
    terms = np.sqrt(B * T * cell.hidden_size)
    for path, g, r in zip(range(99), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(r))),
                                                                     terms if path == 0 else 1.0),
                                   err_msg=f"leaf {path}")


@on_gpu
def test_auto_routing_and_vmap():
    cell, params, xs, carry = _setup("lstm", 4, 20, 3, 32)
    scan = lambda p, x: seqjax.scan(cell, p, x, kernel="cuda")[1]  # noqa: E731
    assert "seqjax_cuda_rnn_forward" in str(jax.make_jaxpr(scan)(params, xs))
    batched = jax.vmap(scan, in_axes=(None, 0))(params, jnp.stack([xs, 2 * xs]))
    np.testing.assert_allclose(batched[1], scan(params, 2 * xs), rtol=1e-6, atol=1e-6)


@on_gpu
@pytest.mark.skipif(not cuda.AUTO, reason="kernel='auto' does not take the CUDA kernels yet (seqjax.backends._cuda.AUTO)")
def test_auto_takes_the_kernel_where_it_applies():
    cell, params, xs, _ = _setup("gru", 4, 20, 3, 32)
    targets = lambda **kw: str(jax.make_jaxpr(lambda p, x: seqjax.scan(cell, p, x, **kw)[1])(params, xs))  # noqa: E731
    assert "seqjax_cuda_rnn_forward" in targets()
    assert "seqjax_cuda_rnn_forward" not in targets(lengths=jnp.array([20, 3, 0, 9]))
    assert "seqjax_cuda_rnn_forward" not in targets(kernel="xla")


def test_auto_stays_on_xla_until_switched_on():
    cell, params, xs, _ = _setup("lstm", 2, 4, 3, 16)
    jaxpr = str(jax.make_jaxpr(lambda p, x: seqjax.scan(cell, p, x)[1])(params, xs))
    assert ("seqjax_cuda_rnn_forward" in jaxpr) == (cuda.AUTO and jax.default_backend() == "gpu")


@on_gpu
def test_plan_errors_name_the_limit():
    with pytest.raises(ValueError, match="no launch plan for lstm with B=4096, H=64"):
        cuda.plan("lstm", 4096, 64)
    cell, params, xs, _ = _setup("lstm", 2, 3, 4, 6)  # H=6: no multiple of 4 units per block
    with pytest.raises(ValueError, match="kernel='cuda' cannot run this call: seqjax.backends._cuda: no launch plan"):
        seqjax.scan(cell, params, xs, kernel="cuda")
    with pytest.raises(ValueError, match="kernel='cuda' cannot run this call: this native kernel has no "
                                         "per-sequence lengths"):
        seqjax.scan(cell, params, xs, kernel="cuda", lengths=jnp.array([3, 1]))
