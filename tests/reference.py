"""NumPy transcriptions of the cell equations, written independently of seqjax.

They read seqjax's documented parameter layouts (gate order, shapes) and
nothing else: the maths here is the source documents' equations.
"""
import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def rnn_step(p, h, x, act):
    return act(x @ p.w_x + h @ p.w_h + p.b)


def gru_step(p, h, x, reset_after):
    H = h.shape[-1]
    W = {g: p.w_x[:, k * H:(k + 1) * H] for k, g in enumerate("rzn")}
    U = {g: p.w_h[:, k * H:(k + 1) * H] for k, g in enumerate("rzn")}
    b = {g: p.b[k * H:(k + 1) * H] for k, g in enumerate("rzn")}
    r = sigmoid(x @ W["r"] + h @ U["r"] + b["r"])
    z = sigmoid(x @ W["z"] + h @ U["z"] + b["z"])
    if reset_after:
        n = np.tanh(x @ W["n"] + b["n"] + r * (h @ U["n"] + p.b_hn))
    else:
        n = np.tanh(x @ W["n"] + b["n"] + (r * h) @ U["n"])
    return (1 - z) * n + z * h


def lstm_step(p, carry, x, *, input_gate=True, forget_gate=True, output_gate=True, coupled=False,
              in_act=np.tanh, out_act=np.tanh):
    """Greff et al. (2017) vanilla LSTM step and its variants; carry = (y, c, gates_prev)."""
    y_prev, c_prev, g_prev = carry
    H = c_prev.shape[-1]
    gates = [g for g, on in (("i", input_gate), ("f", forget_gate and not coupled), ("z", True),
                             ("o", output_gate)) if on]
    sig = [g for g in ("i", "f", "o") if g in gates]
    a = {g: x @ p.w_x[:, k * H:(k + 1) * H] + y_prev @ p.w_h[:, k * H:(k + 1) * H] + p.b[k * H:(k + 1) * H]
         for k, g in enumerate(gates)}
    if p.w_gates is not None:
        for s, g in enumerate(sig):
            a[g] = a[g] + g_prev @ p.w_gates[:, s * H:(s + 1) * H]
    peep = {g: (p.peep[s] if p.peep is not None else 0.0) for s, g in enumerate(sig)}
    z = in_act(a["z"])
    i = sigmoid(a["i"] + peep["i"] * c_prev) if "i" in a else 1.0
    if coupled:
        f = 1.0 - i
    else:
        f = sigmoid(a["f"] + peep["f"] * c_prev) if "f" in a else 1.0
    c = z * i + c_prev * f
    o = sigmoid(a["o"] + peep["o"] * c) if "o" in a else 1.0
    y = out_act(c) * o
    if p.w_proj is not None:
        y = y @ p.w_proj
    acts = {"i": i, "f": f, "o": o}
    new_g = np.concatenate([np.broadcast_to(acts[g], c.shape) for g in sig], -1) if p.w_gates is not None else None
    return (y, c, new_g), y
