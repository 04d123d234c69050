"""The gemma-keras model directory: what `gemma-keras convert` writes and `from_pretrained` reads.

    config.json           the Hugging Face-style config (`Gemma2Config.to_hf_dict()`)
    model.weights.h5      Keras weights (`model.save_weights`), or when larger than one shard
    model.weights.json    Keras' sharded index with model_00000.weights.h5, model_00001...
    tokenizer.model       the SentencePiece model, when the source had one
    metadata.json         format, source, dtype, parameter count, tensors, bytes
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras

import gemma_keras
from gemma_keras.config import Gemma2Config
from gemma_keras.converters.files import atomic_directory, attach_tokenizer, copy_tokenizer
from gemma_keras.converters.safetensors_io import CheckpointError
from gemma_keras.converters.streaming import empty_causal_lm

FORMAT = "gemma-keras"
FORMAT_VERSION = 1
METADATA_NAME = "metadata.json"
SINGLE_WEIGHTS = "model.weights.h5"
SHARDED_WEIGHTS = "model.weights.json"
MAX_SHARD_BYTES = 2 * 10**9  # Keras .weights.h5 shards


def weights_summary(model) -> dict:
    """dtype, parameter count, tensor count and bytes of a model's weights."""
    weights = model.weights
    return {
        "dtype": keras.backend.standardize_dtype(model.backbone.embed_tokens.embeddings.dtype),
        "parameters": sum(_size(w) for w in weights),
        "tensors": len(weights),
        "bytes": int(sum(_size(w) * _itemsize(w.dtype) for w in weights)),
    }


def _size(variable) -> int:
    n = 1
    for d in variable.shape:
        n *= int(d)
    return n


def _itemsize(dtype) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[keras.backend.standardize_dtype(dtype)]


def write_model_dir(model, directory, source=None, tokenizer_path=None,
                    max_shard_bytes=MAX_SHARD_BYTES) -> dict:
    """Write `model` into the existing, empty `directory`; return the metadata written."""
    directory = Path(directory)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **weights_summary(model)}
    if metadata["bytes"] > max_shard_bytes:
        weights = SHARDED_WEIGHTS
        model.save_weights(directory / weights, max_shard_size=max_shard_bytes / 1024**3)
    else:
        weights = SINGLE_WEIGHTS
        model.save_weights(directory / weights)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    has_tokenizer = copy_tokenizer(tokenizer_path, directory)
    metadata.update(
        weights=weights,
        tokenizer="tokenizer.model" if has_tokenizer else None,
        source=None if source is None else str(source),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        gemma_keras_version=gemma_keras.__version__,
        keras_version=keras.__version__,
    )
    (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def save_model_dir(model, out_dir, source=None, tokenizer_path=None,
                   max_shard_bytes=MAX_SHARD_BYTES, overwrite=False) -> dict:
    """Write `model` as a gemma-keras model directory, atomically; return its metadata."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        return write_model_dir(model, tmp, source, tokenizer_path, max_shard_bytes)


def read_metadata(directory) -> dict:
    """metadata.json of a gemma-keras model directory (CheckpointError if it is not one)."""
    path = Path(directory) / METADATA_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a gemma-keras model directory (no {METADATA_NAME}); "
            "make one with `gemma-keras convert HF_DIR OUT_DIR`"
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
    return metadata


def is_model_dir(directory) -> bool:
    return (Path(directory) / METADATA_NAME).is_file()


def load_model_dir(directory, dtype=None):
    """Load a gemma-keras model directory as a `Gemma2CausalLM`, tokenizer attached.

    `dtype` is the Keras dtype policy (default: the dtype the weights were saved in).
    """
    directory = Path(directory)
    metadata = read_metadata(directory)
    config = Gemma2Config.from_json_file(directory / "config.json")
    weights = directory / metadata.get("weights", SINGLE_WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {weights.name} is missing")
    model = empty_causal_lm(config, dtype=dtype or metadata.get("dtype", "float32"))
    try:
        model.load_weights(weights)
    except (OSError, KeyError) as e:  # h5py: truncated or corrupt file, missing dataset
        raise CheckpointError(f"{weights}: cannot read Keras weights ({e})") from None
    return attach_tokenizer(model, directory)
