"""Export a `Gemma2CausalLM` as a versioned SavedModel that TensorFlow Serving loads as is.

    BASE_DIR/N/saved_model.pb             graph and signatures (small: weights are variables)
    BASE_DIR/N/variables/variables.*      weights, in shards of at most `max_shard_size` bytes
    BASE_DIR/N/assets/tokenizer.model     the SentencePiece model the graph tokenizes with

The version directory is written under a hidden temporary name and renamed when complete,
so TensorFlow Serving (which watches BASE_DIR for numeric subdirectories) never sees half an
export. See `gemma_keras.serving.module` for the signatures and docs/serving.md for clients.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import tensorflow as tf

from gemma_keras.atomic_files import atomic_directory
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.converters.files import TOKENIZER_NAME
from gemma_keras.serving.batching import InGraphBatching
from gemma_keras.serving.core_ops import core_tf_kernels, require_tensorflow_backend
from gemma_keras.serving.module import GemmaServingModule
from gemma_keras.tokenizer import GemmaTokenizer, tokenizer_of

DEFAULT_MAX_SHARD_SIZE = 1 << 30  # 1 GiB
DEFAULT_MAX_NEW_TOKENS = 64


def _tokenizer(model, tokenizer_path):
    """The tokenizer to export: `tokenizer_path`'s, else the one that travels with `model`."""
    if tokenizer_path is None:
        tokenizer = tokenizer_of(model, "the SavedModel export (or pass tokenizer_path=)")
    else:
        tokenizer = GemmaTokenizer(tokenizer_path)  # checks Gemma's special ids
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{tokenizer_path or 'the tokenizer'} has {tokenizer.vocab_size} pieces "
                         f"but the model's vocabulary is {model.config.vocab_size}")
    return tokenizer


def next_version(base_dir) -> int:
    """1 + the highest numeric version under `base_dir` (1 when there is none)."""
    base = Path(base_dir)
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def export_saved_model(model, base_dir, version=None, tokenizer_path=None, max_length=None,
                       max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                       max_shard_size=DEFAULT_MAX_SHARD_SIZE, batching=False,
                       in_graph_batching=None, xla=False) -> Path:
    """Write `model` as the SavedModel `base_dir/version/` and return that path.

    Args:
      model: a `Gemma2CausalLM` built with the TensorFlow Keras backend.
      base_dir: the model base path TensorFlow Serving is pointed at.
      version: a positive integer; default: one more than the highest existing version.
        An existing version is never overwritten.
      tokenizer_path: the SentencePiece `tokenizer.model`; default: the model's own tokenizer.
      max_length: the longest prompt plus completion (tokens) a request may ask for;
        default: the config's `max_position_embeddings`.
      max_new_tokens: the default of the request's `max_new_tokens` input.
      max_shard_size: the largest variables shard, in bytes (bigger tensors are split).
      batching: make every `serving_default` input [batch] and required (no scalars, no
        defaults), so that TensorFlow Serving's `--enable_batching` can merge requests.
      in_graph_batching: a `gemma_keras.serving.batching.InGraphBatching`: concurrent
        requests are merged inside the graph by a `BatchFunction` op, in any server.
      xla: XLA-compile the prefill and decode step (TensorFlow Serving then needs
        `--xla_cpu_compilation_enabled=true`; without it every request fails).

    Example:
    >>> export_saved_model(model, "/models/gemma", version=1, tokenizer_path="tokenizer.model")
    PosixPath('/models/gemma/1')
    """
    if not isinstance(model, Gemma2CausalLM):
        raise TypeError(f"export_saved_model takes a Gemma2CausalLM, got {type(model).__name__}")
    require_tensorflow_backend()
    base = Path(base_dir)
    version = next_version(base) if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    target = base / str(version)
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another version")
    limit = int(model.config.max_position_embeddings)
    max_length = limit if max_length is None else int(max_length)
    if not 2 <= max_length <= limit:
        raise ValueError(f"max_length must be in [2, {limit}] (max_position_embeddings), "
                         f"got {max_length}")
    if not 1 <= int(max_new_tokens) < max_length:
        raise ValueError(f"max_new_tokens must be in [1, {max_length}), got {max_new_tokens}")
    if int(max_shard_size) < 1:
        raise ValueError(f"max_shard_size must be a positive number of bytes, "
                         f"got {max_shard_size}")

    if in_graph_batching is not None and not isinstance(in_graph_batching, InGraphBatching):
        raise TypeError("in_graph_batching must be an InGraphBatching or None, got "
                        f"{type(in_graph_batching).__name__}")

    tokenizer = _tokenizer(model, tokenizer_path)
    options = tf.saved_model.SaveOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(
            int(max_shard_size)))
    with atomic_directory(target) as tmp, tempfile.TemporaryDirectory() as staging:
        staged = tokenizer.save_proto(Path(staging) / TOKENIZER_NAME)  # the asset's file name
        module = GemmaServingModule(model, staged, max_length, int(max_new_tokens),
                                    batching=bool(batching),
                                    in_graph_batching=in_graph_batching, xla=bool(xla))
        # Under XLA the cache update stays XLA's own dynamic update slice, and XLA's dot
        # takes the [out, in] projections well at every batch size.
        with contextlib.nullcontext() if xla else core_tf_kernels():
            tf.saved_model.save(module, str(tmp), signatures=module.signatures(),
                                options=options)
    return target
