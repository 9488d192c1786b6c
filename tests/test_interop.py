"""seqjax.interop: torch.nn.RNN/LSTM/GRU -> seqjax layers and back, against PyTorch itself."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import seqjax  # noqa: E402
from seqjax.interop import from_torch, from_torch_carry, to_torch_state_dict, torch_carry  # noqa: E402

pytestmark = pytest.mark.torch

I, H, P, B, T = 3, 5, 3, 4, 6
LENGTHS = np.array([6, 2, 5, 1])  # includes the full T; unsorted (enforce_sorted=False)
TOL = 1e-5

MODES = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


def make_module(mode, num_layers=1, bidirectional=False, bias=True, batch_first=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
              dropout=dropout)
    if mode.startswith("rnn"):
        m = torch.nn.RNN(I, H, nonlinearity=mode[4:], **kw)
    elif mode == "lstm":
        m = torch.nn.LSTM(I, H, **kw)
    elif mode == "lstm_proj":
        m = torch.nn.LSTM(I, H, proj_size=P, **kw)
    else:
        m = torch.nn.GRU(I, H, **kw)
    if bias:  # make bias_ih and bias_hh clearly distinct so a wrong split would show
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("bias"):
                    p.uniform_(-0.5, 0.5)
    return m.eval()


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, T, I)).astype(np.float32)


def run_torch(m, xs, lengths=None, state=None, grad=False):
    """Runs ``m`` on batch-major ``xs``; returns (ys [B, T, O], h_n or (h_n, c_n), dloss/dxs or None)."""
    x = torch.tensor(xs, requires_grad=grad)
    x_in = x if m.batch_first else x.transpose(0, 1)
    if lengths is not None:
        x_in = torch.nn.utils.rnn.pack_padded_sequence(x_in, torch.as_tensor(lengths), batch_first=m.batch_first,
                                                       enforce_sorted=False)
    out, hn = m(x_in, state)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=m.batch_first, total_length=T)
    if not m.batch_first:
        out = out.transpose(0, 1)
    g = None
    if grad:
        (out ** 2).sum().backward()
        g = x.grad.numpy()
    hn = tuple(t.detach().numpy() for t in hn) if isinstance(hn, tuple) else hn.detach().numpy()
    return out.detach().numpy(), hn, g


def assert_close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def assert_state_close(ours, theirs):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == 2
        for a, b in zip(ours, theirs):
            assert_close(a, b)
    else:
        assert_close(ours, theirs)


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_torch(mode, num_layers, bidirectional):
    batch_first = (num_layers == 1) != bidirectional  # both layouts, across the grid
    m = make_module(mode, num_layers, bidirectional, batch_first=batch_first)
    layer, params = from_torch(m)
    xs = inputs()
    D = 2 if bidirectional else 1
    O = (P if mode == "lstm_proj" else H) * D
    assert layer.output_size == O
    apply = jax.jit(layer.apply)
    # deep stacks only padded (LENGTHS includes the full T) to keep compile time down
    for lengths in ((None, LENGTHS) if num_layers == 1 else (LENGTHS,)):
        ys_t, hn_t, _ = run_torch(m, xs, lengths)
        carry, ys = apply(params, jnp.asarray(xs), lengths=None if lengths is None else jnp.asarray(lengths))
        assert ys.shape == (B, T, O)
        assert_close(ys, ys_t)
        assert_state_close(torch_carry(carry), hn_t)
        if lengths is not None:
            assert np.all(np.asarray(ys)[1, 2:] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_bias_false(mode):
    m = make_module(mode, num_layers=1, bidirectional=True, bias=False)
    layer, params = from_torch(m)
    for p in jax.tree.leaves(params[0]):
        assert p.dtype == jnp.float32
    assert not np.any(np.asarray(params[0].backward.b))
    xs = inputs()
    ys_t, hn_t, _ = run_torch(m, xs, LENGTHS)
    carry, ys = jax.jit(layer.apply)(params, xs, lengths=jnp.asarray(LENGTHS))
    assert_close(ys, ys_t)
    assert_state_close(torch_carry(carry), hn_t)


@pytest.mark.parametrize("mode", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_initial_state(mode):
    m = make_module(mode, num_layers=2, bidirectional=True)
    layer, params = from_torch(m)
    torch.manual_seed(2)
    h_size = P if mode == "lstm_proj" else H
    h0 = torch.randn(4, B, h_size)
    state = (h0, torch.randn(4, B, H)) if mode.startswith("lstm") else h0
    carry0 = from_torch_carry(state, bidirectional=True, num_layers=2)
    # the round trip through torch_carry is exact
    assert_state_close(torch_carry(carry0), tuple(s.numpy() for s in state) if isinstance(state, tuple)
                       else state.numpy())
    xs = inputs()
    ys_t, hn_t, _ = run_torch(m, xs, LENGTHS, state=state)
    carry, ys = jax.jit(layer.apply)(params, xs, carry=carry0, lengths=jnp.asarray(LENGTHS))
    assert_close(ys, ys_t)
    assert_state_close(torch_carry(carry), hn_t)
    as_t = torch_carry(carry, as_torch=True)
    assert isinstance(as_t[0] if isinstance(as_t, tuple) else as_t, torch.Tensor)


@pytest.mark.parametrize("mode, padded", [("lstm", False), ("lstm", True), ("lstm_proj", True), ("gru", False),
                                           ("gru", True), ("rnn_relu", True)])
def test_input_gradients(mode, padded):
    m = make_module(mode, num_layers=2 if mode == "lstm" else 1, bidirectional=padded)
    layer, params = from_torch(m)
    xs = inputs()
    lengths = LENGTHS if padded else None
    _, _, g_t = run_torch(m, xs, lengths, grad=True)

    def loss(x):
        _, ys = layer.apply(params, x, lengths=None if lengths is None else jnp.asarray(lengths))
        return jnp.sum(ys ** 2)

    g = jax.jit(jax.grad(loss))(jnp.asarray(xs))
    assert_close(g, g_t)
    if padded:
        assert np.all(np.asarray(g)[1, 2:] == 0)


def assert_same_function(m1, m2, xs):
    y1, h1, _ = run_torch(m1, xs, LENGTHS)
    y2, h2, _ = run_torch(m2, xs, LENGTHS)
    assert_close(y1, y2, 1e-6)
    assert_state_close(h1, h2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_state_dict(mode, bias):
    m = make_module(mode, num_layers=2, bidirectional=True, bias=bias)
    layer, params = from_torch(m)
    sd = to_torch_state_dict(params, cell_type=mode.split("_")[0], num_layers=2, bidirectional=True, bias=bias)
    ref = m.state_dict()
    assert set(sd) == set(ref)
    for name, t in ref.items():
        assert sd[name].shape == t.shape and sd[name].dtype == t.dtype, name
        if name.startswith("weight"):
            assert torch.equal(sd[name], t), name
    for name in ref:
        if name.startswith("bias_ih"):
            other = name.replace("bias_ih", "bias_hh")
            if mode == "gru":  # r, z sum; n stays split (b_in, b_hn)
                torch.testing.assert_close(sd[name][:2 * H] + sd[other][:2 * H], ref[name][:2 * H] + ref[other][:2 * H])
                torch.testing.assert_close(sd[name][2 * H:], ref[name][2 * H:])
                torch.testing.assert_close(sd[other][2 * H:], ref[other][2 * H:])
            else:
                torch.testing.assert_close(sd[name] + sd[other], ref[name] + ref[other])
    m2 = make_module(mode, num_layers=2, bidirectional=True, bias=bias, seed=99)
    m2.load_state_dict(sd)
    assert_same_function(m, m2, inputs())
    # and back again: the same seqjax params
    _, params2 = from_torch(m2)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert_close(a, b, 1e-6)


def test_seqjax_params_to_torch():
    layer = seqjax.multilayer(seqjax.gru(H), num_layers=2)
    rng = np.random.default_rng(0)  # seqjax-made params (NumPy: jax.random compiles slowly on CPU)
    r = lambda *shape: jnp.asarray(rng.uniform(-0.5, 0.5, shape), jnp.float32)  # noqa: E731
    params = tuple(seqjax.GRUParams(r(i, 3 * H), r(H, 3 * H), r(3 * H), r(H)) for i in (I, H))
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(lambda k: layer.init(k, I), jax.random.key(0)))
    m = torch.nn.GRU(I, H, num_layers=2, batch_first=True)
    m.load_state_dict(to_torch_state_dict(params))
    xs = inputs()
    ys_t, hn_t, _ = run_torch(m, xs, LENGTHS)
    carry, ys = jax.jit(layer.apply)(params, xs, lengths=jnp.asarray(LENGTHS))
    assert_close(ys, ys_t)
    assert_close(torch_carry(carry), hn_t)


def test_dropout_carried_over():
    m = make_module("lstm", num_layers=2, dropout=0.25)
    layer, params = from_torch(m)
    assert "dropout_rate=0.25" in layer.name
    xs = inputs()
    _, y_train = jax.jit(layer.apply)(params, xs, key=jax.random.key(0))  # dropout on (eval is tested above)
    assert not np.allclose(np.asarray(y_train), run_torch(m, xs)[0], atol=1e-3)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_errors():
    with pytest.raises(TypeError, match="module must be a torch.nn.RNN"):
        from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="LSTMCell"):
        from_torch(torch.nn.LSTMCell(3, 4))
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            from_torch(torch.nn.GRU(3, 4).double())
        _, p64 = from_torch(torch.nn.GRU(3, 4).double(), dtype=jnp.float32)
        assert p64[0].w_h.dtype == jnp.float32
    with pytest.raises(TypeError, match="floating point"):
        from_torch(torch.nn.GRU(3, 4).to(torch.complex64))
    _, params = from_torch(make_module("gru", num_layers=2))
    with pytest.raises(ValueError, match="cell_type='lstm'"):
        to_torch_state_dict(params, cell_type="lstm")
    with pytest.raises(ValueError, match="cell_type must be one of"):
        to_torch_state_dict(params, cell_type="transformer")
    with pytest.raises(ValueError, match="num_layers=3"):
        to_torch_state_dict(params, num_layers=3)
    with pytest.raises(ValueError, match="bidirectional=True"):
        to_torch_state_dict(params, bidirectional=True)
    with pytest.raises(ValueError, match="bias=False"):
        to_torch_state_dict(params, bias=False)
    with pytest.raises(TypeError, match="L-tuple"):
        to_torch_state_dict(params[0])
    z = np.zeros
    with pytest.raises(ValueError, match="peep"):
        to_torch_state_dict((seqjax.LSTMParams(z((I, 4 * H)), z((H, 4 * H)), z(4 * H), peep=z((3, H))),))
    with pytest.raises(ValueError, match="all gates"):  # e.g. CIFG: 3 gate blocks
        to_torch_state_dict((seqjax.LSTMParams(z((I, 3 * H)), z((H, 3 * H)), z(3 * H)),))
    with pytest.raises(ValueError, match="reset_after"):
        to_torch_state_dict((seqjax.GRUParams(z((I, 3 * H)), z((H, 3 * H)), z(3 * H), None),))
    with pytest.raises(ValueError, match="num_layers \\* 2"):
        from_torch_carry(torch.zeros(3, B, H), bidirectional=True)
    with pytest.raises(ValueError, match="num_layers=2"):
        from_torch_carry(torch.zeros(3, B, H), num_layers=2)
    with pytest.raises(TypeError, match="L-tuple"):
        torch_carry(jnp.zeros((B, H)))


def test_bfloat16_module():
    m = make_module("gru").to(torch.bfloat16)
    layer, params = from_torch(m)
    assert params[0].w_x.dtype == jnp.bfloat16
    sd = to_torch_state_dict(params)
    assert sd["weight_ih_l0"].dtype == torch.bfloat16
    assert torch.equal(sd["weight_ih_l0"], m.weight_ih_l0)
    _, params32 = from_torch(m, dtype=jnp.float32)
    assert params32[0].w_x.dtype == jnp.float32


def test_import_does_not_import_torch():
    code = "import seqjax, seqjax.interop, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
