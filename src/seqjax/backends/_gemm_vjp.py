"""The whole-sequence-GEMM gradient of a scan: the custom VJP `seqjax.scan` uses by default.

Autodiff of `jax.lax.scan` accumulates the weight gradients inside the backward
loop: every step adds ``h_{t-1}^T @ dA_t`` (a [H, B] x [B, G*H] GEMM with only B
rows to reduce over) to a running sum, likewise ``x_t^T @ dA_t``, and computes
``dx_t = dA_t @ W_x^T``. The custom VJP here instead

* runs the forward loop once, saving per step exactly what the backward needs
  (gate activations, the start cell state, tanh(c));
* runs one reverse loop over the **state** cotangents only: per step the gate
  arithmetic and one GEMM ``dA_t @ W_h^T``, emitting the pre-activation
  gradients ``dA_t``;
* then computes ``dW_x = X^T dA``, ``dW_h = H_prev^T dA``, ``db = sum dA`` and
  ``dX = dA W_x^T`` as single GEMMs over all T*B rows.

On the 2-core CPU this cut the train step by 8-50 % against autodiff of the same
loop (docs/design/performance.md). The trade-off of a `jax.custom_vjp`: reverse
mode (`jax.grad`, `jax.vjp`) works, forward mode (`jax.jvp`, `jax.jacfwd`,
`jax.hessian`) raises; ``seqjax.scan(..., backward="autodiff")`` keeps forward mode.

Covered (`fusable`): every LSTM variant of `seqjax.lstm` with named activations (tanh, identity, relu or
sigmoid; not a callable), with or without peepholes and projection (Greff et al.'s variants except
FGR), the GRU in both forms and the Elman RNN (tanh or relu), with params all of one dtype: float32,
float64, or a 16-bit float (bfloat16 or float16: the gate arithmetic and the cotangents run in
float32, as in the cells, and the carry, the outputs and the gradients come back in the params'
dtype). ``lengths`` (as a [T, B] validity mask), ``resets``, ``reverse``, a given initial carry and the hoisted
projection have the same semantics as in `seqjax.scan`.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from seqjax._checkpoint import Binomial, backward, forward, put, take
from seqjax._vma import explicit_replicated, match_varying
from seqjax.cells.base import Array, Cell, compute_dtype, form_of, matmul
from seqjax.cells.gru import GRUParams
from seqjax.cells.lstm import ACTIVATIONS as LSTM_ACTIVATIONS
from seqjax.cells.lstm import LSTMCarry, LSTMParams, LSTMSpec
from seqjax.cells.rnn import ACTIVATIONS as RNN_ACTIVATIONS
from seqjax.cells.rnn import RNNParams

__all__ = ["LSTMSpec", "fusable", "fused_scan", "native_kind"]


def fusable(cell: Cell, params) -> str | LSTMSpec | None:
    """The fused kernel that computes ``cell``, or None.

    Returns an `LSTMSpec` for the LSTM variants, ``"gru"`` (``reset_after=True``),
    ``"gru_cho"`` (``reset_after=False``), ``"rnn_tanh"`` or ``"rnn_relu"``.
    Qualify: cells built by `seqjax.lstm` (every variant with named activations,
    with or without peepholes and ``proj_size``: all of Greff et al.'s except
    FGR), `seqjax.gru` (both forms) and `seqjax.rnn` (tanh or relu),
    whose ``project`` and ``step`` are unchanged (`seqjax.cells.base.form_of`), with params
    of the cell's family, all of one dtype: float32, float64, bfloat16 or float16.
    """
    form = form_of(cell)
    if form is None or form.kind is None:
        return None
    kind = form.kind
    dtypes = {jnp.result_type(a) for a in jax.tree.leaves(params)}
    if len(dtypes) != 1 or dtypes.pop() not in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16):
        return None
    if isinstance(kind, LSTMSpec):
        H = cell.hidden_size
        if not isinstance(params, LSTMParams) or params.w_gates is not None:
            return None
        if params.w_h.shape[-1] != len(kind.gates()) * H:
            return None
        if params.peep is not None and params.peep.shape != (len(kind.sigmoid_gates()), H):
            return None
        return kind
    if kind.startswith("gru"):  # reset_after=True has the separate b_hn, Cho's form has none
        return kind if isinstance(params, GRUParams) and (params.b_hn is None) == (kind == "gru_cho") else None
    return kind if isinstance(params, RNNParams) else None


# Greff et al.'s LSTM variants that change one thing (NP is the standard LSTM) -> the native kernels' kind
_LSTM_KINDS = {LSTMSpec(): "lstm", LSTMSpec(input_gate=False): "lstm_nig", LSTMSpec(forget_gate=False): "lstm_nfg",
               LSTMSpec(output_gate=False): "lstm_nog", LSTMSpec(coupled=True): "lstm_cifg",
               LSTMSpec(input_activation="identity"): "lstm_niaf", LSTMSpec(output_activation="identity"): "lstm_noaf"}


def native_kind(cell: Cell, params, kinds, lstm_extras: bool, no_form: str,
                what: str, peepholes: bool = False) -> tuple[str | None, str | None]:
    """A native kernel's kind for ``cell``: ``(kind, None)``, or ``(None, why not)``.

    The kind is `fusable`'s, with "lstm" for the standard LSTM (all gates, tanh
    activations, no gate recurrence; with ``lstm_extras`` also with peepholes
    and/or a projection) and "lstm_nig", "lstm_nfg", "lstm_nog", "lstm_cifg",
    "lstm_niaf" or "lstm_noaf" for Greff et al.'s variants of it (not with
    ``lstm_extras``); with ``peepholes`` these LSTMs may have peepholes. The kind
    must be in ``kinds`` and the params float32.
    ``no_form`` finishes "... have no form of <cell>" when the kind is missing;
    ``what`` names the kernels in the messages.
    """
    form = form_of(cell)
    if form is not None and form.layers is not None:
        return None, "a stacked cell runs layer by layer (each layer is checked on its own)"
    kind = fusable(cell, params)
    if isinstance(kind, LSTMSpec):
        if lstm_extras:
            kind = "lstm" if kind == LSTMSpec() else None
        elif params.w_proj is not None or (params.peep is not None and not peepholes):
            kind = None
        else:
            kind = _LSTM_KINDS.get(kind)
    if kind not in kinds:
        return None, f"{what} have no form of {cell.name} ({no_form})"
    dtypes = {jnp.result_type(a) for a in jax.tree.leaves(params)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        return None, f"{what} are float32 only, got params of dtype(s) {sorted(map(str, dtypes))}"
    return kind, None


# ----------------------------------------------------------------------------- per-cell steps
# forward:  (params, start_carry, pre) -> (new_carry, y, residuals_t); ``pre`` is the
#           pre-activation a = x W_x + h W_h + b, or (x W_x + b, h W_h) for the GRU, or
#           (x W_x + b, h W_h[:, :2H], W_h[:, 2H:]) for Cho's GRU (its n gate needs r first).
# backward: (params, wT, residuals_t, d new carry, d y_t) -> (dpx_t, extra_t, d start carry);
#           wT: the transposed weights; extra_t: a dict of what the whole-sequence gradients need
#           besides dpx: the GRU's d(h W_hn); the LSTMP's dh_t and o_t * tanh(c_t); the peepholes'
#           per-step batch sums.

def _h(kind, carry):
    return carry.h if isinstance(kind, LSTMSpec) else carry


# the derivative of each named activation of seqjax.lstm and seqjax.rnn, from the activation's output y
_DERIVATIVES = {
    "tanh": lambda y: 1 - y * y,
    "identity": lambda y: 1.0,
    "sigmoid": lambda y: y * (1 - y),
    "relu": lambda y: (y > 0).astype(y.dtype),  # 0 at 0, as jax.nn.relu's gradient
}


def _lstm_fwd(spec: LSTMSpec):
    col = {g: k for k, g in enumerate(spec.gates())}
    row = {g: k for k, g in enumerate(spec.sigmoid_gates())}
    in_act, out_act = LSTM_ACTIVATIONS[spec.input_activation], LSTM_ACTIVATIONS[spec.output_activation]

    def fwd(p, start, a):
        H, c0 = start.c.shape[-1], start.c.astype(a.dtype)

        def gate(g, c):
            pre = a[:, col[g] * H:(col[g] + 1) * H]
            return jax.nn.sigmoid(pre if p.peep is None else pre + p.peep[row[g]] * c)

        i = gate("i", c0) if spec.input_gate else None
        f = gate("f", c0) if "f" in col else None
        a_g = a[:, col["g"] * H:(col["g"] + 1) * H]
        g = in_act(a_g)
        c = _f_value(spec, i, f) * c0 + (g if i is None else i * g)
        o = gate("o", c) if spec.output_gate else None
        oc = out_act(c)
        h = oc if o is None else o * oc
        if p.w_proj is not None:
            h = matmul(h, p.w_proj)
        pd = p.w_h.dtype  # the carry's dtype (16-bit params: the gate arithmetic above ran in float32)
        h = h.astype(pd)
        return LSTMCarry(h, c.astype(pd)), h, (i, f, g, o, c0, oc)

    return fwd


def _f_value(spec, i, f):
    """The forget gate's value: computed, 1 - i (CIFG) or 1 (NFG)."""
    return 1.0 - i if spec.coupled else (1.0 if f is None else f)


def _lstm_back(spec: LSTMSpec):
    d_in, d_out = _DERIVATIVES[spec.input_activation], _DERIVATIVES[spec.output_activation]

    def back(p, wT, res, dnew, dy):
        i, f, g, o, c0, oc = res
        dh = dnew.h + dy
        extra = {}
        if p.w_proj is not None:
            extra.update(dh=dh, h_full=oc if o is None else o * oc)
            dh = matmul(dh, wT["w_proj"])
        d_oc = d_out(oc)
        da = {}
        if o is None:
            dc = dnew.c + dh * d_oc
        else:
            da["o"] = dh * oc * o * (1 - o)
            dc = dnew.c + dh * o * d_oc
            if p.peep is not None:
                dc = dc + da["o"] * p.peep[-1]
        da["g"] = (dc if i is None else dc * i) * d_in(g)
        if i is not None:
            da["i"] = dc * (g - c0 if spec.coupled else g) * i * (1 - i)
        if f is not None:
            da["f"] = dc * c0 * f * (1 - f)
        fv = _f_value(spec, i, f)
        dc0 = dc * fv
        if p.peep is not None:
            for k, gname in enumerate(spec.sigmoid_gates()):
                if gname != "o":
                    dc0 = dc0 + da[gname] * p.peep[k]
            c = fv * c0 + (g if i is None else i * g)  # peephole grads: batch sums of dA * c_{t-1} (i, f), dA * c_t (o)
            extra["peep"] = jnp.stack([jnp.sum(da[gname] * (c if gname == "o" else c0), 0)
                                       for gname in spec.sigmoid_gates()])
        da = jnp.concatenate([da[gname] for gname in spec.gates()], -1)
        return da, extra, LSTMCarry(matmul(da, wT["w_h"]), dc0)

    return back


def _gru_fwd(p, h0, pre):
    px, gh = pre
    H = h0.shape[-1]
    r = jax.nn.sigmoid(px[:, :H] + gh[:, :H])
    z = jax.nn.sigmoid(px[:, H:2 * H] + gh[:, H:2 * H])
    hn = gh[:, 2 * H:] + p.b_hn
    n = jnp.tanh(px[:, 2 * H:] + r * hn)
    h = ((1 - z) * n + z * h0).astype(p.w_h.dtype)
    return h, h, (r, z, n, hn, h0)


def _gru_back(p, wT, res, dnew, dy):
    r, z, n, hn, h0 = res
    dh = dnew + dy
    dn = dh * (1 - z) * (1 - n * n)           # d pre-activation of n
    dz = dh * (h0 - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dpx = jnp.concatenate([dr, dz, dn], -1)
    dgh = jnp.concatenate([dr, dz, dn * r], -1)
    return dpx, {"dghn": dn * r}, matmul(dgh, wT["w_h"]) + dh * z


def _gru_cho_fwd(p, h0, pre):
    px, gh_rz, w_hn = pre
    H = h0.shape[-1]
    r = jax.nn.sigmoid(px[:, :H] + gh_rz[:, :H])
    z = jax.nn.sigmoid(px[:, H:2 * H] + gh_rz[:, H:])
    n = jnp.tanh(px[:, 2 * H:] + matmul(r * h0, w_hn))
    h = ((1 - z) * n + z * h0).astype(p.w_h.dtype)
    return h, h, (r, z, n, h0)


def _gru_cho_back(p, wT, res, dnew, dy):
    r, z, n, h0 = res
    dh = dnew + dy
    dn = dh * (1 - z) * (1 - n * n)           # d pre-activation of n
    dz = dh * (h0 - n) * z * (1 - z)
    drh = matmul(dn, wT["w_hn"])              # d (r * h0)
    dr = drh * h0 * r * (1 - r)
    dh0 = dh * z + drh * r + matmul(jnp.concatenate([dr, dz], -1), wT["w_hrz"])
    return jnp.concatenate([dr, dz, dn], -1), {"rh": r * h0}, dh0


def _rnn_fwd(act_name):
    act = RNN_ACTIVATIONS[act_name]

    def fwd(p, h0, a):
        h = act(a)
        out = h.astype(p.w_h.dtype)
        return out, out, h
    return fwd


def _rnn_back(act_name):
    derivative = _DERIVATIVES[act_name]

    def back(p, wT, h, dnew, dy):
        da = (dnew + dy) * derivative(h)
        return da, {}, matmul(da, wT["w_h"])
    return back


_FWD = {"gru": _gru_fwd, "gru_cho": _gru_cho_fwd, "rnn_tanh": _rnn_fwd("tanh"), "rnn_relu": _rnn_fwd("relu")}
_BACK = {"gru": _gru_back, "gru_cho": _gru_cho_back, "rnn_tanh": _rnn_back("tanh"), "rnn_relu": _rnn_back("relu")}


def _step_fns(kind):
    """``(forward step, backward step)`` of a kernel (`fusable`'s result)."""
    if isinstance(kind, LSTMSpec):
        return _lstm_fwd(kind), _lstm_back(kind)
    return _FWD[kind], _BACK[kind]


def _transposed(kind, params) -> dict:
    """The weights the backward steps multiply by, transposed once outside the loop."""
    if kind == "gru_cho":
        H = params.w_h.shape[0]
        return {"w_hrz": params.w_h[:, :2 * H].T, "w_hn": params.w_h[:, 2 * H:].T}
    return {name: getattr(params, name).T for name in ("w_h", "w_proj") if getattr(params, name, None) is not None}


def _where(mask, a, b):
    return jax.tree.map(lambda u, v: jnp.where(mask[:, None], u, v), a, b)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _pre_activation(kind, params, hoist):
    """``(h, x_t or px_t) -> pre`` for `_FWD`; not hoisted, LSTM and RNN use one fused [x, h] GEMM per step."""
    if kind == "gru":
        return lambda h, x: (x if hoist else matmul(x, params.w_x) + params.b, matmul(h, params.w_h))
    if kind == "gru_cho":
        H = params.w_h.shape[0]
        w_hrz, w_hn = params.w_h[:, :2 * H], params.w_h[:, 2 * H:]
        return lambda h, x: (x if hoist else matmul(x, params.w_x) + params.b, matmul(h, w_hrz), w_hn)
    if hoist:
        return lambda h, px: px + matmul(h, params.w_h)
    w = jnp.concatenate([params.w_x, params.w_h], axis=0)
    return lambda h, x: matmul(jnp.concatenate([x.astype(h.dtype), h], axis=-1), w) + params.b


def _inputs(params, xs, hoist):
    return matmul(xs, params.w_x) + params.b if hoist else xs


def _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, unroll=1, keep=None):
    """The forward recurrence: ``(final, ys)``, or with ``keep`` ``(final, (ys, saved, h_start))``.

    ``keep="residuals"``: saved = every step's residuals, h_start = every step's
    start h if lengths or resets make it differ from the previous output (else
    None). ``keep="starts"`` (remat): saved = every step's start carry only.
    """
    step = _step_fns(kind)[0]
    pre = _pre_activation(kind, params, hoist)
    zero = _zeros(carry0)
    keep_h = keep == "residuals" and (valid is not None or resets is not None)

    def body(carry, inp):
        x, v, r = inp
        start = carry if r is None else _where(r, zero, carry)
        new, y, res = step(params, start, pre(_h(kind, start), x))
        if v is not None:
            new = _where(v, new, carry)
            y = jnp.where(v[:, None], y, jnp.zeros((), y.dtype))
        if keep is None:
            return new, y
        if keep == "starts":
            return new, (y, start, None)
        return new, (y, res, _h(kind, start) if keep_h else None)

    return jax.lax.scan(body, carry0, (_inputs(params, xs, hoist), valid, resets), reverse=reverse, unroll=unroll)


def _start_h(ys, h0, reverse):
    """The h each step started from, [T, B, H], when no lengths or resets intervene."""
    if reverse:  # step t started from step t+1's output; the last step from h0
        return jnp.concatenate([ys, h0[None]], axis=0)[1:]
    return jnp.concatenate([h0[None], ys], axis=0)[:ys.shape[0]]


@partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7, 8, 9, 10))
def _fused(kind, params, xs, carry0, valid, resets, reverse, hoist, remat, unroll, sizes):
    return _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, unroll)


def _fused_fwd(kind, params, xs, carry0, valid, resets, reverse, hoist, remat, unroll, sizes):
    if sizes:
        return _checkpointed_fwd(kind, params, xs, carry0, valid, resets, reverse, hoist, unroll, sizes)
    final, (ys, saved, h_start) = _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, unroll,
                                        keep="starts" if remat else "residuals")
    if remat:
        h_start = _h(kind, saved)
    elif h_start is None:
        h_start = _start_h(ys, _h(kind, carry0), reverse)
    return (final, ys), (params, xs, saved, h_start, valid, resets)


def _state_backward(kind, params, wT, per_step, residuals, dys, valid, resets, dfinal, reverse, unroll, ct):
    """The reverse recurrence of the state cotangents: ``(d start carry, dpx [T, B, K], extra)``."""
    back = _step_fns(kind)[1]

    def body(dcarry, inp):
        r_t, dy, v, rs = inp
        r_t = residuals(r_t)
        dy = dy.astype(ct)
        if v is not None:
            dnew = _where(v, dcarry, _zeros(dcarry))
            dy = jnp.where(v[:, None], dy, jnp.zeros((), dy.dtype))
        else:
            dnew = dcarry
        dpx, extra, dstart = back(params, wT, r_t, dnew, dy)
        if rs is not None:
            dstart = _where(rs, _zeros(dstart), dstart)
        if v is not None:
            dstart = _where(v, dstart, dcarry)
        return dstart, (dpx, extra)

    dcarry0, (dpx, extra) = jax.lax.scan(body, dfinal, (per_step, dys, valid, resets), reverse=not reverse,
                                         unroll=unroll)
    return dcarry0, dpx, extra


def _weight_grads(kind, params, xs, h_start, dpx, extra, ct):
    """``(grads, dxs)``: the weight gradients in the compute dtype ``ct`` and the input cotangent, as
    single GEMMs over the T*B rows of ``xs [T, B, I]``, ``h_start`` and the state backward's ``dpx``, ``extra``.

    The [T, B, K] arrays are contracted over both leading axes at once (no reshape: the batch axis may be sharded).
    """
    rows = lambda a: a.astype(ct)  # noqa: E731
    dpx2 = rows(dpx)
    if kind == "gru":
        H = extra["dghn"].shape[-1]
        dgh2 = jnp.concatenate([dpx2[..., :2 * H], rows(extra["dghn"])], -1)
    else:
        dgh2 = dpx2
    over_rows = partial(jax.lax.dot_general, dimension_numbers=(((0, 1), (0, 1)), ((), ())),
                        out_sharding=explicit_replicated(dpx2))
    if kind == "gru_cho":  # dW_h = [H_prev^T dA_rz, (R * H_prev)^T dA_n]
        H = h_start.shape[-1]
        dw_h = jnp.concatenate([over_rows(rows(h_start), dpx2[..., :2 * H]),
                                over_rows(rows(extra["rh"]), dpx2[..., 2 * H:])], axis=1)
    else:
        dw_h = over_rows(rows(h_start), dgh2)
    dw_x = over_rows(rows(xs), dpx2)
    dxs = jax.lax.dot_general(dpx2, params.w_x.astype(ct), (((2,), (1,)), ((), ())))
    dxs = dxs.astype(xs.dtype)
    grads = dict(w_x=dw_x, w_h=dw_h, b=jnp.sum(dpx2, (0, 1)))
    if kind == "gru":
        grads["b_hn"] = jnp.sum(rows(extra["dghn"]), (0, 1))
    if "peep" in extra:
        grads["peep"] = jnp.sum(extra["peep"], 0)
    if "h_full" in extra:  # dW_proj = sum_t (o_t * tanh c_t)^T dh_t
        grads["w_proj"] = over_rows(rows(extra["h_full"]), rows(extra["dh"]))
    return grads, dxs


def _fused_bwd(kind, reverse, hoist, remat, unroll, sizes, saved, cts):
    if sizes:
        return _checkpointed_bwd(kind, reverse, hoist, unroll, sizes, saved, cts)
    params, xs, saved_steps, h_start, valid, resets = saved
    dfinal, dys = cts
    # the state cotangents run in the compute dtype (float32 for 16-bit params) and are cast back at the end
    ct = compute_dtype(params.w_h.dtype)
    carry_dtypes = jax.tree.map(lambda a: a.dtype, dfinal)
    dfinal = jax.tree.map(lambda a: a.astype(ct), dfinal)
    step = _step_fns(kind)[0]
    wT = _transposed(kind, params)
    if remat:  # recompute each step's residuals from its start carry
        pre = _pre_activation(kind, params, hoist)
        per_step = (saved_steps, _inputs(params, xs, hoist))
        residuals = lambda s: step(params, s[0], pre(_h(kind, s[0]), s[1]))[2]  # noqa: E731
    else:
        per_step, residuals = saved_steps, lambda s: s  # noqa: E731
    dcarry0, dpx, extra = _state_backward(kind, params, wT, per_step, residuals, dys, valid, resets, dfinal, reverse,
                                          unroll, ct)
    dcarry0 = jax.tree.map(lambda a, dt: a.astype(dt), dcarry0, carry_dtypes)
    grads, dxs = _weight_grads(kind, params, xs, h_start, dpx, extra, ct)
    grads = {k: v.astype(getattr(params, k).dtype) for k, v in grads.items()}
    # inside jax.shard_map: the weight gradients of one block's rows are summed over the blocks
    dparams, dxs = match_varying((params._replace(**grads), dxs), (params, xs))
    return dparams, dxs, dcarry0, None, None


# ----------------------------------------------------------------------------- checkpointed over time
# The forward pass keeps the start carry of each outermost segment (seqjax._checkpoint); the backward pass
# recomputes a segment's residuals with `_loop` from its start carry, runs its reverse recurrence and adds the
# segment's weight-gradient GEMMs to running sums.

def _segment_loop(kind, params, xs, valid, resets, reverse, hoist, unroll, carry, start, steps, keep=None):
    """`_loop` over steps [start, start + steps) of the time-major sequences."""
    return _loop(kind, params, take(xs, start, steps), carry, take(valid, start, steps), take(resets, start, steps),
                 reverse, hoist, unroll, keep=keep)


def _checkpointed_fwd(kind, params, xs, carry0, valid, resets, reverse, hoist, unroll, sizes):
    T, B = xs.shape[:2]

    def run(ys, carry, start, steps):
        carry, ys_seg = _segment_loop(kind, params, xs, valid, resets, reverse, hoist, unroll, carry, start, steps)
        return put(ys, ys_seg, start), carry

    ys = jnp.zeros((T, B, _h(kind, carry0).shape[-1]), params.w_h.dtype)
    ys, final, starts = forward(sizes, run, ys, carry0, T, reverse)
    return (final, ys), (params, xs, starts, None, valid, resets)


def _checkpointed_bwd(kind, reverse, hoist, unroll, sizes, saved, cts):
    params, xs, starts, _, valid, resets = saved
    dfinal, dys = cts
    ct = compute_dtype(params.w_h.dtype)
    carry_dtypes = jax.tree.map(lambda a: a.dtype, dfinal)
    dfinal = jax.tree.map(lambda a: a.astype(ct), dfinal)
    wT = _transposed(kind, params)
    lengths_or_resets = valid is not None or resets is not None

    def advance(carry, start, steps):
        return _segment_loop(kind, params, xs, valid, resets, reverse, hoist, unroll, carry, start, steps)[0]

    def leaf(acc, carry_in, start, steps, dcarry):
        grads, dxs = acc
        _, (ys, res, h_start) = _segment_loop(kind, params, xs, valid, resets, reverse, hoist, unroll, carry_in,
                                              start, steps, keep="residuals")
        if not lengths_or_resets:
            h_start = _start_h(ys, _h(kind, carry_in), reverse)
        v, rs, dy = take(valid, start, steps), take(resets, start, steps), take(dys, start, steps)
        dcarry, dpx, extra = _state_backward(kind, params, wT, res, lambda r: r, dy, v, rs, dcarry, reverse,
                                             unroll, ct)
        seg_grads, seg_dxs = _weight_grads(kind, params, take(xs, start, steps), h_start, dpx, extra, ct)
        grads = {k: grads[k] + seg_grads[k] for k in grads}
        return (grads, put(dxs, seg_dxs, start)), dcarry

    names = ["w_x", "w_h", "b"] + [k for k in ("b_hn", "peep", "w_proj") if getattr(params, k, None) is not None]
    acc = ({k: jnp.zeros(getattr(params, k).shape, ct) for k in names}, jnp.zeros_like(xs))
    (grads, dxs), dcarry0 = backward(sizes, reverse, advance, leaf, acc, dfinal, xs.shape[0], starts)
    dcarry0 = jax.tree.map(lambda a, dt: a.astype(dt), dcarry0, carry_dtypes)
    grads = {k: v.astype(getattr(params, k).dtype) for k, v in grads.items()}
    # inside jax.shard_map: the weight gradients of one block's rows are summed over the blocks
    dparams, dxs = match_varying((params._replace(**grads), dxs), (params, xs))
    return dparams, dxs, dcarry0, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_scan(kind: str | LSTMSpec, params, xs_tm: Array, carry0, valid: Array | None = None,
               resets: Array | None = None, reverse: bool = False, hoist: bool = False, remat: bool = False,
               unroll: int = 1, checkpoint: tuple[int, ...] = ()):
    """Runs a fusable cell over a time-major sequence with the custom VJP: ``(final_carry, ys [T, B, H])``.

    Reverse mode only (no `jax.jvp`/`jacfwd`). `seqjax.scan` calls this for
    fusable cells unless ``backward="autodiff"``; prefer that entry point.

    Args:
      kind: from `fusable`.
      params: the cell's params, all float32, float64, bfloat16 or float16.
      xs_tm: [T, B, I], floating point.
      carry0: initial carry for batch B (`LSTMCarry` with ``gates=None``, or h [B, H]).
      valid: [T, B] bool (steps inside each sequence's length) or None.
      resets: [T, B] bool or None.
      reverse: process time backwards (with ``valid``, only the valid prefix is visited).
      hoist: compute the input projection of all steps as one GEMM before the loop.
      remat: save only each step's start carry and recompute the residuals
        (gate activations) in the backward loop: less memory for one more
        step computation per step.
      unroll: steps per iteration of both loops (`jax.lax.scan`'s ``unroll``).
      checkpoint: the segment lengths per level (`seqjax._checkpoint.segment_sizes`),
        or () to keep every step's residuals: the forward pass keeps only the
        start carry of each outermost segment, the backward pass recomputes each
        segment's residuals from it and sums the weight gradients per segment
        (``remat`` is then moot: a segment's residuals live only while it is
        differentiated).
    """
    schedule = checkpoint if isinstance(checkpoint, Binomial) else tuple(checkpoint)
    flags = (bool(reverse), bool(hoist), bool(remat), int(unroll), schedule)
    if isinstance(kind, LSTMSpec):
        final, ys = _fused(kind, params, xs_tm, LSTMCarry(carry0.h, carry0.c), valid, resets, *flags)
        return LSTMCarry(final.h, final.c, None), ys
    return _fused(kind, params, xs_tm, carry0, valid, resets, *flags)
