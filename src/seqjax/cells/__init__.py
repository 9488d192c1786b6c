"""Cell families: one step of a recurrent model as pure functions."""
from seqjax.cells.base import Cell, symmetric_uniform
from seqjax.cells.gru import GRUParams, gru
from seqjax.cells.lstm import GREFF_VARIANTS, LSTMCarry, LSTMParams, lstm, lstm_variant
from seqjax.cells.rnn import RNNParams, rnn
from seqjax.cells.stack import stack

__all__ = ["Cell", "GREFF_VARIANTS", "GRUParams", "LSTMCarry", "LSTMParams", "RNNParams", "gru", "lstm",
           "lstm_variant", "rnn", "stack", "symmetric_uniform"]
