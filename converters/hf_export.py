"""Write a Keras `Gemma2CausalLM` as a Hugging Face Gemma 2 checkpoint directory, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import keras
from tqdm.auto import tqdm

from gemma_keras.atomic_files import atomic_directory
from gemma_keras.converters.files import write_tokenizer
from gemma_keras.converters.safetensors_io import TensorEntry, write_sharded
from gemma_keras.converters.streaming import rows_per_block, variable_rows
from gemma_keras.converters.weight_map import weight_specs
from gemma_keras.lora import enabled_lora_layers

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def hf_entries(model, dtype=None) -> list[TensorEntry]:
    """One `TensorEntry` per HF tensor of `model`, in the table's order, reading the variables
    lazily in blocks of rows and casting to `dtype`."""
    with_adapters = {id(layer) for _, layer in enabled_lora_layers(model)}
    entries = []
    for spec in weight_specs(model.backbone):
        variable = spec.variable
        out_dtype = dtype or keras.backend.standardize_dtype(variable.dtype)
        entries.append(TensorEntry(spec.hf_name, spec.hf_shape, out_dtype,
                                   _blocks(spec, merged=id(spec.layer) in with_adapters)))
    return entries


def _blocks(spec, merged):
    variable = spec.variable
    if merged:  # the projection with its LoRA adapters folded in
        return lambda: [spec.layer.merged_kernel()]
    num_rows = variable.shape[0]
    rows = rows_per_block(variable.shape, 4)
    return lambda: (variable_rows(variable, start, min(start + rows, num_rows))
                    for start in range(0, num_rows, rows))


def hf_config_dict(config, dtype) -> dict:
    """config.json for transformers: `Gemma2Config.to_hf_dict()` plus the weights' dtype."""
    return {**config.to_hf_dict(), "torch_dtype": dtype}


def generation_config_dict(config) -> dict:
    """generation_config.json as Google publishes it: stop at eos or `<end_of_turn>`."""
    return {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
            "eos_token_id": [config.eos_token_id, config.end_of_turn_id],
            "cache_implementation": "hybrid"}


def write_hf_dir(model, directory, dtype=None, tokenizer_path=None,
                 max_shard_bytes=MAX_SHARD_BYTES, progress=False) -> list[str]:
    """Write `model` as HF files into the existing, empty `directory`; return their names."""
    directory = Path(directory)
    entries = hf_entries(model, dtype)
    with tqdm(total=len(entries), desc="Keras -> HF", unit="tensor", disable=not progress) as bar:
        files = write_sharded(directory, entries, max_shard_bytes, metadata={"format": "pt"},
                              on_tensor=lambda e: bar.update())
    _write_json(directory / "config.json", hf_config_dict(model.config, entries[0].dtype))
    _write_json(directory / "generation_config.json", generation_config_dict(model.config))
    files += ["config.json", "generation_config.json"]
    if write_tokenizer(model, directory, tokenizer_path):
        files.append("tokenizer.model")
    return files


def save_hf_checkpoint(model, out_dir, dtype=None, tokenizer_path=None,
                       max_shard_bytes=MAX_SHARD_BYTES, overwrite=False, progress=False):
    """Write `model` as a transformers-loadable Gemma 2 directory; return its file names.

    Args:
      model: a `Gemma2CausalLM`.
      out_dir: the directory to create. It is written under a temporary name and renamed
        when complete, so a failure leaves no `out_dir`.
      dtype: "float32", "bfloat16" or "float16" for the tensors (default: the variables').
      tokenizer_path: a `tokenizer.model` to copy (default: the model's own tokenizer, if any).
      max_shard_bytes: largest safetensors file; more than one gets an index, as
        transformers writes them (`model-00001-of-00002.safetensors`, ...).
      overwrite: replace an existing `out_dir`.
      progress: show a progress bar.

    Writes config.json, generation_config.json, the safetensors file(s) and tokenizer.model.
    Tensors are read from the variables one at a time (the embedding in blocks of rows).
    Projections that carry LoRA adapters are written merged (`W + alpha / rank * A @ B`).

    Example:
    >>> save_hf_checkpoint(model, "gemma-2-2b-finetuned", dtype="bfloat16")
    """
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        return write_hf_dir(model, tmp, dtype, tokenizer_path, max_shard_bytes, progress)


def _write_json(path: Path, data: dict):
    path.write_text(json.dumps(data, indent=2) + "\n")
