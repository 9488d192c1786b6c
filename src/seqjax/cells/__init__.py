"""Cell families: one step of a recurrent model as pure functions."""
from seqjax.cells.base import Cell, symmetric_uniform
from seqjax.cells.gru import GRUParams, gru
from seqjax.cells.lru import LRUParams, lru
from seqjax.cells.lstm import GREFF_VARIANTS, LSTMCarry, LSTMParams, lstm, lstm_variant
from seqjax.cells.min_rnn import MinGRUParams, MinLSTMParams, min_gru, min_lstm
from seqjax.cells.rg_lru import RGLRUParams, rg_lru
from seqjax.cells.rnn import RNNParams, rnn
from seqjax.cells.stack import stack

__all__ = ["Cell", "GREFF_VARIANTS", "GRUParams", "LRUParams", "LSTMCarry", "LSTMParams", "MinGRUParams",
           "MinLSTMParams", "RGLRUParams", "RNNParams", "gru", "lru", "lstm", "lstm_variant", "min_gru", "min_lstm", "rg_lru",
           "rnn", "stack",
           "symmetric_uniform"]
