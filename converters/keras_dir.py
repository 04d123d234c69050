"""The gemma-keras model directory: what `gemma-keras convert` writes and `from_pretrained` reads.

    config.json           the Hugging Face-style config (`Gemma2Config.to_hf_dict()`)
    model.weights.h5      Keras weights (`model.save_weights`), or when larger than one shard
    model.weights.json    Keras' sharded index with model_00000.weights.h5, model_00001...
    tokenizer.model       the SentencePiece model, when the source had one
    metadata.json         format, source, dtype, parameter count, tensors, bytes

The weights are a plain Keras weights file (`model.load_weights` reads it), but the token
embedding (1.2 GB in bfloat16 at 2B) does not go through Keras' own saving and loading, which
copy a variable two or three times on the way: it is written and read here, in blocks of rows,
at the path where Keras puts it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import keras
import ml_dtypes
from keras.src.saving import saving_lib  # save_weights with objects_to_skip

import gemma_keras
from gemma_keras.atomic_files import atomic_directory
from gemma_keras.config import Gemma2Config
from gemma_keras.converters.files import PretrainedFiles, read_tokenizer, write_tokenizer
from gemma_keras.converters.hf_checkpoint import open_hf_checkpoint
from gemma_keras.converters.safetensors_io import CheckpointError
from gemma_keras.converters.streaming import assign_rows, rows_per_block, variable_rows
from gemma_keras.lora import has_lora

FORMAT = "gemma-keras"
FORMAT_VERSION = 1
METADATA_NAME = "metadata.json"
SINGLE_WEIGHTS = "model.weights.h5"
SHARDED_WEIGHTS = "model.weights.json"
MAX_SHARD_BYTES = 2 * 10**9  # Keras .weights.h5 shards
# Where Keras' weights file keeps the embedding (the attribute path model.backbone.embed_tokens).
EMBEDDING_GROUP = "backbone/embed_tokens"


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
    """Write `model` into the existing, empty `directory`; return the metadata written. The
    tokenizer written is `tokenizer_path`'s when given, else the model's own."""
    directory = Path(directory)
    if has_lora(model):
        raise ValueError("the model carries LoRA adapters: call model.merge_lora() before "
                         "writing a model directory")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **weights_summary(model)}
    embedding = model.backbone.embed_tokens
    sharded = metadata["bytes"] > max_shard_bytes
    weights = SHARDED_WEIGHTS if sharded else SINGLE_WEIGHTS
    skip = [embedding] + ([model.optimizer] if getattr(model, "optimizer", None) else [])
    saving_lib.save_weights_only(  # the model's weights only: no optimizer state
        model, directory / weights,
        max_shard_size=max_shard_bytes / 1024**3 if sharded else None, objects_to_skip=skip)
    _write_embedding(embedding, directory, weights)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    has_tokenizer = write_tokenizer(model, directory, tokenizer_path)
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


def _embedding_file(directory: Path, weights: str, new_bytes=None) -> Path:
    """The .weights.h5 file that holds the embedding; with `new_bytes`, add a shard for it
    to a sharded index."""
    if weights == SINGLE_WEIGHTS:
        return directory / weights
    index_path = directory / weights
    index = json.loads(index_path.read_text())
    key = f"/{EMBEDDING_GROUP}/vars"
    if new_bytes is not None:  # a shard of its own, named as Keras names the next one
        count = len(set(index["weight_map"].values()))
        index["weight_map"][key] = f"model_{count:05d}.weights.h5"
        index["metadata"]["total_size"] += new_bytes
        index_path.write_text(json.dumps(index, indent=4))
    if key not in index["weight_map"]:
        raise CheckpointError(f"{index_path}: no entry for the embedding ({key})")
    return directory / index["weight_map"][key]


def _write_embedding(layer, directory: Path, weights: str):
    variable = layer.embeddings
    dtype = keras.backend.standardize_dtype(variable.dtype)
    path = _embedding_file(directory, weights, new_bytes=_size(variable) * _itemsize(dtype))
    with h5py.File(path, "a") as f:
        group = f.require_group(EMBEDDING_GROUP).create_group("vars")
        group.attrs["name"] = layer.name
        sample = variable_rows(variable, 0, 1)
        dataset = group.create_dataset("0", shape=tuple(variable.shape), dtype=sample.dtype)
        if dtype == "bfloat16":
            dataset.attrs["dtype"] = "bfloat16"  # as Keras marks it
        rows = rows_per_block(variable.shape, sample.itemsize)
        for start in range(0, variable.shape[0], rows):
            stop = min(start + rows, variable.shape[0])
            dataset[start:stop] = variable_rows(variable, start, stop)


def _read_embedding(layer, directory: Path, weights: str):
    variable = layer.embeddings
    path = _embedding_file(directory, weights)
    with h5py.File(path, "r") as f:
        dataset = f.get(f"{EMBEDDING_GROUP}/vars/0")
        if dataset is None or tuple(dataset.shape) != tuple(variable.shape):
            found = None if dataset is None else tuple(dataset.shape)
            raise CheckpointError(f"{path}: embedding {EMBEDDING_GROUP}/vars/0 has shape "
                                  f"{found}, expected {tuple(variable.shape)}")
        bfloat16 = dataset.attrs.get("dtype") == "bfloat16"
        rows = rows_per_block(variable.shape, dataset.dtype.itemsize)
        for start in range(0, variable.shape[0], rows):
            block = dataset[start:min(start + rows, variable.shape[0])]
            if bfloat16:
                block = block.view(ml_dtypes.bfloat16)
            assign_rows(variable, start, block)


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


def open_model_dir(directory) -> PretrainedFiles:
    """A gemma-keras model directory, opened for `Gemma2CausalLM.from_files`: its weights load
    in the dtype they were saved in unless asked otherwise, its tokenizer.model travels with
    the model."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    config = Gemma2Config.from_json_file(directory / "config.json")
    weights = directory / metadata.get("weights", SINGLE_WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {weights.name} is missing")

    def fill(model, progress=False):
        embedding = model.backbone.embed_tokens
        try:
            model.load_weights(weights, objects_to_skip=[embedding])
            _read_embedding(embedding, directory, weights.name)
        except (OSError, KeyError) as e:  # h5py: truncated or corrupt file, missing dataset
            raise CheckpointError(f"{weights}: cannot read Keras weights ({e})") from None

    return PretrainedFiles(directory, config, metadata.get("dtype", "float32"),
                           read_tokenizer(directory), fill)


def open_pretrained(directory) -> PretrainedFiles:
    """What `Gemma2CausalLM.from_pretrained` reads: a gemma-keras model directory, or a
    Hugging Face Gemma 2 directory (config.json + safetensors), converted in memory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not is_model_dir(directory) and any(directory.glob("*.safetensors")):
        return open_hf_checkpoint(directory)
    return open_model_dir(directory)
