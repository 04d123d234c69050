"""Gemma's conventions, in one place: the model, the converters, the exports, the runtimes, the
requantizer and the benchmarks import them from here, and no other module defines them.

Pure Python (no NumPy, TensorFlow or Keras), so the TFLite runtime can import it.

- Special token ids and the chat turn format (Gemma's `tokenizer.model`).
- The KV cache layout: per layer, keys [batch, kv_heads, slots, head_dim] and values
  transposed, [batch, kv_heads, head_dim, slots]; how many slots a generation allocates.
- The attention mask of the exported files: additive, 0 where a key is visible.
- The stored embedding table of the TFLite export, `E / final_logit_softcapping`.
- The names of the exported `.tflite` file's signatures, tensors and metadata.
"""

from __future__ import annotations

# ------------------------------------------------------------------ special tokens
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 106, 107
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_PIECES = {PAD_ID: "<pad>", EOS_ID: "<eos>", BOS_ID: "<bos>",
                  START_OF_TURN_ID: START_OF_TURN, END_OF_TURN_ID: END_OF_TURN}
# Generation stops after either (a base model ends with <eos>, an instruction-tuned one
# ends its turn with <end_of_turn>).
STOP_IDS = (EOS_ID, END_OF_TURN_ID)

# ------------------------------------------------------------------ chat turns
# `<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n`; "assistant" is read as
# Gemma's "model" role. Gemma 2 has no system turn.
TURN_ROLES = {"user": "user", "model": "model", "assistant": "model"}


def turn(role, text):
    """One complete chat turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n`."""
    return f"{START_OF_TURN}{TURN_ROLES[role]}\n{text}{END_OF_TURN}\n"


def turn_start(role):
    """The opening of a turn, `<start_of_turn>{role}\\n` (the generation prompt for "model")."""
    return f"{START_OF_TURN}{TURN_ROLES[role]}\n"


# ------------------------------------------------------------------ KV cache
CACHE_SLOT_AXIS = 2  # of the keys; the values keep slots last


def cache_shapes(config, batch_size, slots):
    """`(k_shape, v_shape)` of one layer's cache: keys [batch, kv_heads, slots, head_dim],
    values transposed, [batch, kv_heads, head_dim, slots]."""
    return ((batch_size, config.num_key_value_heads, slots, config.head_dim),
            (batch_size, config.num_key_value_heads, config.head_dim, slots))


def cache_names(num_layers):
    """(["kv_cache_k_0", ...], ["kv_cache_v_0", ...]): the exported files' cache tensors."""
    return ([f"kv_cache_k_{i}" for i in range(num_layers)],
            [f"kv_cache_v_{i}" for i in range(num_layers)])


# ------------------------------------------------------------------ attention mask
# The exported files take an additive mask: 0 where visible, very negative where not. The graph
# treats entries above MASK_VISIBLE_ABOVE as visible, so -inf, -1e9 and LiteRT-LM's
# -0.7 * FLT_MAX all hide a key.
MASK_VISIBLE_ABOVE = -1.0
MASK_HIDDEN = -0.7 * 3.4028234663852886e38  # what LiteRT-LM writes


# ------------------------------------------------------------------ stored embedding table
def stored_table_scale(config):
    """The factor the TFLite export stores the tied embedding multiplied by: `1 / cap` with
    `cap = final_logit_softcapping` (1 without a cap).

    TensorFlow's converter folds a constant scale after FULLY_CONNECTED into a scaled copy of
    its weights, so `cap * tanh((h @ E.T) / cap)` would store the embedding twice. Stored as
    `E / cap`, the head needs no scale and the token lookup multiplies by
    `sqrt(hidden) * cap` instead of `sqrt(hidden)`: both read the same tensor.
    """
    cap = config.final_logit_softcapping
    return 1.0 / cap if cap else 1.0


# ------------------------------------------------------------------ the .tflite file
DECODE = "decode"
PREFILL_PREFIX = "prefill_"
# Optional `score_<T>` signatures (export option `score_lens`): prefill_<T> that also returns
# the logits at every position, float32 [1, T, vocab], for perplexity and evaluation.
SCORE_PREFIX = "score_"
TOKENS, INPUT_POS, MASK, LOGITS = "tokens", "input_pos", "mask", "logits"
# Metadata entry of the export: JSON `{checkpoint tensor name: buffer index}` of every stored
# weight, so that tools find a weight by name, never by comparing values.
WEIGHT_MAP_METADATA = "gemma_keras_weights"


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


# ------------------------------------------------------------------ generation cache sizes
# How a generation sizes its KV cache, so that a compiled step serves many prompt lengths:
# prompts are left-padded to a multiple of PREFILL_CHUNK and prefilled one chunk at a time,
# and the cache gets `cache_slots_for(prompt slots + new tokens)` slots. Keras `generate`
# and the SavedModel's XLA export (its TensorFlow twin, `serving.module.cache_slots_for`)
# follow it.
PREFILL_CHUNK = 32
MIN_CACHE_SLOTS = 64


def cache_slots_for(n_tokens):
    """The cache slots a generation allocates for `n_tokens` tokens: the next power of two
    (at least MIN_CACHE_SLOTS) up to 4096, then the next multiple of 1024."""
    n_tokens = int(n_tokens)
    if n_tokens > 4096:
        return -(-n_tokens // 1024) * 1024
    return max(MIN_CACHE_SLOTS, 1 << (n_tokens - 1).bit_length())
