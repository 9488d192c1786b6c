"""seqjax: functional sequence models for JAX.

Pure-function cells (`rnn`, `lstm`, `gru`, `stack`), runners that scan them over
time (`scan`, `unrolled`), and sequence layers (`sequence`, `bidirectional`,
`deep`, `multilayer`).
"""
from seqjax.cells import (GREFF_VARIANTS, Cell, GRUParams, LSTMCarry, LSTMParams, RNNParams, gru, lstm, lstm_variant,
                          rnn, stack, symmetric_uniform)
from seqjax.layers import BidirectionalParams, Layer, bidirectional, deep, dropout, multilayer, sequence
from seqjax.scan import hoist_default, scan, unrolled

__all__ = [
    "BidirectionalParams", "Cell", "GREFF_VARIANTS", "GRUParams", "LSTMCarry", "LSTMParams", "Layer", "RNNParams",
    "bidirectional", "deep", "dropout", "gru", "hoist_default", "lstm", "lstm_variant", "multilayer", "rnn", "scan",
    "sequence", "stack", "symmetric_uniform", "unrolled",
]
