"""seqjax: functional sequence models for JAX.

Pure-function cells (`rnn`, `lstm`, `gru`, `stack`), runners that scan them over
time (`scan`, `unrolled`), sequence layers (`sequence`, `bidirectional`,
`deep`, `multilayer`), the Optax training loop (`make_train_step`, `fit`), losses
(`seqjax.losses`) and the documented tasks' data (`seqjax.tasks`).
"""
from seqjax.cells import (GREFF_VARIANTS, Cell, GRUParams, LSTMCarry, LSTMParams, RNNParams, gru, lstm, lstm_variant,
                          rnn, stack, symmetric_uniform)
from seqjax.layers import BidirectionalParams, Layer, bidirectional, deep, dropout, multilayer, sequence
from seqjax.options import ScanOptions
from seqjax.runners import scan, unrolled
from seqjax.generation import generate
from seqjax.interop import from_torch, from_torch_carry, to_torch_state_dict, torch_carry
from seqjax.train import History, NonFiniteLossError, TrainState, fit, init_state, make_nnx_train_step, make_train_step
from seqjax import attention, backends, diagnostics, losses, nnx, seq2seq, tasks, tbptt  # noqa: E402

__all__ = [
    "BidirectionalParams", "History", "NonFiniteLossError", "TrainState", "fit", "init_state", "losses",
    "make_nnx_train_step", "make_train_step", "tasks", "diagnostics", "nnx", "attention", "seq2seq", "tbptt", "generate", "backends", "from_torch", "from_torch_carry",
    "to_torch_state_dict", "torch_carry", "Cell", "ScanOptions", "GREFF_VARIANTS", "GRUParams", "LSTMCarry", "LSTMParams", "Layer", "RNNParams",
    "bidirectional", "deep", "dropout", "gru", "lstm", "lstm_variant", "multilayer", "rnn", "scan",
    "sequence", "stack", "symmetric_uniform", "unrolled",
]
