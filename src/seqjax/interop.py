"""PyTorch interop: convert ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` modules, weights and states.

PyTorch is optional: it is imported lazily inside the functions that need it,
so ``import seqjax`` never imports ``torch``.

    layer, params = seqjax.from_torch(torch_lstm)                # a seqjax.multilayer layer
    carry = seqjax.from_torch_carry((h0, c0), bidirectional=torch_lstm.bidirectional)
    final_carry, ys = layer.apply(params, xs, carry=carry, lengths=lengths)   # xs [B, T, I]
    h_n, c_n = seqjax.torch_carry(final_carry)                   # [L*D, B, H] as torch's
    torch_lstm.load_state_dict(seqjax.to_torch_state_dict(params, cell_type="lstm"))

Weight layouts (seqjax keeps PyTorch's gate order, transposed to ``x @ W``)::

    w_x    = weight_ih_l{k}.T                  # [I_k, G*H]
    w_h    = weight_hh_l{k}.T                  # [H or P, G*H]
    b      = bias_ih_l{k} + bias_hh_l{k}       # [G*H]  (GRU: n block is bias_ih only)
    b_hn   = bias_hh_l{k}[2H:]                 # GRU only, [H]
    w_proj = weight_hr_l{k}.T                  # LSTM with proj_size, [H, P]

with G = 1 (RNN), 4 (LSTM, gates i, f, g, o) or 3 (GRU, gates r, z, n) and the
suffix ``_reverse`` for the backward direction.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells.gru import GRUParams, gru
from seqjax.cells.lstm import LSTMCarry, LSTMParams, lstm
from seqjax.cells.rnn import RNNParams, rnn
from seqjax.layers import BidirectionalParams, Layer, multilayer

__all__ = ["from_torch", "from_torch_carry", "to_torch_state_dict", "torch_carry"]

# torch.nn.RNNBase.mode -> (seqjax cell type, RNN activation, number of gate blocks G)
_MODES = {"RNN_TANH": ("rnn", "tanh", 1), "RNN_RELU": ("rnn", "relu", 1), "LSTM": ("lstm", None, 4),
          "GRU": ("gru", None, 3)}
_CELL_TYPES = {"rnn": 1, "lstm": 4, "gru": 3}
_PARAM_TYPES = {RNNParams: "rnn", LSTMParams: "lstm", GRUParams: "gru"}


def _import_torch(call: str):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(f"{call} needs PyTorch; install it with `pip install torch`") from e
    return torch


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any device; bfloat16 goes through float32) as a NumPy array."""
    import torch
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _torch_dtype_to_jax(torch_dtype):
    import torch
    table = {torch.float32: jnp.float32, torch.float64: jnp.float64, torch.float16: jnp.float16,
             torch.bfloat16: jnp.bfloat16}
    if torch_dtype not in table:
        raise TypeError(f"seqjax.from_torch: module weights must be floating point (float16/bfloat16/float32/"
                        f"float64), got {torch_dtype}")
    return table[torch_dtype]


def from_torch(module, *, dtype=None) -> tuple[Layer, tuple]:
    """Converts a ``torch.nn.RNN``, ``torch.nn.LSTM`` or ``torch.nn.GRU`` into a seqjax layer and its params.

    The result reproduces the module: ``layer.apply(params, xs, lengths=lengths)``
    gives the output of ``module`` on the corresponding (packed) batch, zeros
    past each length as ``pad_packed_sequence`` gives, and a final carry that
    `torch_carry` turns into ``h_n`` (or ``(h_n, c_n)``). Every option is
    carried over: ``num_layers``, ``bidirectional``, ``bias`` (``bias=False``
    gives zero biases), ``proj_size`` (LSTM), ``nonlinearity`` (RNN) and
    ``dropout`` (as the rate of `seqjax.multilayer`, applied only when ``apply``
    gets a ``key``). ``xs`` is always batch-major [B, T, I], whatever the
    module's ``batch_first`` (or pass ``time_major=True`` to ``apply``).

    Weights are copied (``.detach().cpu()``), so the module may live on any
    device; the params keep the module's dtype unless ``dtype`` is given.

    Args:
      module: a ``torch.nn.RNN`` (tanh or relu), ``torch.nn.LSTM`` (with or
        without ``proj_size``) or ``torch.nn.GRU``.
      dtype: dtype of the returned params (and so of the carry); default the
        module's (float64 needs ``jax_enable_x64``).

    Returns:
      ``(layer, params)``: ``layer = seqjax.multilayer(cell, num_layers,
      bidirectional=..., dropout=...)`` with ``cell`` one of ``seqjax.rnn(H,
      activation=...)``, ``seqjax.lstm(H, proj_size=P)``, ``seqjax.gru(H)``, and
      ``params`` an L-tuple of `RNNParams` / `LSTMParams` / `GRUParams` (a
      `BidirectionalParams` of two per layer when bidirectional): weights
      ``w_x`` [I_k, G*H], ``w_h`` [H or P, G*H], ``b`` [G*H] (layout in the
      module docstring).

    Raises:
      TypeError: ``module`` is not one of the supported modules, or its weights
        are not floating point.
      ValueError: the module uses a mode seqjax cannot reproduce.

    Example:
      >>> import torch
      >>> m = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
      >>> layer, params = seqjax.from_torch(m)
      >>> xs = np.random.randn(4, 10, 8).astype(np.float32)
      >>> carry, ys = layer.apply(params, xs)                  # ys [4, 10, 32]
      >>> h_n, c_n = seqjax.torch_carry(carry)                 # [4, 4, 16] each
      >>> out, _ = m(torch.from_numpy(xs))
      >>> np.allclose(out.detach().numpy(), ys, atol=1e-5)
      True
    """
    call = "seqjax.from_torch"
    torch = _import_torch(call)
    if not isinstance(module, torch.nn.RNNBase):
        hint = (" (cells such as torch.nn.LSTMCell are not supported: wrap the weights of an nn.LSTM/GRU/RNN "
                "with num_layers=1 instead)" if isinstance(module, torch.nn.RNNCellBase) else "")
        raise TypeError(f"{call}: module must be a torch.nn.RNN, torch.nn.LSTM or torch.nn.GRU, got "
                        f"{type(module).__module__}.{type(module).__qualname__}{hint}")
    mode = getattr(module, "mode", None)
    if mode not in _MODES:
        raise ValueError(f"{call}: module.mode must be one of {sorted(_MODES)}, got {mode!r}")
    cell_type, activation, G = _MODES[mode]
    H, L = int(module.hidden_size), int(module.num_layers)
    D = 2 if module.bidirectional else 1
    P = int(getattr(module, "proj_size", 0) or 0)
    if P and cell_type != "lstm":  # torch itself forbids this; guard anyway
        raise ValueError(f"{call}: proj_size is only supported for torch.nn.LSTM, got proj_size={P} on {mode}")
    bias = bool(module.bias)
    rate = float(module.dropout)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{call}: module.dropout must be in [0, 1) for seqjax.multilayer, got {rate}")
    if dtype is None:
        dtype = _torch_dtype_to_jax(module.weight_hh_l0.dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(f"{call}: the module is float64 but jax_enable_x64 is off; enable it "
                             f"(jax.config.update('jax_enable_x64', True)) or pass dtype=jnp.float32")

    if cell_type == "rnn":
        cell = rnn(H, activation=activation, param_dtype=dtype)
    elif cell_type == "lstm":
        cell = lstm(H, proj_size=P or None, forget_bias=0.0, param_dtype=dtype)
    else:
        cell = gru(H, reset_after=True, param_dtype=dtype)
    layer = multilayer(cell, L, bidirectional=D == 2, dropout=rate)

    def get(name):
        return _to_numpy(getattr(module, name))

    def direction(k, suffix):
        w_x = get(f"weight_ih_l{k}{suffix}").T
        w_h = get(f"weight_hh_l{k}{suffix}").T
        if bias:
            b_ih, b_hh = get(f"bias_ih_l{k}{suffix}"), get(f"bias_hh_l{k}{suffix}")
        else:
            b_ih = b_hh = np.zeros((G * H,), w_x.dtype)
        j = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
        if cell_type == "rnn":
            return RNNParams(j(w_x), j(w_h), j(b_ih + b_hh))
        if cell_type == "lstm":
            w_proj = j(get(f"weight_hr_l{k}{suffix}").T) if P else None
            return LSTMParams(j(w_x), j(w_h), j(b_ih + b_hh), w_proj=w_proj)
        b = np.concatenate([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
        return GRUParams(j(w_x), j(w_h), j(b), j(b_hh[2 * H:]))

    params = []
    for k in range(L):
        fwd = direction(k, "")
        params.append(BidirectionalParams(fwd, direction(k, "_reverse")) if D == 2 else fwd)
    return layer, tuple(params)


def _is_bidirectional_carry(c) -> bool:
    return isinstance(c, tuple) and not isinstance(c, LSTMCarry) and len(c) == 2


def torch_carry(carry, *, as_torch: bool = False):
    """Converts a final carry of a `from_torch` / `seqjax.multilayer` layer into PyTorch's ``h_n`` / ``(h_n, c_n)``.

    Args:
      carry: the layer's carry: an L-tuple with one entry per layer, each a
        carry of ``seqjax.rnn``/``seqjax.gru`` (``h`` [B, H]) or ``seqjax.lstm``
        (`LSTMCarry` with ``h`` [B, P], ``c`` [B, H]), or for a bidirectional
        layer the pair ``(forward, backward)`` of them.
      as_torch: return ``torch.Tensor``s instead of jax arrays.

    Returns:
      ``h_n`` [L*D, B, H] for RNN/GRU, ``(h_n [L*D, B, P or H], c_n [L*D, B, H])``
      for LSTM: layer-major, forward before backward (D = 2 when
      bidirectional), exactly PyTorch's layout.

    Example:
      >>> layer = seqjax.multilayer(seqjax.lstm(16), num_layers=2)
      >>> params = layer.init(jax.random.key(0), input_size=8)
      >>> carry, ys = layer.apply(params, jnp.ones((3, 10, 8)))
      >>> h_n, c_n = seqjax.torch_carry(carry)       # nn.LSTM's (h_n, c_n) layout: [L*D, B, H]
      >>> h_n.shape, c_n.shape
      ((2, 3, 16), (2, 3, 16))
    """
    call = "seqjax.torch_carry"
    if not isinstance(carry, (tuple, list)) or isinstance(carry, LSTMCarry) or not carry:
        raise TypeError(f"{call}: carry must be the L-tuple of per-layer carries of a seqjax.multilayer layer, got "
                        f"{type(carry).__name__}")
    flat = []
    for c in carry:
        flat.extend(c if _is_bidirectional_carry(c) else [c])
    is_lstm = [isinstance(c, LSTMCarry) for c in flat]
    if any(is_lstm) and not all(is_lstm):
        raise TypeError(f"{call}: carry mixes LSTM and non-LSTM layers; PyTorch modules use one cell type")
    if not all(is_lstm) and not all(hasattr(c, "shape") for c in flat):
        raise TypeError(f"{call}: each layer carry must be an array h [B, H], an LSTMCarry, or a (forward, backward) "
                        f"pair of them, got {[type(c).__name__ for c in flat]}")
    if all(is_lstm):
        if any(c.gates is not None for c in flat):
            raise ValueError(f"{call}: LSTMCarry.gates is set (gate_recurrence); PyTorch's LSTM has no such state")
        out = (jnp.stack([c.h for c in flat]), jnp.stack([c.c for c in flat]))
    else:
        out = jnp.stack(flat)
    if as_torch:
        torch = _import_torch(call)
        conv = lambda a: torch.from_numpy(np.array(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a))  # noqa: E731
        out = tuple(conv(a) for a in out) if isinstance(out, tuple) else conv(out)
    return out


def from_torch_carry(state, *, bidirectional: bool = False, num_layers: int | None = None, dtype=None):
    """Converts PyTorch's ``h_0`` / ``(h_0, c_0)`` into the carry of a `from_torch` layer (the inverse of `torch_carry`).

    Args:
      state: ``h`` [L*D, B, H] (RNN/GRU) or the pair ``(h [L*D, B, P or H],
        c [L*D, B, H])`` (LSTM), as torch tensors (any device) or arrays;
        layer-major, forward before backward.
      bidirectional: whether the module is bidirectional (D = 2).
      num_layers: L; default ``state``'s first dimension // D (checked if given).
      dtype: dtype of the carry; default the input's (pass the params' dtype).

    Returns:
      The L-tuple of per-layer carries that ``layer.apply(params, xs,
      carry=...)`` takes: ``h`` [B, H] or ``LSTMCarry(h, c)`` per layer, a
      ``(forward, backward)`` pair of them when bidirectional.

    Example:
      >>> import torch
      >>> layer = seqjax.multilayer(seqjax.lstm(16), num_layers=2, bidirectional=True)
      >>> params = layer.init(jax.random.key(0), input_size=8)
      >>> h0, c0 = torch.randn(4, 3, 16), torch.randn(4, 3, 16)       # 2 layers, bidirectional
      >>> carry = seqjax.from_torch_carry((h0, c0), bidirectional=True)
      >>> carry, ys = layer.apply(params, jnp.ones((3, 10, 8)), carry=carry)
      >>> ys.shape
      (3, 10, 32)
    """
    call = "seqjax.from_torch_carry"
    if not isinstance(bidirectional, bool):
        raise ValueError(f"{call}: bidirectional must be a bool, got {bidirectional!r}")
    D = 2 if bidirectional else 1
    is_lstm = isinstance(state, (tuple, list))
    if is_lstm and len(state) != 2:
        raise ValueError(f"{call}: state must be h [L*D, B, H] or the LSTM pair (h, c), got a sequence of length "
                         f"{len(state)}")
    parts = list(state) if is_lstm else [state]
    arrays = []
    for name, a in zip(("h", "c") if is_lstm else ("h",), parts):
        if not hasattr(a, "shape"):
            raise TypeError(f"{call}: state {name} must be a torch tensor or array, got {type(a).__name__}")
        a = _to_numpy(a) if hasattr(a, "detach") else np.asarray(a)  # slice on the host, no XLA dispatch
        if a.ndim < 2:
            raise ValueError(f"{call}: state {name} must have shape (L*D, B, H) or (L*D, H), got {tuple(a.shape)}")
        arrays.append(a)
    n = arrays[0].shape[0]
    if is_lstm and arrays[1].shape[0] != n:
        raise ValueError(f"{call}: h and c must have the same first dimension L*D, got {arrays[0].shape} and "
                         f"{arrays[1].shape}")
    if n % D:
        raise ValueError(f"{call}: state's first dimension must be num_layers * {D} (bidirectional={bidirectional}), "
                         f"got {n}")
    L = n // D
    if num_layers is not None and num_layers != L:
        raise ValueError(f"{call}: num_layers={num_layers} with bidirectional={bidirectional} needs a first dimension "
                         f"of {num_layers * D}, got {n}")

    def one(i):
        h = jnp.asarray(arrays[0][i], dtype=dtype)
        return LSTMCarry(h, jnp.asarray(arrays[1][i], dtype=dtype)) if is_lstm else h

    return tuple((one(D * k), one(D * k + 1)) if D == 2 else one(k) for k in range(L))


def _infer_structure(call, params):
    """(cell_type, num_layers, bidirectional) read off a multilayer params tuple."""
    if not isinstance(params, (tuple, list)) or isinstance(params, tuple(_PARAM_TYPES)) or not params:
        raise TypeError(f"{call}: params must be the L-tuple of per-layer params of a seqjax.multilayer layer "
                        f"(as from_torch returns), got {type(params).__name__}")
    bidi = {isinstance(p, BidirectionalParams) for p in params}
    if len(bidi) != 1:
        raise ValueError(f"{call}: params mixes bidirectional and unidirectional layers; PyTorch modules do not")
    bidirectional = bidi.pop()
    flat = [q for p in params for q in (p if bidirectional else (p,))]
    types = {type(q) for q in flat}
    if len(types) != 1 or next(iter(types)) not in _PARAM_TYPES:
        raise TypeError(f"{call}: every layer's params must be RNNParams, LSTMParams or GRUParams of one kind, got "
                        f"{sorted(t.__name__ for t in types)}")
    return _PARAM_TYPES[next(iter(types))], len(params), bidirectional, flat


def to_torch_state_dict(params, *, cell_type: str | None = None, num_layers: int | None = None,
                        bidirectional: bool | None = None, bias: bool = True) -> dict:
    """Converts multilayer params into a state dict for ``torch.nn.RNN`` / ``LSTM`` / ``GRU`` (inverse of `from_torch`).

    seqjax keeps one bias ``b = bias_ih + bias_hh``, so the split is not
    unique: all of ``b`` goes into ``bias_ih`` and ``bias_hh`` is zero, except
    GRU's ``b_hn``, which must sit in ``bias_hh[2H:]`` (inside the reset
    product). The module computes exactly the same function, though its
    ``bias_ih``/``bias_hh`` may differ from the module the params came from.

    Args:
      params: the L-tuple of per-layer params of a ``seqjax.multilayer`` layer
        over ``seqjax.rnn`` / ``seqjax.lstm`` (no peepholes, gate recurrence
        or removed gates; ``proj_size`` allowed) / ``seqjax.gru``
        (``reset_after=True``): `RNNParams` / `LSTMParams` / `GRUParams`, or a
        `BidirectionalParams` of two per layer. Shapes as in `from_torch`.
      cell_type: ``"rnn"``, ``"lstm"`` or ``"gru"`` (case-insensitive;
        ``"rnn_tanh"``/``"rnn_relu"`` accepted); default read off ``params``,
        checked if given.
      num_layers: L; default ``len(params)``, checked if given.
      bidirectional: default read off ``params``, checked if given.
      bias: False for a module built with ``bias=False``: the bias entries are
        left out (the biases in ``params`` must then be zero).

    Returns:
      A dict name -> ``torch.Tensor`` (CPU, the params' dtype) with PyTorch's
      names ``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
      ``bias_hh_l{k}`` and ``weight_hr_l{k}`` (LSTM with ``proj_size``), for
      ``module.load_state_dict``.

    Raises:
      TypeError: ``params`` is not a multilayer params tuple of one cell kind.
      ValueError: the keyword arguments disagree with ``params``, or the params
        use a feature PyTorch lacks.

    Example:
      >>> layer = seqjax.multilayer(seqjax.gru(16), num_layers=2)
      >>> params = layer.init(jax.random.key(0), input_size=8)
      >>> import torch
      >>> m = torch.nn.GRU(8, 16, num_layers=2)
      >>> m.load_state_dict(seqjax.to_torch_state_dict(params, cell_type="gru"))
      <All keys matched successfully>
    """
    call = "seqjax.to_torch_state_dict"
    torch = _import_torch(call)
    kind, L, bidi, flat = _infer_structure(call, params)
    if cell_type is not None:
        want = cell_type.lower() if isinstance(cell_type, str) else cell_type
        want = "rnn" if want in ("rnn_tanh", "rnn_relu") else want
        if want not in _CELL_TYPES:
            raise ValueError(f"{call}: cell_type must be one of {sorted(_CELL_TYPES)}, got {cell_type!r}")
        if want != kind:
            raise ValueError(f"{call}: cell_type={cell_type!r} but params are {kind} params "
                             f"({type(flat[0]).__name__})")
    if num_layers is not None and num_layers != L:
        raise ValueError(f"{call}: num_layers={num_layers!r} but params has {L} layers")
    if bidirectional is not None and bool(bidirectional) != bidi:
        raise ValueError(f"{call}: bidirectional={bidirectional!r} but params are "
                         f"{'' if bidi else 'not '}bidirectional (BidirectionalParams per layer)")
    if not isinstance(bias, bool):
        raise ValueError(f"{call}: bias must be a bool, got {bias!r}")
    G = _CELL_TYPES[kind]

    def tensor(a: np.ndarray) -> Any:
        # a fresh, writable, C-contiguous copy: never share (read-only) jax buffers with torch
        if a.dtype == jnp.bfloat16:  # NumPy (ml_dtypes) bfloat16 has no torch equivalent; go through float32
            return torch.from_numpy(np.array(a, dtype=np.float32, order="C")).to(torch.bfloat16)
        return torch.from_numpy(np.array(a, order="C"))

    out = {}
    for idx, p in enumerate(flat):
        k, suffix = (idx // 2, "_reverse" if idx % 2 else "") if bidi else (idx, "")
        where = f"params[{k}]{('.backward' if idx % 2 else '.forward') if bidi else ''}"
        H = p.w_x.shape[1] // G
        if p.w_x.shape[1] != G * H or p.w_h.shape[1] != G * H or p.b.shape != (G * H,):
            raise ValueError(f"{call}: {where} must have w_x [I, {G}H], w_h [., {G}H], b [{G}H] ({kind} with all "
                             f"gates), got w_x {tuple(p.w_x.shape)}, w_h {tuple(p.w_h.shape)}, b {tuple(p.b.shape)}")
        # host-side NumPy from here on: no per-op XLA dispatch or compilation
        w_x, w_h, b_ih = np.asarray(p.w_x), np.asarray(p.w_h), np.asarray(p.b)
        b_hh = np.zeros_like(b_ih)
        if kind == "lstm":
            for field in ("peep", "w_gates"):
                if getattr(p, field) is not None:
                    raise ValueError(f"{call}: {where}.{field} is set; torch.nn.LSTM has no "
                                     f"{'peepholes' if field == 'peep' else 'gate recurrence'}")
        if kind == "gru":
            if p.b_hn is None:
                raise ValueError(f"{call}: {where}.b_hn is None (seqjax.gru(reset_after=False)); torch.nn.GRU is "
                                 f"reset_after=True")
            b_hh[2 * H:] = np.asarray(p.b_hn)
        out[f"weight_ih_l{k}{suffix}"] = tensor(w_x.T)
        out[f"weight_hh_l{k}{suffix}"] = tensor(w_h.T)
        if bias:
            out[f"bias_ih_l{k}{suffix}"] = tensor(b_ih)
            out[f"bias_hh_l{k}{suffix}"] = tensor(b_hh)
        elif np.any(b_ih != 0) or np.any(b_hh != 0):
            raise ValueError(f"{call}: bias=False but {where} has non-zero biases; pass bias=True")
        if kind == "lstm" and p.w_proj is not None:
            out[f"weight_hr_l{k}{suffix}"] = tensor(np.asarray(p.w_proj).T)
    return out
