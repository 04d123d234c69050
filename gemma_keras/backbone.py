"""The Gemma 2 decoder stack: scaled token embedding, decoder blocks, final RMSNorm."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from gemma_keras import conventions
from gemma_keras.attention import attention_masks
from gemma_keras.config import Gemma2Config
from gemma_keras.decoder_block import Gemma2DecoderBlock
from gemma_keras.layers import _PACKAGE, RMSNorm, TiedEmbedding
from gemma_keras.quantization import policy_map


def as_config(config) -> Gemma2Config:
    """Accept a Gemma2Config, a dict of its fields, or a preset name."""
    if isinstance(config, Gemma2Config):
        return config
    if isinstance(config, dict):
        return Gemma2Config.from_dict(config)
    if isinstance(config, str):
        return Gemma2Config.preset(config)
    raise TypeError(f"expected a Gemma2Config, dict or preset name, got {type(config).__name__}")


def check_token_ids(token_ids, vocab_size):
    """Raise ValueError if concrete token ids fall outside [0, vocab_size).

    Symbolic tensors (inside a compiled function) cannot be inspected and pass unchecked;
    every eager entry point (calls, generate, fit data) is checked.
    """
    try:
        ids = np.asarray(token_ids)
    except Exception:  # a traced/symbolic tensor
        return
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(
            f"token ids must be in [0, {vocab_size}); got {bad.size} out-of-range id(s), "
            f"e.g. {bad.ravel()[:5].tolist()}"
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gemma2Backbone(keras.Model):
    """Gemma 2 without the output head: token ids in, final normalised hidden states out.

    Weights are created at construction. Three ways in, one stack of blocks:
      `call({"token_ids", "padding_mask"})`  full sequences, right padding (training, scoring)
      `call_with_cache(token_ids, cache, cache_index, start)`  generation from a KV cache
      `run_blocks(x, positions, masks, cache, cache_index)`  explicit positions and masks
                                                             (used by the TFLite export)

    Example:
    >>> backbone = Gemma2Backbone(Gemma2Config(vocab_size=64, hidden_size=16,
    ...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8))
    >>> backbone({"token_ids": np.array([[2, 5, 7]]), "padding_mask": np.ones((1, 3))}).shape
    (1, 3, 16)
    """

    def __init__(self, config, dtype=None, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        config = as_config(config)
        self.config = config
        policy = self.dtype_policy
        self.embed_tokens = TiedEmbedding(
            config.vocab_size, config.hidden_size, name="embed_tokens", dtype=policy,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        self.blocks = [
            Gemma2DecoderBlock(
                config.hidden_size, config.intermediate_size, config.num_attention_heads,
                config.num_key_value_heads, config.head_dim, config.query_pre_attn_scalar,
                config.attn_logit_softcapping, config.rope_theta, config.rms_norm_eps,
                name=f"decoder_block_{i}", dtype=policy,
            )
            for i in range(config.num_hidden_layers)
        ]
        self.final_norm = RMSNorm(config.rms_norm_eps, name="final_norm", dtype=policy)

        self.embed_tokens.build((None, None))
        for block in self.blocks:
            block.build()
        self.final_norm.build((None, None, config.hidden_size))
        self.built = True

    def build(self, input_shape=None):
        """Weights are created in the constructor; nothing is left to build."""

    # -------------------------------------------------------------------- pieces
    def embed(self, token_ids):
        """Token embeddings multiplied by sqrt(hidden_size), in the compute dtype."""
        x = self.embed_tokens(token_ids)
        return x * ops.cast(self.config.hidden_size**0.5, x.dtype)

    def run_blocks(self, x, positions, masks, cache=None, cache_index=None):
        """Apply every block and the final norm.

        `masks` is `(full, sliding)` from `attention_masks`; each layer takes the one its
        type needs. `cache` is a list with one `(k, v)` per layer, or None.
        Returns `(hidden, new_cache)`.
        """
        full, sliding = masks
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            mask = sliding if self.config.is_sliding(i) else full
            x, layer_cache = block(
                x, positions, mask,
                cache=None if cache is None else cache[i], cache_index=cache_index,
            )
            if cache is not None:
                new_cache.append(layer_cache)
        return self.final_norm(x), new_cache

    # --------------------------------------------------------------- front doors
    def call(self, inputs):
        """`{"token_ids": int [B, T], "padding_mask": [B, T]}` -> hidden states [B, T, hidden]."""
        token_ids = inputs["token_ids"]
        check_token_ids(token_ids, self.config.vocab_size)
        batch, seq = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = ops.ones((batch, seq), dtype="bool")
        positions = ops.broadcast_to(ops.arange(seq, dtype="int32")[None, :], (batch, seq))
        masks = attention_masks(positions, positions, padding_mask, self.config.sliding_window)
        hidden, _ = self.run_blocks(self.embed(token_ids), positions, masks)
        return hidden

    def cache_shapes(self, batch_size, max_length):
        """`(k_shape, v_shape)` of one layer's cache: keys [batch, kv_heads, max_length,
        head_dim] and values transposed, [batch, kv_heads, head_dim, max_length] (see
        `Gemma2Attention`)."""
        return conventions.cache_shapes(self.config, batch_size, max_length)

    @staticmethod
    def cache_size(cache):
        """The number of slots of a cache made by `init_cache` (the axis `cache_shapes` puts
        them on)."""
        return ops.shape(cache[0][0])[conventions.CACHE_SLOT_AXIS]

    def init_cache(self, batch_size, max_length, dtype=None):
        """An empty KV cache: per layer `(k, v)`, shaped as `cache_shapes` says."""
        k_shape, v_shape = self.cache_shapes(batch_size, max_length)
        dtype = dtype or self.compute_dtype
        return [(ops.zeros(k_shape, dtype), ops.zeros(v_shape, dtype)) for _ in self.blocks]

    def call_with_cache(self, token_ids, cache, cache_index, start=None):
        """Run `token_ids` [B, T] written into cache slots `cache_index .. cache_index + T - 1`.

        Row b's sequence begins at slot `start[b]` (left padding; default 0): slots before it
        are never attended to, and RoPE positions count from it. Returns `(hidden, cache)`.
        """
        check_token_ids(token_ids, self.config.vocab_size)
        batch, seq = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        slots = self.cache_size(cache)
        if start is None:
            start = ops.zeros((batch,), "int32")
        start = ops.cast(start, "int32")[:, None]
        query_positions = cache_index + ops.arange(seq, dtype="int32")[None, :] - start
        key_positions = ops.arange(slots, dtype="int32")[None, :] - start
        masks = attention_masks(
            query_positions, key_positions, key_positions >= 0, self.config.sliding_window
        )
        return self.run_blocks(
            self.embed(token_ids), query_positions, masks, cache=cache, cache_index=cache_index
        )

    def get_config(self):
        """The config, and the quantized layers' policies by path (as keras-hub saves them) so
        that loading builds those layers quantized."""
        config = {**super().get_config(), "config": self.config.to_dict()}
        quantized = policy_map(self)
        if quantized is not None:
            config["dtype"] = keras.dtype_policies.serialize(quantized)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
