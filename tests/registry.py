"""Registry of every public cell and variant; it drives the generic tests.

Each entry builds a cell; `FACTORIES` names the public factory each entry
exercises so that `test_registry_covers_public_cells` can fail when a new
public cell is added without being registered here.
"""
import seqjax

H = 5

CELLS = {
    "rnn_tanh": lambda: seqjax.rnn(H),
    "rnn_relu": lambda: seqjax.rnn(H, activation="relu"),
    "lstm": lambda: seqjax.lstm(H),
    "lstm_proj": lambda: seqjax.lstm(H, proj_size=3),
    "lstm_peep_proj": lambda: seqjax.lstm(H, peepholes=True, proj_size=4),
    **{f"lstm_{v}": (lambda v=v: seqjax.lstm_variant(v, H)) for v in seqjax.GREFF_VARIANTS},
    "gru": lambda: seqjax.gru(H),
    "gru_cho": lambda: seqjax.gru(H, reset_after=False),
    "stack": lambda: seqjax.stack([seqjax.lstm(H), seqjax.gru(4)]),
    "min_gru": lambda: seqjax.min_gru(H),
    "min_gru_log": lambda: seqjax.min_gru(H, log_space=True),
    "min_lstm": lambda: seqjax.min_lstm(H),
    "min_lstm_log": lambda: seqjax.min_lstm(H, log_space=True),
    "lru": lambda: seqjax.lru(H),
    "lru_out": lambda: seqjax.lru(H, output_size=3, r_min=0.5, r_max=0.99, max_phase=0.3),
    "rg_lru": lambda: seqjax.rg_lru(H),
    "rg_lru_identity": lambda: seqjax.rg_lru(3, c=2.0, a_min=0.5, a_max=0.99, value_projection=False),
}

# Runner invariants (jit, vmap, reverse, padding, resets) depend on the carry's structure, not on the gate
# equations, which every entry checks against NumPy: they run on one entry per carry structure.
CARRY_STRUCTURES = ["rnn_tanh", "lstm", "lstm_proj", "lstm_FGR", "gru", "stack"]

# public factory -> registry entries using it
FACTORIES = {
    "rnn": ["rnn_tanh", "rnn_relu"],
    "lstm": ["lstm", "lstm_proj", "lstm_peep_proj"],
    "lstm_variant": [f"lstm_{v}" for v in seqjax.GREFF_VARIANTS],
    "gru": ["gru", "gru_cho"],
    "stack": ["stack"],
    "min_gru": ["min_gru", "min_gru_log"],
    "min_lstm": ["min_lstm", "min_lstm_log"],
    "lru": ["lru", "lru_out"],
    "rg_lru": ["rg_lru", "rg_lru_identity"],
}
