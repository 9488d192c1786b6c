"""The LSTM cell, with the peephole "vanilla LSTM" of Greff et al. and its variants."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells.base import (Array, Cell, UnitwiseStep, check_factory_options, check_input, check_positive_int,
                               check_real, compute_dtype, gate_blocks, init_param, joint_input_recurrent, make_cell, matmul,
                               resolve_activation, unit_local, zeros_carry)

ACTIVATIONS = {"tanh": jnp.tanh, "identity": lambda a: a, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}


class LSTMSpec(NamedTuple):
    """Which LSTM variant a fused kernel computes (see `seqjax.lstm` for the equations)."""

    input_gate: bool = True
    forget_gate: bool = True          # False: NFG (f = 1)
    output_gate: bool = True
    coupled: bool = False             # CIFG: f = 1 - i
    input_activation: str = "tanh"    # of g; "identity": NIAF (g = a_g); a name in ACTIVATIONS
    output_activation: str = "tanh"   # of c; "identity": NOAF (h = o * c)

    def gates(self) -> tuple[str, ...]:
        """The computed gate blocks, in column order."""
        on = {"i": self.input_gate, "f": self.forget_gate and not self.coupled, "g": True, "o": self.output_gate}
        return tuple(g for g in "ifgo" if on[g])

    def sigmoid_gates(self) -> tuple[str, ...]:
        """The computed sigmoid gates in peephole row order (i, f, o)."""
        return tuple(g for g in self.gates() if g != "g")


class LSTMParams(NamedTuple):
    """Parameters of `seqjax.lstm`.

    Gate columns follow PyTorch's order (i, f, g, o), keeping only the gates the
    variant computes: ``G`` = number of those gates (4 for the standard LSTM; 3
    for CIFG, NIG, NFG or NOG). ``S`` = the sigmoid gates that are computed,
    in the order (i, f, o) (3 for the standard LSTM).

    Attributes:
      w_x: [I, G*H] input weights.
      w_h: [P, G*H] recurrent weights (P = proj_size, or H without projection).
      b: [G*H] bias (PyTorch's ``bias_ih + bias_hh``); the forget block is
        initialised to ``forget_bias``.
      peep: [S, H] peephole weights (p_i, p_f on c_{t-1}, p_o on c_t), or None.
      w_proj: [H, P] output projection (LSTMP), or None.
      w_gates: [S*H, S*H] gate-to-gate recurrence (FGR), or None.
    """

    w_x: Array
    w_h: Array
    b: Array
    peep: Array | None = None
    w_proj: Array | None = None
    w_gates: Array | None = None


class LSTMCarry(NamedTuple):
    """State of `seqjax.lstm`: ``h`` [..., P], ``c`` [..., H], and for FGR ``gates`` [..., S*H]."""

    h: Array
    c: Array
    gates: Array | None = None


# Greff et al. (2017) variant name -> lstm() keyword arguments.
GREFF_VARIANTS: dict[str, dict] = {
    "vanilla": dict(peepholes=True),
    "NIG": dict(peepholes=True, input_gate=False),
    "NFG": dict(peepholes=True, forget_gate=False),
    "NOG": dict(peepholes=True, output_gate=False),
    "NIAF": dict(peepholes=True, input_activation="identity"),
    "NOAF": dict(peepholes=True, output_activation="identity"),
    "NP": dict(peepholes=False),
    "CIFG": dict(peepholes=True, coupled_input_forget=True),
    "FGR": dict(peepholes=True, gate_recurrence=True),
}


def lstm(hidden_size: int, *, forget_bias: float = 1.0, peepholes: bool = False,
         input_gate: bool = True, forget_gate: bool = True, output_gate: bool = True,
         input_activation: str | Callable = "tanh", output_activation: str | Callable = "tanh",
         coupled_input_forget: bool = False, gate_recurrence: bool = False, proj_size: int | None = None,
         kernel_init=jax.nn.initializers.lecun_normal(),
         recurrent_init=jax.nn.initializers.orthogonal(),
         bias_init=jax.nn.initializers.zeros,
         peephole_init=jax.nn.initializers.zeros,
         param_dtype=jnp.float32) -> Cell:
    """The LSTM cell (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).

    With ``a = x_t W_x + b + h_{t-1} W_h`` split into gate blocks (Greff et al.'s
    notation, seed 002: z is the block input, called g by PyTorch)::

        i   = sigmoid(a_i + p_i * c_{t-1})        # 1 if not input_gate (NIG)
        f   = sigmoid(a_f + p_f * c_{t-1})        # 1 - i if coupled_input_forget (CIFG); 1 if not forget_gate (NFG)
        z   = g(a_z)                              # g = input_activation (identity: NIAF)
        c_t = f * c_{t-1} + i * z
        o   = sigmoid(a_o + p_o * c_t)            # 1 if not output_gate (NOG)
        h_t = o * h(c_t)                          # h = output_activation (identity: NOAF)
        h_t = h_t W_proj                          # with proj_size (LSTMP)

    Peephole terms appear only with ``peepholes=True``. With ``gate_recurrence``
    (FGR) the previous activations of the sigmoid gates feed every sigmoid gate:
    ``a_S += [i, f, o]_{t-1} W_gates``. ``seqjax.lstm_variant(name, H)`` builds the
    variants of Greff et al. by name ("vanilla", "NIG", "NFG", "NOG", "NIAF",
    "NOAF", "NP", "CIFG", "FGR").

    Args:
      hidden_size: H, the number of memory cells.
      forget_bias: value the forget-gate bias is initialised to (in ``init``,
        never added inside ``apply``); default 1.0 (Gers et al.; Jozefowicz et
        al. 2015). Use 0.0 to match PyTorch/Flax initialisation.
      peepholes: add the diagonal peephole connections p_i, p_f, p_o.
      input_gate, forget_gate, output_gate: False removes the gate (NIG/NFG/NOG).
      input_activation, output_activation: "tanh" (default), "identity",
        "relu", "sigmoid" or a callable.
      coupled_input_forget: CIFG, ``f = 1 - i``.
      gate_recurrence: FGR, gate-to-gate recurrent connections.
      proj_size: P, project ``h`` to P units (PyTorch's ``proj_size``); None = no projection.
      kernel_init, recurrent_init, bias_init, peephole_init: initialisers of
        ``w_x`` (and ``w_proj``), ``w_h`` (and ``w_gates``), ``b``, ``peep``;
        weight initialisers are applied per gate block. Defaults: LeCun normal,
        orthogonal, zeros, zeros.
      param_dtype: dtype of params and carry (16-bit params accumulate in float32).

    Returns:
      A `Cell` with `LSTMParams` and `LSTMCarry`; ``y = h_t``.

    Example:
      >>> cell = seqjax.lstm(128, peepholes=True)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> carry = cell.initial_carry(params, batch_shape=(32,))
      >>> carry, y = cell.apply(params, carry, jnp.zeros((32, 8)))
    """
    call = "seqjax.lstm"
    H = check_positive_int(call, "hidden_size", hidden_size)
    param_dtype = check_factory_options(call, param_dtype, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init, peephole_init=peephole_init)
    forget_bias = check_real(call, "forget_bias", forget_bias)
    for flag, value in [("peepholes", peepholes), ("input_gate", input_gate), ("forget_gate", forget_gate),
                        ("output_gate", output_gate), ("coupled_input_forget", coupled_input_forget),
                        ("gate_recurrence", gate_recurrence)]:
        if not isinstance(value, bool):
            raise ValueError(f"{call}: {flag} must be a bool, got {value!r}")
    if coupled_input_forget and not input_gate:
        raise ValueError(f"{call}: coupled_input_forget=True (f = 1 - i) needs input_gate=True, got input_gate=False")
    if coupled_input_forget and not forget_gate:
        raise ValueError(f"{call}: coupled_input_forget=True replaces the forget gate; pass forget_gate=True "
                         f"(got forget_gate=False)")
    if proj_size is not None:
        check_positive_int(call, "proj_size", proj_size)
    in_act = resolve_activation(call, "input_activation", input_activation, ACTIVATIONS)
    out_act = resolve_activation(call, "output_activation", output_activation, ACTIVATIONS)
    P = proj_size or H

    layout = LSTMSpec(input_gate=input_gate, forget_gate=forget_gate, output_gate=output_gate,
                      coupled=coupled_input_forget)
    gates = layout.gates()
    col = {g: k for k, g in enumerate(gates)}            # gate -> block index in the G*H columns
    sig = layout.sigmoid_gates()                         # sigmoid gates, order of peep / w_gates
    G, S = len(gates), len(sig)

    def init(key, input_size: int) -> LSTMParams:
        check_positive_int(call + ".init", "input_size", input_size)
        kx, kh, kb, kp, kproj, kg = jax.random.split(key, 6)
        b = init_param(bias_init, kb, (G * H,), param_dtype)
        if "f" in col:
            b = b.at[col["f"] * H:(col["f"] + 1) * H].set(forget_bias)
        return LSTMParams(
            w_x=gate_blocks(kernel_init, kx, input_size, H, G, param_dtype),
            w_h=gate_blocks(recurrent_init, kh, P, H, G, param_dtype),
            b=b,
            peep=init_param(peephole_init, kp, (S, H), param_dtype) if peepholes and S else None,
            w_proj=init_param(kernel_init, kproj, (H, P), param_dtype) if proj_size else None,
            w_gates=gate_blocks(recurrent_init, kg, S * H, H, S, param_dtype) if gate_recurrence and S else None)

    def initial_carry(params: LSTMParams, batch_shape=()) -> LSTMCarry:
        dtype = params.w_h.dtype
        return LSTMCarry(zeros_carry(batch_shape, P, dtype), zeros_carry(batch_shape, H, dtype),
                         zeros_carry(batch_shape, S * H, dtype) if params.w_gates is not None else None)

    def project(params: LSTMParams, x: Array) -> Array:
        check_input(call, x, params.w_x.shape[0])
        return matmul(x, params.w_x) + params.b.astype(compute_dtype(params.w_x.dtype))

    def step(params: LSTMParams, carry: LSTMCarry, px: Array):
        return finish(params, carry, px + matmul(carry.h, params.w_h))

    def masked_step(params: LSTMParams, carry: LSTMCarry, px: Array, mask: Array):
        return finish(params, carry, px + matmul(carry.h * mask, params.w_h))  # h enters only through W_h

    def joint_apply(params: LSTMParams):
        return joint_input_recurrent(params.w_x, params.w_h, params.b, lambda c, a: finish(params, c, a))

    def finish(params: LSTMParams, carry: LSTMCarry, a: Array):
        """The step given the gate pre-activations ``a = x W_x + h W_h + b`` [..., G*H]."""
        dt = a.dtype
        if params.w_gates is not None:
            a_sig = matmul(carry.gates, params.w_gates)
        c_prev = carry.c.astype(dt)

        def pre(g):
            k = col[g]
            out = a[..., k * H:(k + 1) * H]
            if params.w_gates is not None and g in sig:
                s = sig.index(g)
                out = out + a_sig[..., s * H:(s + 1) * H]
            return out

        def peep(g, c):
            return params.peep[sig.index(g)].astype(dt) * c if params.peep is not None else 0.0

        i = jax.nn.sigmoid(pre("i") + peep("i", c_prev)) if "i" in col else 1.0
        if coupled_input_forget:
            f = 1.0 - i
        elif "f" in col:
            f = jax.nn.sigmoid(pre("f") + peep("f", c_prev))
        else:
            f = 1.0
        c = f * c_prev + i * in_act(pre("g"))
        o = jax.nn.sigmoid(pre("o") + peep("o", c)) if "o" in col else 1.0
        h = o * out_act(c)
        if params.w_proj is not None:
            h = matmul(h, params.w_proj)
        out_dtype = params.w_h.dtype
        h = h.astype(out_dtype)
        new_gates = None
        if params.w_gates is not None:
            acts = {"i": i, "f": f, "o": o}
            new_gates = jnp.concatenate([acts[g] for g in sig], axis=-1).astype(out_dtype)
        return LSTMCarry(h, c.astype(out_dtype), new_gates), h

    opts = [f"hidden_size={H}"]
    for name, value, default in [("peepholes", peepholes, False), ("input_gate", input_gate, True),
                                 ("forget_gate", forget_gate, True), ("output_gate", output_gate, True),
                                 ("coupled_input_forget", coupled_input_forget, False),
                                 ("gate_recurrence", gate_recurrence, False), ("proj_size", proj_size, None),
                                 ("input_activation", input_activation, "tanh"),
                                 ("output_activation", output_activation, "tanh")]:
        if value != default:
            opts.append(f"{name}={value!r}" if isinstance(value, (str, bool, int)) else f"{name}=custom")
    spec = None  # the custom VJP covers named activations (it differentiates them from their outputs)
    if not gate_recurrence and isinstance(input_activation, str) and isinstance(output_activation, str):
        spec = layout._replace(input_activation=input_activation, output_activation=output_activation)
    unitwise = None  # a projection or the gate recurrence mixes units outside the GEMM of h
    if proj_size is None and not gate_recurrence:
        unitwise = UnitwiseStep(recurrent=lambda params, carry: matmul(carry.h, params.w_h),
                                local=lambda params, carry: unit_local(carry.h, params.w_h, G),
                                pointwise=lambda params, carry, u, px: finish(params, carry, px + u))
    return make_cell(init=init, initial_carry=initial_carry, project=project, step=step,
                     input_size=lambda p: p.w_x.shape[0], hidden_size=H, output_size=P,
                     name=f"lstm({', '.join(opts)})", joint_apply=joint_apply, kind=spec, unitwise=unitwise,
                     masked_step=masked_step)


def lstm_variant(name: str, hidden_size: int, **kwargs) -> Cell:
    """An LSTM variant of Greff et al. (2017) by name.

    Args:
      name: one of "vanilla" (peephole LSTM), "NIG", "NFG", "NOG", "NIAF",
        "NOAF", "NP", "CIFG", "FGR" (see `seqjax.lstm` for the equations).
      hidden_size: H.
      **kwargs: further `seqjax.lstm` options (initialisers, forget_bias, ...).

    Example:
      >>> cell = seqjax.lstm_variant("CIFG", 64)
    """
    if name not in GREFF_VARIANTS:
        raise ValueError(f"seqjax.lstm_variant: name must be one of {list(GREFF_VARIANTS)}, got {name!r}")
    return lstm(hidden_size, **{**GREFF_VARIANTS[name], **kwargs})
