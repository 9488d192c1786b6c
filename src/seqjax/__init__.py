"""seqjax: functional sequence models for JAX.

Pure-function cells (`rnn`, `lstm`, `gru`, `stack`, and the linear-recurrence
cells `min_gru`, `min_lstm`, `lru`, `rg_lru` that `scan` can also evaluate in parallel),
runners that scan them over time (`scan`, `unrolled`) with their execution
options (`ScanOptions`), sequence layers (`sequence`, `bidirectional`, `deep`,
`multilayer`), the Optax training loop (`make_train_step`, `fit`), losses
(`seqjax.losses`), the documented tasks' data (`seqjax.tasks`) and a small Transformer baseline
(`seqjax.transformer`). `seqjax.backends.explain` shows which
implementation a call runs on.
"""
from seqjax.cells import (GREFF_VARIANTS, Cell, GRUParams, LRUParams, LSTMCarry, LSTMParams, MinGRUParams, MinLSTMParams,
                          RGLRUParams, RNNParams, gru, lru, lstm, lstm_variant, min_gru, min_lstm, rg_lru, rnn, stack,
                          symmetric_uniform)
from seqjax.layers import (BidirectionalParams, InitialCarryParams, Layer, bidirectional, deep, dropout, multilayer,
                           sequence)
from seqjax.options import NewtonOptions, ScanOptions
from seqjax.runners import scan, unrolled
from seqjax.generation import generate
from seqjax.interop import from_torch, from_torch_carry, to_torch_state_dict, torch_carry
from seqjax.train import History, NonFiniteLossError, TrainState, fit, init_state, make_nnx_train_step, make_train_step
from seqjax import (attention, backends, checkpoint, diagnostics, losses, nnx, seq2seq, sharding,  # noqa: E402
                    tasks, tbptt, transformer)

__all__ = [
    # cells and their params
    "Cell", "GREFF_VARIANTS", "GRUParams", "LSTMCarry", "LSTMParams", "RNNParams", "gru", "lstm", "lstm_variant",
    "rnn", "stack", "symmetric_uniform", "LRUParams", "MinGRUParams", "MinLSTMParams", "lru", "min_gru", "min_lstm",
    "RGLRUParams", "rg_lru",
    # runners and layers
    "NewtonOptions", "ScanOptions", "scan", "unrolled", "BidirectionalParams", "InitialCarryParams", "Layer",
    "bidirectional", "deep", "dropout",
    "multilayer", "sequence", "generate",
    # training
    "History", "NonFiniteLossError", "TrainState", "fit", "init_state", "make_nnx_train_step", "make_train_step",
    # PyTorch interop
    "from_torch", "from_torch_carry", "to_torch_state_dict", "torch_carry",
    # modules
    "attention", "backends", "checkpoint", "diagnostics", "losses", "nnx", "seq2seq", "sharding", "tasks", "tbptt",
    "transformer",
]
