"""`seqjax.fit(mesh=...)` and Orbax restores across meshes on 4 emulated CPU devices (run by tests/sharded_checks.py).

Each fit check trains the same steps on one device and data-parallel over the 4 devices, with the same global batch,
and reports the largest difference of the params and the losses; the restore checks save on the 4-device mesh and
restore onto 2 devices and onto 1.
"""
from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import seqjax
from seqjax.checkpoint import Checkpoints

B, T, I, H = 8, 5, 3, 16  # H a multiple of 16: the x86 kernels run
CELL = seqjax.lstm(H)
OPT = optax.adam(3e-2)


def loss_fn(params, batch):
    x, lengths, y = batch
    _, hs = seqjax.scan(CELL, params["cell"], x, lengths=lengths)
    return jnp.mean((hs[:, -1] @ params["w"] - y) ** 2)


def draw(key, rows=B):
    kx, kl, ky = jax.random.split(key, 3)
    return (jax.random.normal(kx, (rows, T, I)), jax.random.randint(kl, (rows,), 1, T + 1),
            jax.random.normal(ky, (rows,)))


def fresh(num_runs=None):
    def one(key):
        k1, k2 = jax.random.split(key)
        return seqjax.init_state({"cell": CELL.init(k1, input_size=I), "w": 0.3 * jax.random.normal(k2, (H,))}, OPT)
    if num_runs is None:
        return jax.device_put(one(jax.random.key(0)), jax.local_devices()[0])
    return jax.device_put(jax.vmap(one)(jax.random.split(jax.random.key(0), num_runs)), jax.local_devices()[0])


def stream(num_runs=None, rows=B):
    for i in range(100):
        batch = draw(jax.random.key(100 + i), rows)
        if num_runs is not None:
            batch = jax.tree.map(lambda a: jnp.stack([a, a[::-1]]), batch)
        yield batch


def mesh_of(n):
    return Mesh(np.array(jax.devices()[:n]), ("b",), axis_types=(AxisType.Auto,))


def diff(got, want) -> float:
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1 + np.abs(np.asarray(b))), initial=0))
               for a, b in pairs)


def losses(history):
    return [[r["loss"] for r in h.train] for h in (history if isinstance(history, list) else [history])]


CASES = {  # name: (steps_per_call, num_runs, iterator)
    "loop-callable": (1, None, False),
    "loop-iterator": (1, None, True),
    "compiled-callable": (2, None, False),
    "compiled-iterator": (2, None, True),
    "lockstep-callable": (2, 2, False),
}


def _step():
    plain = seqjax.make_train_step(loss_fn, OPT)

    def step(state, batch):  # records how the step loop hands it each batch
        if not isinstance(batch[0], jax.core.Tracer):
            SEEN.append(batch[0].sharding)
        return plain(state, batch)
    return step


SEEN = []
STEP = _step()  # one step function: the cases share its compilations


def fit(case, mesh, **kw):
    k, num_runs, iterator = CASES[case]
    return seqjax.fit(STEP, fresh(num_runs), stream(num_runs) if iterator else draw, num_steps=kw.pop("num_steps", 6),
                      progress=False, seed=5, num_runs=num_runs, steps_per_call=k, mesh=mesh, **kw)


def fit_checks(out):
    mesh = mesh_of(4)
    for case in CASES:
        (one, h1) = fit(case, None)
        SEEN.clear()
        dp, h4 = fit(case, mesh)
        if SEEN:
            out[f"fit/{case}/batch_specs"] = sorted({str(s.spec) for s in SEEN})
        out[f"fit/{case}/diff"] = diff((dp.params, losses(h4)), (one.params, losses(h1)))
        out[f"fit/{case}/params_spec"] = str(dp.params["w"].sharding.spec)
        out[f"fit/{case}/devices"] = len(dp.params["w"].sharding.device_set)
    for name, batches, k in (("loop-callable", lambda key: draw(key, 6), 1), ("loop-iterator", stream(rows=6), 1),
                             ("compiled-callable", lambda key: draw(key, 6), 2)):
        try:
            seqjax.fit(STEP, fresh(), batches, num_steps=2, steps_per_call=k, progress=False, mesh=mesh)
            out[f"fit/error/{name}"] = None
        except ValueError as e:
            out[f"fit/error/{name}"] = str(e)
    compiled_hlo_checks(out, mesh)
    # killed on 4 devices after step 4, resumed on 2: the same run as one that never stopped, to float32 rounding
    want, hist = fit("compiled-iterator", mesh)
    with tempfile.TemporaryDirectory() as d:
        fit("compiled-iterator", mesh, num_steps=4, checkpoint=Checkpoints(d, every=2))
        got, hist2 = fit("compiled-iterator", mesh_of(2), checkpoint=Checkpoints(d, every=2))
        out["fit/remesh/diff"] = diff((got.params, losses(hist2)), (want.params, losses(hist)))
        out["fit/remesh/devices"] = len(got.params["w"].sharding.device_set)


def compiled_hlo_checks(out, mesh):
    """The compiled loop's program on the mesh (2 steps per call; stacked batches, or batches drawn inside): the
    kernels' custom-calls run on B/4 = 2 rows, and the batch is never all-gathered."""
    import re
    from seqjax import _chunked, _fit_support
    place = _fit_support.Placement(mesh, None, None)
    state = place.state(fresh())
    stacked = place.batch(_chunked.stack_batches("check", [draw(jax.random.key(i)) for i in range(2)]), stacked=True)
    for name, batch_fn, data in (("iterator", None, stacked), ("callable", draw, jnp.arange(2, dtype=jnp.int32))):
        hlo = _chunked._chunk.lower(state, jnp.int32(0), jnp.asarray(True), jnp.asarray(False), data,
                                    train_step=STEP, batch_fn=batch_fn, num_runs=None, seed=5, train_target=None,
                                    stop_run=False, place=place).compile().as_text()
        out[f"fit/hlo/{name}/all_gather"] = "all-gather" in hlo
        out[f"fit/hlo/{name}/kernel_calls"] = sorted(set(re.findall(
            r'custom_call_target="(seqjax_\w+)", operand_layout_constraints=\{(f32\[[0-9,]*\])', hlo)))


def restore_checks(out):
    """Saved from 4 devices (state replicated, an array sharded by rows), restored onto 2 and onto 1: same bits."""
    four = mesh_of(4)
    state = jax.device_put(fresh(), NamedSharding(four, P()))
    rows = jax.device_put(jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3), NamedSharding(four, P("b")))
    saved = {"state": state, "rows": rows, "key": jax.random.key(9)}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpoints(d, every=1)
        ckpt.save(1, saved, {})
        for n in (2, 1):
            mesh = mesh_of(n)
            like = {"state": jax.device_put(fresh(), NamedSharding(mesh, P())),
                    "rows": jax.device_put(jnp.zeros((8, 3)), NamedSharding(mesh, P("b"))), "key": jax.random.key(0)}
            got, _ = ckpt.restore(like)
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(jax.random.key_data(got["key"])) + jax.tree.leaves(got["state"])
                           + [got["rows"]], jax.tree.leaves(jax.random.key_data(saved["key"]))
                           + jax.tree.leaves(state) + [rows]))
            out[f"restore/{n}/same"] = same
            out[f"restore/{n}/rows_devices"] = len(got["rows"].sharding.device_set)
            out[f"restore/{n}/rows_spec"] = str(got["rows"].sharding.spec)
            out[f"restore/{n}/state_devices"] = len(got["state"].params["w"].sharding.device_set)
        ckpt.close()
