"""Lever probes (GPU): Pallas kernels for the recurrence, against seqjax.scan's forward.

On the H100 every step of seqjax's scan is two kernels, a Triton GEMM and the gate
fusion (`bench/experiments/loop_kernels.py`), and at T=1000 a step costs about 4 µs whatever the
cell: the loop is launch-bound. Two ways out are probed here, forward pass only:

* "pallas step": the whole step (recurrent GEMM and gate arithmetic) as one Pallas
  (Triton) kernel per time step, gridded over blocks of ``--bh`` hidden units, writing
  its output straight into the stacked output buffer (aliased, in place). RNN and LSTM.
* "pallas persistent": the whole time loop inside one kernel (one program per 16 batch
  rows), the recurrent weights loaded once and kept on chip, as cuDNN's persistent
  kernels do. That needs W_h to fit in one SM's shared memory: RNN, GRU and (with W_h
  re-read from L2 every step) LSTM.
* "pallas grid-sync": cuDNN's multi-SM design for the LSTM. One program per block of ``--bh``
  hidden units keeps its columns of W_h on chip, and all programs step together through a
  grid barrier (atomic step counters and a spin loop). ``--gridsync-parts`` builds parts of
  the barrier only, for diagnosis. On the H100 the spin loop crashed Triton's compiler.

The results and the decision are in docs/design/performance.md (the GPU).

    python bench/experiments/pallas_step.py [--cells rnn,lstm,gru] [--shapes long,standard] [--impls ...]
    python bench/experiments/pallas_step.py --interpret --quick     # CPU: Pallas' interpreter, numerics only

Writes <out>/<name>.json and prints a table (a kernel that fails to compile, e.g. for
lack of shared memory, is a row marked failed).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/: common, peers
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

import seqjax  # noqa: E402


def _lstm_update(gate, c):
    """One LSTM step from ``gate(k)``, the pre-activation of gate k in the order (i, f, g, o): (c, h)."""
    c = jax.nn.sigmoid(gate(1)) * c + jax.nn.sigmoid(gate(0)) * jnp.tanh(gate(2))
    return c, jax.nn.sigmoid(gate(3)) * jnp.tanh(c)


def _rnn_kernel(t_ref, xp_ref, h_ref, w_ref, ys_in_ref, h_out_ref, ys_ref, *, bh):
    j = pl.program_id(0)
    t = t_ref[()]
    cols = pl.ds(j * bh, bh)
    a = plgpu.dot(h_ref[...], w_ref[...]) + xp_ref[t, :, cols]
    h = jnp.tanh(a)
    h_out_ref[...] = h
    ys_ref[t, :, cols] = h


def _lstm_kernel(t_ref, xp_ref, h_ref, c_ref, wi_ref, wf_ref, wg_ref, wo_ref, ys_in_ref,
                 h_out_ref, c_out_ref, ys_ref, *, bh, H):
    j = pl.program_id(0)
    t = t_ref[()]
    h = h_ref[...]

    w_refs = (wi_ref, wf_ref, wg_ref, wo_ref)

    def gate(k):
        return plgpu.dot(h, w_refs[k][...]) + xp_ref[t, :, pl.ds(k * H + j * bh, bh)]
    c, hn = _lstm_update(gate, c_ref[...])
    c_out_ref[...] = c
    h_out_ref[...] = hn
    ys_ref[t, :, pl.ds(j * bh, bh)] = hn


def _gate_weights(w_h):
    """[H, G*H] -> G per-gate [H, H] blocks."""
    H = w_h.shape[0]
    return [w_h[:, k * H:(k + 1) * H] for k in range(w_h.shape[1] // H)]


def _full(shape):
    return pl.BlockSpec(shape, lambda j: (0,) * len(shape))


def rnn_forward(xp, h0, w_h, *, bh=32, unroll=8, interpret=False):
    """Elman RNN forward over a hoisted projection. xp: [T, B, H] f32; returns ys [T, B, H]."""
    T, B, H = xp.shape
    step = pl.pallas_call(
        functools.partial(_rnn_kernel, bh=bh), grid=(H // bh,),
        in_specs=[pl.BlockSpec((), lambda j: ()), _full(xp.shape), _full((B, H)),
                  pl.BlockSpec((H, bh), lambda j: (0, j)), _full(xp.shape)],
        out_specs=[pl.BlockSpec((B, bh), lambda j: (0, j)), _full(xp.shape)],
        out_shape=[jax.ShapeDtypeStruct((B, H), xp.dtype), jax.ShapeDtypeStruct(xp.shape, xp.dtype)],
        input_output_aliases={4: 1}, interpret=interpret, name="rnn_step")

    def body(carry, _):
        t, h, ys = carry
        h, ys = step(t, xp, h, w_h, ys)
        return (t + 1, h, ys), None
    (_, _, ys), _ = jax.lax.scan(body, (jnp.int32(0), h0, jnp.zeros_like(xp)), None, length=T, unroll=unroll)
    return ys


def lstm_forward(xp, h0, c0, w_h, *, bh=32, unroll=8, interpret=False):
    """LSTM forward (gates i, f, g, o) over a hoisted projection. xp: [T, B, 4H] f32; ys [T, B, H]."""
    T, B, H4 = xp.shape
    H = H4 // 4
    ws = _gate_weights(w_h)
    ys_shape = (T, B, H)
    wspec = pl.BlockSpec((H, bh), lambda j: (0, j))
    step = pl.pallas_call(
        functools.partial(_lstm_kernel, bh=bh, H=H), grid=(H // bh,),
        in_specs=[pl.BlockSpec((), lambda j: ()), _full(xp.shape), _full((B, H)),
                  pl.BlockSpec((B, bh), lambda j: (0, j)), wspec, wspec, wspec, wspec, _full(ys_shape)],
        out_specs=[pl.BlockSpec((B, bh), lambda j: (0, j)), pl.BlockSpec((B, bh), lambda j: (0, j)),
                   _full(ys_shape)],
        out_shape=[jax.ShapeDtypeStruct((B, H), xp.dtype)] * 2 + [jax.ShapeDtypeStruct(ys_shape, xp.dtype)],
        input_output_aliases={8: 2}, interpret=interpret, name="lstm_step")

    def body(carry, _):
        t, h, c, ys = carry
        h, c, ys = step(t, xp, h, c, *ws, ys)
        return (t + 1, h, c, ys), None
    init = (jnp.int32(0), h0, c0, jnp.zeros(ys_shape, xp.dtype))
    (_, _, _, ys), _ = jax.lax.scan(body, init, None, length=T, unroll=unroll)
    return ys


def _rnn_persistent_kernel(xp_ref, h0_ref, w_ref, ys_ref, hT_ref, *, bb):
    rows = pl.ds(pl.program_id(0) * bb, bb)
    w = w_ref[...]

    def body(t, h):
        h = jnp.tanh(plgpu.dot(h, w) + xp_ref[t, rows, :])
        ys_ref[t, rows, :] = h
        return h
    hT_ref[rows, :] = jax.lax.fori_loop(0, xp_ref.shape[0], body, h0_ref[rows, :])


def _lstm_persistent_kernel(xp_ref, h0_ref, c0_ref, wi_ref, wf_ref, wg_ref, wo_ref, ys_ref, hT_ref, cT_ref, *, bb):
    rows = pl.ds(pl.program_id(0) * bb, bb)
    H = h0_ref.shape[1]

    def body(t, hc):
        h, c = hc

        # The 4 H x H f32 blocks of W do not fit in shared memory: W is re-read (from L2) every step.
        # The row offset min(t, 0) is always 0 but depends on t, so Triton cannot hoist the load.
        w_rows = pl.ds(jnp.minimum(t, 0), H)

        w_refs = (wi_ref, wf_ref, wg_ref, wo_ref)

        def gate(k):
            return plgpu.dot(h, w_refs[k][w_rows, :]) + xp_ref[t, rows, pl.ds(k * H, H)]
        c, h = _lstm_update(gate, c)
        ys_ref[t, rows, :] = h
        return h, c
    h, c = jax.lax.fori_loop(0, xp_ref.shape[0], body, (h0_ref[rows, :], c0_ref[rows, :]))
    hT_ref[rows, :] = h
    cT_ref[rows, :] = c


def _gru_persistent_kernel(xp_ref, h0_ref, bhn_ref, wr_ref, wz_ref, wn_ref, ys_ref, hT_ref, *, bb):
    rows = pl.ds(pl.program_id(0) * bb, bb)
    H = h0_ref.shape[1]
    wr, wz, wn, bhn = wr_ref[...], wz_ref[...], wn_ref[...], bhn_ref[...]

    def body(t, h):
        def px(k):
            return xp_ref[t, rows, pl.ds(k * H, H)]
        r = jax.nn.sigmoid(px(0) + plgpu.dot(h, wr))
        z = jax.nn.sigmoid(px(1) + plgpu.dot(h, wz))
        n = jnp.tanh(px(2) + r * (plgpu.dot(h, wn) + bhn[None, :]))
        h = (1.0 - z) * n + z * h
        ys_ref[t, rows, :] = h
        return h
    hT_ref[rows, :] = jax.lax.fori_loop(0, xp_ref.shape[0], body, h0_ref[rows, :])


def _lstm_gridsync_kernel(xp_ref, c0_ref, wi_ref, wf_ref, wg_ref, wo_ref, hbuf_in_ref, flags_in_ref,
                          hbuf_ref, flags_ref, cT_ref, *, bh, P, sync_threads, parts):
    """One program per block of ``bh`` hidden units, all resident, in step through a grid barrier.

    hbuf [T+1, B, H] holds h_0 (row 0) and every h_t; flags [P] int32 (zeros) counts
    the steps each program has finished. Program j keeps its gate columns of W_h on
    chip and its block of c in registers; every step it reads the whole h_{t-1}.
    """
    j = pl.program_id(0)
    H = c0_ref.shape[1]
    cols = pl.ds(j * bh, bh)
    ws = [w_ref[...] for w_ref in (wi_ref, wf_ref, wg_ref, wo_ref)]

    def body(t, c):
        h = plgpu.load(hbuf_ref.at[t], volatile=True) if "volatile" in parts else hbuf_ref[t]

        def gate(k):
            return plgpu.dot(h, ws[k]) + xp_ref[t, :, pl.ds(k * H + j * bh, bh)]
        c, h_t = _lstm_update(gate, c)
        hbuf_ref[t + 1, :, cols] = h_t
        # grid barrier: every thread's stores done, then publish "step t done" (release) and wait for all
        if sync_threads and "barrier" in parts:  # (the interpreter has no threads)
            plgpu.debug_barrier()
        if "publish" in parts:
            plgpu.atomic_add(flags_ref, (j,), jnp.int32(1))  # flags[j]: the steps program j has finished
        if "spin" in parts:
            zeros = jnp.zeros((P,), jnp.int32)
            jax.lax.while_loop(lambda seen: jnp.min(seen) < t + 1,
                               lambda _: plgpu.atomic_add(flags_ref, (pl.ds(0, P),), zeros),
                               plgpu.atomic_add(flags_ref, (pl.ds(0, P),), zeros))
        if sync_threads and "barrier" in parts:
            plgpu.debug_barrier()
        return c
    cT_ref[:, cols] = jax.lax.fori_loop(0, xp_ref.shape[0], body, c0_ref[:, cols])


GRIDSYNC_PARTS = ("volatile", "barrier", "publish", "spin")


def gridsync_lstm_forward(xp, h0, c0, w_h, *, bh=32, num_warps=4, interpret=False, parts=GRIDSYNC_PARTS):
    """LSTM forward as one persistent kernel over H // bh programs with a grid barrier per step. ys [T, B, H]."""
    T, B, _ = xp.shape
    H = h0.shape[1]
    P = 1 if interpret else H // bh  # the interpreter runs programs one after another: one program only
    bh = H // P
    hbuf = jnp.zeros((T + 1, B, H), xp.dtype).at[0].set(h0)
    wspec = pl.BlockSpec((H, bh), lambda j: (0, j))
    call = pl.pallas_call(
        functools.partial(_lstm_gridsync_kernel, bh=bh, P=P, sync_threads=not interpret,
                          parts=tuple(parts)), grid=(P,),
        in_specs=[_full(xp.shape), _full(c0.shape), wspec, wspec, wspec, wspec, _full(hbuf.shape), _full((P,))],
        out_specs=[_full(hbuf.shape), _full((P,)), _full(c0.shape)],
        out_shape=[jax.ShapeDtypeStruct(hbuf.shape, xp.dtype), jax.ShapeDtypeStruct((P,), jnp.int32),
                   jax.ShapeDtypeStruct(c0.shape, xp.dtype)],
        input_output_aliases={6: 0, 7: 1},
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="lstm_gridsync")
    ws = _gate_weights(w_h)
    return call(xp, c0, *ws, hbuf, jnp.zeros((P,), jnp.int32))[0][1:]


def persistent_forward(cell_name, xp, h0, w_h, b_hn=None, *, bb=16, num_warps=8, num_stages=None, interpret=False):
    """The whole time loop in one kernel, one program per block of ``bb`` batch rows. ys [T, B, H]."""
    T, B, _ = xp.shape
    H = h0.shape[1]
    out = jax.ShapeDtypeStruct((B, H), xp.dtype)
    ys = jax.ShapeDtypeStruct((T, B, H), xp.dtype)
    if cell_name == "rnn":
        kernel, args, outs = _rnn_persistent_kernel, (xp, h0, w_h), [ys, out]
    elif cell_name == "gru":
        kernel, args = _gru_persistent_kernel, (xp, h0, b_hn, *_gate_weights(w_h))
        outs = [ys, out]
    else:
        kernel, args = _lstm_persistent_kernel, (xp, h0, h0, *_gate_weights(w_h))
        outs = [ys, out, out]
    call = pl.pallas_call(
        functools.partial(kernel, bb=bb), grid=(B // bb,),
        in_specs=[_full(a.shape) for a in args], out_specs=[_full(o.shape) for o in outs], out_shape=outs,
        compiler_params=None if interpret else plgpu.CompilerParams(
            num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages})),
        interpret=interpret, name=f"{cell_name}_persistent")
    return call(*args)[0]


def seqjax_cell(cell_name, H):
    return {"lstm": lambda: seqjax.lstm(H, forget_bias=0.0), "rnn": lambda: seqjax.rnn(H),
            "gru": lambda: seqjax.gru(H, bias_init=jax.nn.initializers.normal(0.1))}[cell_name]()


def pallas_run(cell_name, params, x, bh, interpret, persistent=False, num_warps=8, num_stages=None,
               gridsync=False, gridsync_parts=GRIDSYNC_PARTS):
    """The probe's forward with seqjax's params: x [B, T, I] -> ys [B, T, H]."""
    B, T, I = x.shape
    xp = (x.swapaxes(0, 1).reshape(T * B, I) @ params.w_x + params.b).reshape(T, B, -1)
    H = params.w_h.shape[0]
    h0 = jnp.zeros((B, H), x.dtype)
    if gridsync:
        if cell_name != "lstm":
            raise NotImplementedError("the grid-barrier probe covers the lstm")
        return gridsync_lstm_forward(xp, h0, h0, params.w_h, bh=bh, num_warps=num_warps, interpret=interpret,
                                     parts=gridsync_parts).swapaxes(0, 1)
    if not persistent and cell_name == "gru":
        raise NotImplementedError("the per-step probe covers rnn and lstm")
    if persistent:
        ys = persistent_forward(cell_name, xp, h0, params.w_h, getattr(params, "b_hn", None),
                                num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    elif cell_name == "rnn":
        ys = rnn_forward(xp, h0, params.w_h, bh=bh, interpret=interpret)
    else:
        ys = lstm_forward(xp, h0, h0, params.w_h, bh=bh, interpret=interpret)
    return ys.swapaxes(0, 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="rnn,lstm")
    ap.add_argument("--shapes", default="long,standard")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--bh", type=int, default=32, help="hidden units per program")
    ap.add_argument("--num-warps", type=int, default=8, help="warps of the persistent kernel")
    ap.add_argument("--num-stages", type=int, default=None, help="Triton pipeline stages of the persistent kernel")
    ap.add_argument("--gridsync-parts", default=",".join(GRIDSYNC_PARTS),
                    help="the grid barrier's parts to build (diagnosis; all are needed for correct results)")
    ap.add_argument("--impls", default="pallas step,pallas persistent,pallas grid-sync")
    ap.add_argument("--interpret", action="store_true", help="run the kernels in Pallas' interpreter (CPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="pallas_step")
    args = ap.parse_args(argv)
    shapes = {"q": (16, 12, 8, 64)} if args.quick else {k: common.SHAPES[k] for k in args.shapes.split(",")}
    rows = []
    for cell_name in args.cells.split(","):
        for sname, (B, T, I, H) in shapes.items():
            cell = seqjax_cell(cell_name, H)
            params = cell.init(jax.random.key(0), I)
            x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
            runs = {"seqjax.scan": lambda p, x: seqjax.scan(cell, p, x)[1],
                    "pallas step": lambda p, x: pallas_run(cell_name, p, x, args.bh, args.interpret),
                    "pallas persistent": lambda p, x: pallas_run(cell_name, p, x, args.bh, args.interpret, True,
                                                                 args.num_warps, args.num_stages),
                    "pallas grid-sync": lambda p, x: pallas_run(cell_name, p, x, args.bh, args.interpret,
                                                                num_warps=args.num_warps, gridsync=True,
                                                                gridsync_parts=args.gridsync_parts.split(","))}
            runs = {k: v for k, v in runs.items() if k == "seqjax.scan" or k in args.impls.split(",")}
            fns, outs = {}, {}
            for name, f in list(runs.items()):
                try:
                    c = common.compile_timed(f, params, x)
                except Exception as e:  # noqa: BLE001 - e.g. the kernel's shared memory exceeds the chip's
                    why = f"{type(e).__name__}: {e}".strip()
                    print(f"{cell_name} {sname} {name}: failed: {why.splitlines()[0][:300]}")
                    rows.append(dict(cell=cell_name, shape=sname, impl=name, failed=why[:2000],
                                     traceback=traceback.format_exc()[-3000:]))
                    del runs[name]
                    continue
                outs[name] = np.asarray(c["compiled"](params, x))
                fns[name] = (lambda c=c["compiled"]: c(params, x))
                rows.append(dict(cell=cell_name, shape=sname, impl=name, compile_s=c["compile_s"]))
            samples = common.interleave(fns, reps=3 if args.quick else args.reps)
            for r in rows:
                if (r["cell"], r["shape"]) != (cell_name, sname) or "failed" in r:
                    continue
                r.update(common.summarise(samples[r["impl"]]),
                         max_abs_diff=float(np.abs(outs[r["impl"]] - outs["seqjax.scan"]).max()))
    print(common.markdown_table(["cell", "shape", "impl", "fwd median ms", "compile s", "max |diff|"],
                                [[r["cell"], r["shape"], r["impl"], r.get("median_ms", "failed"),
                                  r.get("compile_s", "-"), r.get("max_abs_diff", "-")] for r in rows]))
    common.write_json(os.path.join(args.out, f"{args.name}.json"), dict(rows=rows, bh=args.bh))


if __name__ == "__main__":
    main()
