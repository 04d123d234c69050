"""Names and conventions of the exported `.tflite` file, shared by the export and the runtime.

They follow Google's LiteRT-LM / MediaPipe LLM conventions. No TensorFlow here.
"""

from __future__ import annotations

DECODE = "decode"
PREFILL_PREFIX = "prefill_"
# Optional `score_<T>` signatures (export option `score_lens`): prefill_<T> that also returns
# the logits at every position, float32 [1, T, vocab], for perplexity and evaluation.
SCORE_PREFIX = "score_"
TOKENS, INPUT_POS, MASK, LOGITS = "tokens", "input_pos", "mask", "logits"

# `mask` is additive: 0 where visible, very negative where not. The graph treats entries above
# this threshold as visible, so -inf, -1e9 and LiteRT-LM's -0.7 * FLT_MAX all hide a key.
MASK_VISIBLE_ABOVE = -1.0
MASK_HIDDEN = -0.7 * 3.4028234663852886e38  # what LiteRT-LM writes


def cache_names(num_layers):
    """(["kv_cache_k_0", ...], ["kv_cache_v_0", ...]) for `num_layers` layers."""
    return ([f"kv_cache_k_{i}" for i in range(num_layers)],
            [f"kv_cache_v_{i}" for i in range(num_layers)])


def prefill_name(seq_len):
    return f"{PREFILL_PREFIX}{int(seq_len)}"


def score_name(seq_len):
    return f"{SCORE_PREFIX}{int(seq_len)}"


def prefill_lengths(signature_names, prefix=PREFILL_PREFIX):
    """Sorted lengths T of the `<prefix><T>` signatures among `signature_names` (by default
    the `prefill_<T>` ones; `prefix=SCORE_PREFIX` for `score_<T>`)."""
    lens = []
    for name in signature_names:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            lens.append(int(name[len(prefix):]))
    return sorted(lens)
