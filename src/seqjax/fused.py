"""A scan whose derivative computes the weight gradients as whole-sequence GEMMs.

Autodiff of `jax.lax.scan` accumulates the recurrent weight gradient inside the
backward loop: every step adds ``h_{t-1}^T @ dA_t`` (a [H, B] x [B, G*H] GEMM)
to a running sum, and likewise for the input weights. `fused_scan` gives the
standard LSTM, GRU (``reset_after=True``) and Elman RNN cells a `jax.custom_jvp`
whose tangent is split into

* a **time-parallel part**, computed for all steps at once:
  ``dP = dX @ W_x + X @ dW_x + db`` and ``dU = H_prev @ dW_h`` (one GEMM each
  over all T*B rows), and
* a **linear recurrence** over the tangent state only (``dh_{t-1} @ W_h`` plus
  the gate arithmetic, using the gate activations saved by the forward loop).

Reverse mode transposes this: the backward loop runs the recurrence for the
state gradients only and emits the pre-activation gradients ``dA`` of every
step, and the weight gradients become single GEMMs
(``dW_h = H_prev^T @ dA``, ``dW_x = X^T @ dA``, ``db = sum dA``). Because the rule
is a JVP (not a VJP), forward mode (`jax.jvp`, `jax.jacfwd`, Hessians) keeps working.

`fused_scan_vjp` / `scan_fused` do the same with a hand-written `jax.custom_vjp`
(forward saves gate activations and start states; backward is one reverse loop over
the state cotangents, then whole-sequence GEMMs). It measured faster than both the
JVP and plain autodiff for long sequences (bench/results/levers.md) but has no forward
mode, so it is opt-in: ``seqjax.fused.scan_fused(cell, params, xs, **scan kwargs)``.

Supports ``lengths`` (as a [T, B] validity mask), ``resets``, ``reverse`` and a
given initial carry with the same semantics as `seqjax.scan`. Everything else
(other cells and variants, 16-bit params, stacked cells) is reported by
`fusable` so the caller can use the plain autodiff path.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from seqjax.cells.base import Array, Cell, matmul
from seqjax.cells.gru import GRUParams
from seqjax.cells.lstm import LSTMCarry, LSTMParams
from seqjax.cells.rnn import RNNParams

__all__ = ["fusable", "fused_scan", "fused_scan_vjp", "scan_fused"]


def fusable(cell: Cell, params) -> str | None:
    """The fused kernel that computes ``cell`` (``"lstm"``, ``"gru"``, ``"rnn_tanh"``, ``"rnn_relu"``), or None.

    Only the plain variants qualify: an LSTM without peepholes, projection or
    gate recurrence and with all gates and tanh activations; a GRU with
    ``reset_after=True``; an Elman RNN with tanh or relu. Params must be
    float32 or float64 throughout.
    """
    if cell.layers is not None:
        return None
    leaves = [a for a in jax.tree.leaves(params)]
    if not leaves or any(jnp.result_type(a) not in (jnp.float32, jnp.float64) for a in leaves):
        return None
    if len({jnp.result_type(a) for a in leaves}) != 1:
        return None
    H = cell.hidden_size
    if isinstance(params, LSTMParams):
        if (params.peep is None and params.w_proj is None and params.w_gates is None
                and cell.name == f"lstm(hidden_size={H})" and params.w_h.shape == (H, 4 * H)):
            return "lstm"
        return None
    if isinstance(params, GRUParams):
        if params.b_hn is not None and cell.name == f"gru(hidden_size={H}, reset_after=True)":
            return "gru"
        return None
    if isinstance(params, RNNParams):
        for act in ("tanh", "relu"):
            if cell.name == f"rnn(hidden_size={H}, activation={act})":
                return "rnn_" + act
    return None


# ----------------------------------------------------------------------------- per-cell steps
# forward step: (params, start_carry, px_t) -> (new_carry, y, residuals_t)
# tangent step: (params, res_t, d_start_carry, dp_t, du_t) -> (d_new_carry, dy)
#   dp_t: tangent of the time-parallel input projection; du_t: of h_prev @ W_h through dW_h.

def _h(kind, carry):
    return carry.h if kind == "lstm" else carry


def _lstm_fwd(p, start, px):
    H = start.c.shape[-1]
    a = px + matmul(start.h, p.w_h)
    i = jax.nn.sigmoid(a[:, :H])
    f = jax.nn.sigmoid(a[:, H:2 * H])
    g = jnp.tanh(a[:, 2 * H:3 * H])
    o = jax.nn.sigmoid(a[:, 3 * H:])
    c = f * start.c + i * g
    tc = jnp.tanh(c)
    h = o * tc
    return LSTMCarry(h, c), h, (jnp.concatenate([i, f, g, o], -1), start.c, tc)


def _lstm_tan(p, res, dstart, dp, du):
    gates, c0, tc = res
    H = c0.shape[-1]
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    da = dp + matmul(dstart.h, p.w_h)
    if du is not None:
        da = da + du
    di = i * (1 - i) * da[:, :H]
    df = f * (1 - f) * da[:, H:2 * H]
    dg = (1 - g * g) * da[:, 2 * H:3 * H]
    do = o * (1 - o) * da[:, 3 * H:]
    dc = df * c0 + f * dstart.c + di * g + i * dg
    dh = do * tc + o * (1 - tc * tc) * dc
    return LSTMCarry(dh, dc), dh


def _gru_fwd(p, h0, px):
    H = h0.shape[-1]
    gh = matmul(h0, p.w_h)
    r = jax.nn.sigmoid(px[:, :H] + gh[:, :H])
    z = jax.nn.sigmoid(px[:, H:2 * H] + gh[:, H:2 * H])
    hn = gh[:, 2 * H:] + p.b_hn
    n = jnp.tanh(px[:, 2 * H:] + r * hn)
    h = (1 - z) * n + z * h0
    return h, h, (jnp.concatenate([r, z, n, hn], -1), h0)


def _gru_tan(p, res, dh0, dp, du):
    acts, h0 = res
    H = h0.shape[-1]
    r, z, n, hn = acts[:, :H], acts[:, H:2 * H], acts[:, 2 * H:3 * H], acts[:, 3 * H:]
    dgh = matmul(dh0, p.w_h) + du
    dr = r * (1 - r) * (dp[:, :H] + dgh[:, :H])
    dz = z * (1 - z) * (dp[:, H:2 * H] + dgh[:, H:2 * H])
    dn = (1 - n * n) * (dp[:, 2 * H:] + dr * hn + r * dgh[:, 2 * H:])
    dh = (1 - z) * dn + dz * (h0 - n) + z * dh0
    return dh, dh


def _rnn_fwd(act):
    def fwd(p, h0, px):
        h = act(px + matmul(h0, p.w_h))
        return h, h, h
    return fwd


def _rnn_tan(kind):
    def tan(p, h, dh0, dp, du):
        da = dp + matmul(dh0, p.w_h)
        if du is not None:
            da = da + du
        dh = (1 - h * h) * da if kind == "rnn_tanh" else jnp.where(h > 0, da, jnp.zeros_like(da))
        return dh, dh
    return tan


_FWD = {"lstm": _lstm_fwd, "gru": _gru_fwd, "rnn_tanh": _rnn_fwd(jnp.tanh), "rnn_relu": _rnn_fwd(jax.nn.relu)}
_TAN = {"lstm": _lstm_tan, "gru": _gru_tan, "rnn_tanh": _rnn_tan("rnn_tanh"), "rnn_relu": _rnn_tan("rnn_relu")}


def _where(mask, a, b):
    return jax.tree.map(lambda u, v: jnp.where(mask[:, None], u, v), a, b)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, keep):
    """The forward recurrence; ``keep`` also returns per-step residuals and start states."""
    step = _FWD[kind]
    zero = _zeros(carry0)
    inputs = matmul(xs, params.w_x) + params.b if hoist else xs

    def body(carry, inp):
        x, v, r = inp
        start = carry if r is None else _where(r, zero, carry)
        px = x if hoist else matmul(x, params.w_x) + params.b
        new, y, res = step(params, start, px)
        if v is not None:
            new = _where(v, new, carry)
            y = jnp.where(v[:, None], y, jnp.zeros((), y.dtype))
        out = (y, res, _h(kind, start)) if keep else y
        return new, out

    return jax.lax.scan(body, carry0, (inputs, valid, resets), reverse=reverse)


@partial(jax.custom_jvp, nondiff_argnums=(0, 6, 7))
def _fused(kind, params, xs, carry0, valid, resets, reverse, hoist):
    return _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, keep=False)


@_fused.defjvp
def _fused_jvp(kind, reverse, hoist, primals, tangents):
    params, xs, carry0, valid, resets = primals
    dparams, dxs, dcarry0 = tangents[:3]
    final, (ys, res, h_prev) = _loop(kind, params, xs, carry0, valid, resets, reverse, hoist, keep=True)

    # time-parallel part of the tangent: whole-sequence GEMMs
    dp = matmul(dxs, params.w_x) + matmul(xs, dparams.w_x) + dparams.b
    du = matmul(h_prev, dparams.w_h)
    if kind == "gru":
        H = params.b_hn.shape[-1]
        du = du + jnp.concatenate([jnp.zeros((2 * H,), du.dtype), dparams.b_hn])
    else:  # one input stream is enough
        dp, du = dp + du, None
    tan = _TAN[kind]

    def body(dcarry, inp):
        r_t, dp_t, du_t, v, rs = inp
        dstart = dcarry if rs is None else _where(rs, _zeros(dcarry), dcarry)
        dnew, dy = tan(params, r_t, dstart, dp_t, du_t)
        if v is not None:
            dnew = _where(v, dnew, dcarry)
            dy = jnp.where(v[:, None], dy, jnp.zeros((), dy.dtype))
        return dnew, dy

    dfinal, dys = jax.lax.scan(body, dcarry0, (res, dp, du, valid, resets), reverse=reverse)
    return (final, ys), (dfinal, dys)


def fused_scan(kind: str, params, xs_tm: Array, carry0, valid: Array | None = None, resets: Array | None = None,
               reverse: bool = False, hoist: bool = False):
    """Runs a fusable cell over a time-major sequence: ``(final_carry, ys [T, B, H])``.

    Args:
      kind: from `fusable`.
      params: the cell's params (float32/float64).
      xs_tm: [T, B, I].
      carry0: initial carry for batch B (`LSTMCarry` with ``gates=None``, or h [B, H]).
      valid: [T, B] bool (steps inside each sequence's length) or None.
      resets: [T, B] bool or None.
      reverse: process time backwards (with ``valid``, only the valid prefix is visited).
      hoist: compute the input projection of all steps as one GEMM before the loop.
    """
    if kind == "lstm":
        carry0 = LSTMCarry(carry0.h, carry0.c)
    return _fused(kind, params, xs_tm, carry0, valid, resets, bool(reverse), bool(hoist))


# ============================================================================ hand-written custom_vjp
# Forward: one lax.scan that also stores, per step, exactly what the backward needs
# (gate activations, start states). Backward: one reverse lax.scan over the state
# cotangents only, emitting the pre-activation gradients dA_t of every step; then the
# weight gradients and dX are single 2-D GEMMs over all T*B rows.

def _vjp_back_lstm(p, w_hT, res, dnew, dy):
    """(residuals_t, d new carry, d y_t) -> (dpx_t, dgh_t or None, d start carry)."""
    gates, c0, tc = res
    H = c0.shape[-1]
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    dh = dnew.h + dy
    dc = dnew.c + dh * o * (1 - tc * tc)
    da = jnp.concatenate([dc * g * i * (1 - i), dc * c0 * f * (1 - f), dc * i * (1 - g * g),
                          dh * tc * o * (1 - o)], -1)
    return da, None, LSTMCarry(matmul(da, w_hT), dc * f)


def _vjp_back_gru(p, w_hT, res, dnew, dy):
    acts, h0 = res
    H = h0.shape[-1]
    r, z, n, hn = acts[:, :H], acts[:, H:2 * H], acts[:, 2 * H:3 * H], acts[:, 3 * H:]
    dh = dnew + dy
    dn = dh * (1 - z) * (1 - n * n)           # d pre-activation of n
    dz = dh * (h0 - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dpx = jnp.concatenate([dr, dz, dn], -1)
    dgh = jnp.concatenate([dr, dz, dn * r], -1)
    return dpx, dn * r, matmul(dgh, w_hT) + dh * z


def _vjp_back_rnn(kind):
    def back(p, w_hT, h, dnew, dy):
        dh = dnew + dy
        da = dh * (1 - h * h) if kind == "rnn_tanh" else jnp.where(h > 0, dh, jnp.zeros_like(dh))
        return da, None, matmul(da, w_hT)
    return back


_VJP_FWD = {"lstm": _lstm_fwd, "gru": _gru_fwd, "rnn_tanh": _rnn_fwd(jnp.tanh),
            "rnn_relu": _rnn_fwd(jax.nn.relu)}
_VJP_BACK = {"lstm": _vjp_back_lstm, "gru": _vjp_back_gru, "rnn_tanh": _vjp_back_rnn("rnn_tanh"),
             "rnn_relu": _vjp_back_rnn("rnn_relu")}


def _vloop(kind, params, xs, carry0, valid, resets, reverse, keep):
    step = _VJP_FWD[kind]
    zero = _zeros(carry0)

    def body(carry, inp):
        x, v, r = inp
        start = carry if r is None else _where(r, zero, carry)
        new, y, res = step(params, start, matmul(x, params.w_x) + params.b)
        if v is not None:
            new = _where(v, new, carry)
            y = jnp.where(v[:, None], y, jnp.zeros((), y.dtype))
        return new, ((y, res, _h(kind, start)) if keep else y)

    return jax.lax.scan(body, carry0, (xs, valid, resets), reverse=reverse)


@partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _vfused(kind, params, xs, carry0, valid, resets, reverse):
    return _vloop(kind, params, xs, carry0, valid, resets, reverse, keep=False)


def _vfused_fwd(kind, params, xs, carry0, valid, resets, reverse):
    final, (ys, res, h_prev) = _vloop(kind, params, xs, carry0, valid, resets, reverse, keep=True)
    return (final, ys), (params, xs, res, h_prev, valid, resets)


def _vfused_bwd(kind, reverse, saved, cts):
    params, xs, res, h_prev, valid, resets = saved
    dfinal, dys = cts
    back = _VJP_BACK[kind]
    w_hT = params.w_h.T

    def body(dcarry, inp):
        r_t, dy, v, rs = inp
        if v is not None:
            dnew = _where(v, dcarry, _zeros(dcarry))
            dy = jnp.where(v[:, None], dy, jnp.zeros((), dy.dtype))
        else:
            dnew = dcarry
        dpx, dghn, dstart = back(params, w_hT, r_t, dnew, dy)
        if rs is not None:
            dstart = _where(rs, _zeros(dstart), dstart)
        if v is not None:
            dstart = _where(v, dstart, dcarry)
        return dstart, (dpx, dghn)

    dcarry0, (dpx, dghn) = jax.lax.scan(body, dfinal, (res, dys, valid, resets), reverse=not reverse)
    T, B = xs.shape[:2]
    dpx2 = dpx.reshape(T * B, -1)
    if kind == "gru":
        H = dghn.shape[-1]
        dgh2 = jnp.concatenate([dpx2[:, :2 * H], dghn.reshape(T * B, H)], -1)
    else:
        dgh2 = dpx2
    hp2 = h_prev.reshape(T * B, -1)
    x2 = xs.reshape(T * B, -1)
    dw_h = jax.lax.dot_general(hp2, dgh2, (((0,), (0,)), ((), ())))
    dw_x = jax.lax.dot_general(x2, dpx2, (((0,), (0,)), ((), ())))
    dxs = jax.lax.dot_general(dpx2, params.w_x, (((1,), (1,)), ((), ()))).reshape(xs.shape)
    grads = dict(w_x=dw_x, w_h=dw_h, b=jnp.sum(dpx2, 0))
    if kind == "gru":
        grads["b_hn"] = jnp.sum(dghn.reshape(T * B, -1), 0)
    dparams = params._replace(**grads)
    return dparams, dxs, dcarry0, None, None


_vfused.defvjp(_vfused_fwd, _vfused_bwd)


def fused_scan_vjp(kind: str, params, xs_tm: Array, carry0, valid: Array | None = None,
                   resets: Array | None = None, reverse: bool = False):
    """`fused_scan` with a hand-written `jax.custom_vjp` (reverse mode only: no `jax.jvp`/`jacfwd`).

    Same arguments and results as `fused_scan` (without ``hoist``: the projection
    is computed inside the loop, the measured faster choice on CPU).
    """
    if kind == "lstm":
        carry0 = LSTMCarry(carry0.h, carry0.c)
    return _vfused(kind, params, xs_tm, carry0, valid, resets, bool(reverse))


def scan_fused(cell: Cell, params, xs: Array, *, carry=None, lengths: Array | None = None,
               resets: Array | None = None, reverse: bool = False, time_major: bool = False, unroll: int = 1,
               remat: bool = False, hoist: bool | None = None):
    """`seqjax.scan` whose gradient is the hand-written whole-sequence-GEMM VJP (opt-in).

    Same arguments, semantics and results as `seqjax.scan`. For a fusable cell
    (`fusable`: plain LSTM, GRU with ``reset_after=True``, Elman RNN; float32/64)
    with ``unroll=1``, ``remat=False`` and ``hoist`` not True, the sequence runs
    through `fused_scan_vjp`: the backward pass runs the recurrence for the state
    gradients only and computes ``dW_h``, ``dW_x``, ``db`` and ``dX`` as single
    GEMMs over all T*B rows. Anything else falls back to `seqjax.scan`.

    Trade-off: the rule is a `jax.custom_vjp`, so reverse mode (`jax.grad`,
    `jax.vjp`) works but forward mode (`jax.jvp`, `jax.jacfwd`, Hessians via
    forward-over-reverse) of the fused path raises; use `seqjax.scan` for those.
    See bench/results/levers.md for where it is faster.
    """
    from seqjax.scan import _check_bool, _plan, scan
    kind = fusable(cell, params) if isinstance(cell, Cell) else None
    if kind is None or remat is not False or hoist or isinstance(unroll, bool) or unroll != 1:
        return scan(cell, params, xs, carry=carry, lengths=lengths, resets=resets, reverse=reverse,
                    time_major=time_major, unroll=unroll, remat=remat, hoist=hoist)
    plan = _plan("seqjax.fused.scan_fused", cell, params, xs, carry, lengths, resets, time_major)
    _check_bool("seqjax.fused.scan_fused", "reverse", reverse)
    final, ys = fused_scan_vjp(kind, params, plan.xs, plan.carry, plan.valid, plan.resets, reverse)
    if kind == "lstm":
        final = LSTMCarry(final.h, final.c, None)
    return final, (ys if time_major else jnp.swapaxes(ys, 0, 1))
