"""Runs seqjax sharded over 4 emulated CPU devices and prints what tests/test_sharding.py asserts, as JSON.

Run in a subprocess, since the device count is fixed when a process first
initialises JAX's CPU backend:
``XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_checks.py``.
Every check compares a sharded run with the same computation on one device
(committed to device 0, nothing sharded) and reports the largest absolute and
relative difference of the outputs and gradients.
"""
from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import seqjax
import sharded_fit_checks  # tests/sharded_fit_checks.py, next to this script
from seqjax import tbptt

B, T, I, H = 8, 6, 4, 16
CELLS = {"lstm": lambda: seqjax.lstm(H), "gru": lambda: seqjax.gru(H), "rnn": lambda: seqjax.rnn(H)}


def diff(got, want) -> float:
    """Largest |got - want| / (1 + |want|) over the leaves."""
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1 + np.abs(np.asarray(b))), initial=0))
               for a, b in pairs)


def single(tree):
    return jax.device_put(tree, jax.devices()[0])


def setup(name):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), input_size=I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    lengths = jnp.array([6, 3, 0, 1, 6, 2, 4, 5], jnp.int32)
    return cell, params, xs, lengths


def loss_of(cell, kernel, reverse=False):
    def loss(params, xs, lengths):
        carry, ys = seqjax.scan(cell, params, xs, lengths=lengths, kernel=kernel, reverse=reverse)
        return jnp.sum(ys ** 2) + jnp.sum(jax.tree.leaves(carry)[0] ** 3), ys
    return loss


def checks_for(name, kernel, out):
    cell, params, xs, lengths = setup(name)
    loss = loss_of(cell, kernel)
    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (l1, ys1), g1 = jax.jit(vg)(*single((params, xs, lengths)))
    want = (l1, ys1, g1)
    key = f"{name}/{kernel}"
    out[f"{key}/backend"] = seqjax.backends.explain(cell, params, xs, lengths=lengths, kernel=kernel).backend

    auto = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
    xs_a, l_a = jax.device_put((xs, lengths), NamedSharding(auto, P("b")))
    p_a = jax.device_put(params, NamedSharding(auto, P()))
    fwd = jax.jit(lambda p, x, l: seqjax.scan(cell, p, x, lengths=l, kernel=kernel))
    carry, ys = fwd(p_a, xs_a, l_a)
    out[f"{key}/auto/ys_spec"] = str(ys.sharding.spec)
    out[f"{key}/auto/carry_spec"] = str(jax.tree.leaves(carry)[0].sharding.spec)
    grad = jax.jit(vg)
    (l2, ys2), g2 = grad(p_a, xs_a, l_a)
    out[f"{key}/auto/diff"] = diff((l2, ys2, g2), want)
    hlo = grad.lower(p_a, xs_a, l_a).compile().as_text()
    out[f"{key}/auto/all_gather"] = "all-gather" in hlo
    # the kernels' custom-calls and the shapes of their first operand, e.g. "f32[2,6,4]": per shard, B/4 rows
    out[f"{key}/auto/kernel_calls"] = sorted(set(re.findall(
        r'custom_call_target="(seqjax_\w+)", operand_layout_constraints=\{(f32\[[0-9,]*\])', hlo)))

    def per_block(p, x, l):
        (value, ys), grads = vg(p, x, l)
        return jax.lax.psum(value, "b"), ys, grads
    sm = jax.jit(jax.shard_map(per_block, mesh=auto, in_specs=(P(), P("b"), P("b")),
                               out_specs=(P(), P("b"), (P(), P("b")))))
    out[f"{key}/shard_map/diff"] = diff(sm(p_a, xs_a, l_a), want)

    explicit = jax.make_mesh((4,), ("b",))
    xs_e, l_e = jax.device_put((xs, lengths), NamedSharding(explicit, P("b")))
    p_e = jax.device_put(params, NamedSharding(explicit, P()))
    with jax.set_mesh(explicit):
        (l3, ys3), g3 = jax.jit(vg)(p_e, xs_e, l_e)
    out[f"{key}/explicit/diff"] = diff((l3, ys3, g3), want)
    out[f"{key}/explicit/ys_spec"] = str(ys3.sharding.spec)


def fallback_checks(out):
    """Shardings of other axes than the batch: gathered, same results."""
    cell, params, xs, lengths = setup("lstm")
    vg = jax.jit(jax.value_and_grad(loss_of(cell, "auto", reverse=True), argnums=(0, 1), has_aux=True))
    want = vg(*single((params, xs, lengths)))
    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
    time_sharded = jax.device_put(xs[:, :4], NamedSharding(mesh, P(None, "b")))  # T=4 split over the devices
    want_t = vg(*single((params, xs[:, :4], jnp.minimum(lengths, 4))))
    out["fallback/time/diff"] = diff(vg(params, time_sharded, jnp.minimum(lengths, 4)), want_t)
    hidden = params._replace(w_h=jax.device_put(params.w_h, NamedSharding(mesh, P(None, "b"))))
    out["fallback/hidden/diff"] = diff(vg(hidden, jax.device_put(xs, NamedSharding(mesh, P("b"))), lengths), want)
    uneven = jax.device_put(xs[:6], NamedSharding(mesh, P()))  # 6 rows: replicated, 6 does not split in 4
    out["fallback/replicated/diff"] = diff(vg(params, uneven, lengths[:6]), vg(*single((params, xs[:6], lengths[:6]))))
    # vmap over a batch of sequences on a multi-device host: the kernel's own vmap rule
    run = jax.jit(jax.vmap(lambda x: seqjax.scan(cell, params, x)[1]))
    stacked = jnp.stack([xs, 2 * xs])
    out["vmap/diff"] = diff(run(stacked), jnp.stack([seqjax.scan(cell, params, x)[1] for x in stacked]))


def tbptt_checks(out):
    """`tbptt.fit(mesh=...)` against the same fit on one device, both per-window and scanned."""
    cell = seqjax.gru(H)
    vocab, Bt = 11, 8

    def model(params, carry, x, *, resets=None, key=None):
        carry, hs = seqjax.scan(cell, params["cell"], params["embed"][x], carry=carry, resets=resets,
                                time_major=True)
        return carry, hs @ params["out"]

    def loss_fn(logits, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    k = jax.random.split(jax.random.key(3), 3)
    params = {"cell": cell.init(k[0], input_size=8), "embed": jax.random.normal(k[1], (vocab, 8)),
              "out": 0.1 * jax.random.normal(k[2], (H, vocab))}
    stream = tbptt.batchify(np.asarray(jax.random.randint(jax.random.key(4), (Bt * 41,), 0, vocab)), Bt)
    resets = np.zeros(stream.shape, bool)
    resets[17] = True
    opt = optax.adam(1e-2)
    mesh = jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,))
    for k1, k2, scan_epoch in ((8, 8, False), (5, 8, True)):
        step = tbptt.make_step(model, loss_fn, opt, k1=k1, k2=k2)
        results = []
        for m in (None, mesh):
            state = seqjax.init_state(single(params), opt)
            h0 = single(jnp.zeros((Bt, H)))
            state, carry, history = tbptt.fit(step, state, tbptt.Stream(stream, resets=resets), initial_carry=h0,
                                              num_epochs=2, scan_epoch=scan_epoch, mesh=m)
            results.append((state.params, carry, [r["loss"] for r in history.train]))
        if not scan_epoch:  # stopped after window 7 on the mesh and resumed from its checkpoint: the same bits
            results.append(resumed_on_mesh(step, params, opt, tbptt.Stream(stream, resets=resets), Bt, mesh))
            out["tbptt/resume_on_mesh/same"] = all(
                np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(results[2]),
                                                                             jax.tree.leaves(results[1])))
        tag = f"tbptt/{k1}_{k2}_{'scan' if scan_epoch else 'loop'}"
        out[f"{tag}/diff"] = diff(results[1], results[0])
        out[f"{tag}/carry_spec"] = str(results[1][1].sharding.spec)
        out[f"{tag}/params_spec"] = str(results[1][0]["out"].sharding.spec)
        out[f"{tag}/steps"] = len(results[0][2])


def resumed_on_mesh(step, params, opt, stream, Bt, mesh):
    import tempfile
    from seqjax.checkpoint import Checkpoints
    with tempfile.TemporaryDirectory() as d:
        for stop in (7, None):
            state, carry, history = tbptt.fit(
                step, seqjax.init_state(single(params), opt), stream, initial_carry=single(jnp.zeros((Bt, H))),
                num_epochs=2, mesh=mesh, key=jax.random.key(0), checkpoint=Checkpoints(d, every=7),
                callback=lambda g, s, m: g == stop, callback_every=1)
    return state.params, carry, [r["loss"] for r in history.train]


def nnx_checks(out):
    """`make_nnx_train_step` with the model replicated and the batch sharded by `seqjax.sharding.data_parallel`."""
    from flax import nnx

    def make():
        model = seqjax.nnx.SequenceClassifier(seqjax.nnx.LSTM(I, H, rngs=nnx.Rngs(0)), 3, rngs=nnx.Rngs(1))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(model, batch):
        x, lengths, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(model(x, lengths=lengths), y).mean()

    _, _, xs, lengths = setup("lstm")
    lengths = jnp.maximum(lengths, 1)
    ys = jnp.arange(B) % 3
    step = seqjax.make_nnx_train_step(loss_fn)
    runs = []
    for parallel in (False, True):
        model, opt = make()
        batch = (xs, lengths, ys)
        if parallel:
            dp = seqjax.sharding.data_parallel(jax.make_mesh((4,), ("b",), axis_types=(AxisType.Auto,)))
            dp.replicate_nnx(model, opt)
            batch = dp.shard(batch)
        else:
            batch = single(batch)
        losses = []
        for _ in range(3):
            (model, opt), m = step((model, opt), batch)
            losses.append(float(m["loss"]))
        runs.append((nnx.state(model, nnx.Param), losses))
    out["nnx/diff"] = diff(runs[1], runs[0])


def main():
    assert jax.device_count() == 4, jax.devices()
    out = {"kernels_available": seqjax.backends._library.unavailable("avx2") is None}
    for name in CELLS:
        for kernel in ("auto", "xla"):
            checks_for(name, kernel, out)
    fallback_checks(out)
    tbptt_checks(out)
    nnx_checks(out)
    sharded_fit_checks.fit_checks(out)
    sharded_fit_checks.restore_checks(out)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
