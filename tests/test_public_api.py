"""The public surface is pinned: a name added to or dropped from an ``__all__`` fails here until this file says so."""
import importlib
import types

import pytest

import seqjax

PUBLIC = {
    "seqjax": {
        "BidirectionalParams", "Cell", "GREFF_VARIANTS", "GRUParams", "History", "InitialCarryParams", "LRUParams",
        "LSTMCarry", "LSTMParams", "Layer", "MinGRUParams", "MinLSTMParams", "NewtonOptions", "NonFiniteLossError",
        "RGLRUParams", "RNNParams", "ScanOptions",
        "TrainState", "attention", "backends", "bidirectional", "checkpoint", "deep", "diagnostics", "dropout", "fit",
        "from_torch", "from_torch_carry", "generate", "gru", "init_state", "losses", "lru", "lstm", "lstm_variant",
        "make_nnx_train_step", "make_train_step", "min_gru", "min_lstm", "multilayer", "nnx", "rg_lru", "rnn", "scan",
        "seq2seq", "sequence", "sharding", "stack", "symmetric_uniform", "tasks", "tbptt", "to_torch_state_dict",
        "torch_carry", "transformer", "unrolled",
    },
    "seqjax.backends": {"Explanation", "NativeUnavailable", "explain", "names"},
    "seqjax.sharding": {"DataParallel", "data_parallel"},
    "seqjax.checkpoint": {"Checkpoints"},
    "seqjax.nnx": {"Cell", "GRU", "LSTM", "RNN", "Recurrent", "SequenceClassifier", "pytorch_init"},
    "seqjax.tbptt": {"Stream", "TBPTTStep", "Window", "batchify", "evaluate", "fit", "make_eval", "make_step",
                     "windows"},
    "seqjax.losses": {"last_step_cross_entropy", "last_valid", "masked_binary_cross_entropy", "masked_cross_entropy",
                      "mean_valid", "mse"},
    "seqjax.tasks": {"ADDING_TOLERANCE", "BLANK", "CLASSES_6A", "CLASSES_6B", "COMPARE_SPLITS", "CompareSplits", "LEVELS",
                     "SYMBOLS", "TaskBatch", "TemporalOrderLevel", "adding_correct", "adding_problem",
                     "compare_batch", "compare_dataset", "copy_accuracy", "decode", "selective_copy",
                     "temporal_order", "temporal_order_6b"},
    "seqjax.attention": {"AdditiveParams", "MultiHeadParams", "additive_attention", "additive_init",
                         "additive_project_keys", "additive_scores", "attend", "dot_attention", "dot_scores",
                         "key_mask", "masked_softmax", "multi_head_attention", "multi_head_init",
                         "scaled_dot_attention"},
    "seqjax.seq2seq": {"ATTENTIONS", "AttentionDecoder", "AttentionDecoderCarry", "AttentionDecoderParams",
                       "BeamResult", "GreedyResult", "Seq2Seq", "Seq2SeqBatch", "Seq2SeqParams", "TokenDecoderParams",
                       "Vec2SeqParams", "Vocabulary", "attention_decoder", "beam_search", "exact_match",
                       "greedy_decode", "seq2seq", "tile_beams", "vec2seq"},
    "seqjax.transformer": {"DecodeCarry", "DecoderBlockParams", "Encoder", "EncoderBlockParams", "EncoderParams",
                           "FeedForwardParams", "LayerNormParams", "Seq2SeqParams", "causal_mask", "decoder_block",
                           "encoder", "encoder_block", "feed_forward", "layer_norm", "seq2seq",
                           "sinusoidal_positions"},
    "seqjax.diagnostics": {"StepGradients", "recurrent_matrices", "rnn_gradient_bound", "spectral_norm",
                           "spectral_radius", "step_gradients"},
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_all_is_pinned_and_every_name_exists(module):
    mod = importlib.import_module(module)
    assert set(mod.__all__) == PUBLIC[module]
    assert len(mod.__all__) == len(set(mod.__all__)), "a name is listed twice"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is in __all__ but missing"


def test_backend_modules_are_private():
    """The fast paths live in seqjax.backends' private modules; none is a public attribute of seqjax."""
    for name in ("fused", "native", "avx2", "onednn", "cuda", "persistent", "hoist_default", "unroll_default"):
        assert not hasattr(seqjax, name), name
    import seqjax.backends as b
    public_modules = [n for n in dir(b) if not n.startswith("_") and isinstance(getattr(b, n), types.ModuleType)]
    assert public_modules == []


def test_no_public_function_is_shadowed_by_a_module_of_the_same_name():
    """``from seqjax import scan`` and ``seqjax.generate`` are the functions, and no module is named after them."""
    for name in seqjax.__all__:
        value = getattr(seqjax, name)
        if callable(value) and not isinstance(value, type):
            with pytest.raises(ModuleNotFoundError):
                importlib.import_module(f"seqjax.{name}")
