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


def positive(v):
    """Feng et al. (2024), appendix: g(v) = v + 0.5 for v >= 0, sigmoid(v) below."""
    return np.where(v >= 0, v + 0.5, sigmoid(v))


def min_gru_step(p, h, x, log_space):
    """Feng et al. (2024) eq. minGRU: z = sigma(Linear_z(x)), h~ = Linear_h(x), h = (1 - z) h + z h~."""
    H = h.shape[-1]
    z = sigmoid(x @ p.w_x[:, :H] + p.b[:H])
    h_tilde = x @ p.w_x[:, H:] + p.b[H:]
    if log_space:
        h_tilde = positive(h_tilde)
    return (1 - z) * h + z * h_tilde


def min_lstm_step(p, h, x, log_space):
    """Feng et al. (2024) eq. minLSTM: f' = f / (f + i), i' = i / (f + i), h = f' h + i' h~."""
    H = h.shape[-1]
    f = sigmoid(x @ p.w_x[:, :H] + p.b[:H])
    i = sigmoid(x @ p.w_x[:, H:2 * H] + p.b[H:2 * H])
    h_tilde = x @ p.w_x[:, 2 * H:] + p.b[2 * H:]
    if log_space:
        h_tilde = positive(h_tilde)
    return f / (f + i) * h + i / (f + i) * h_tilde


def rg_lru_step(p, h, x, c, value_projection):
    """De et al. (2024), eqs. (1)-(4): r = sigma(W_a x), i = sigma(W_x x), a_t = a^(c r), a = sigma(Lambda),
    h = a_t h + sqrt(1 - a_t^2) (i x); here Lambda = -a_param and the value is x W_v + b_v unless given as x."""
    H = h.shape[-1]
    r = sigmoid(x @ p.w_x[:, :H] + p.b[:H])
    i = sigmoid(x @ p.w_x[:, H:2 * H] + p.b[H:2 * H])
    v = x @ p.w_x[:, 2 * H:] + p.b[2 * H:] if value_projection else x
    a = sigmoid(-p.a_param)
    a_t = a ** (c * r)
    return a_t * h + np.sqrt(1 - a_t ** 2) * (i * v)


def lru_step(p, x_state, u):
    """Orvieto et al. (2023), eq. (7) and section 3: x = lambda x + gamma (B u), y = Re(C x) + D u.

    ``x_state`` complex [..., N]; the params are the transposed (row-vector) matrices.
    """
    lam = np.exp(-np.exp(p.nu_log) + 1j * np.exp(p.theta_log))
    gamma = np.exp(p.gamma_log)
    x_state = lam * x_state + gamma * (u @ (p.b_re + 1j * p.b_im))
    y = (x_state @ (p.c_re + 1j * p.c_im)).real + u @ p.d
    return x_state, y
