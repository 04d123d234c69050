"""Load a transformers `save_pretrained` Gemma 2 directory into a Keras `Gemma2CausalLM`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gemma_keras.config import Gemma2Config
from gemma_keras.converters.weight_map import TIED_ALIASES, weight_specs


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, or does not match its config."""


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise CheckpointError(f"{index} names {path.name}, which does not exist")
        return files
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"{directory}: no model.safetensors or *.safetensors files")
    files = {}
    for path in paths:
        for name in _open(path).keys():
            files[name] = path
    return files


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_hf_checkpoint(path, dtype=None):
    """Load a Hugging Face Gemma 2 checkpoint directory as a `Gemma2CausalLM`.

    Args:
      path: directory with config.json and model.safetensors (or sharded model-*.safetensors
        with model.safetensors.index.json).
      dtype: Keras dtype policy for the model ("float32" by default: on CPU Keras computes
        fastest in float32).

    Every expected tensor is checked for presence and shape before any is loaded; an error
    lists the missing, misshapen or unexpected names.
    """
    from gemma_keras.causal_lm import Gemma2CausalLM

    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json")
    config = Gemma2Config.from_json_file(config_path)
    files = _safetensors_files(directory)

    model = Gemma2CausalLM(config, dtype=dtype or "float32")
    specs = weight_specs(model.backbone)
    handles = {p: _open(p) for p in set(files.values())}

    expected = {s.hf_name for s in specs}
    present = set(files) - set(TIED_ALIASES)
    problems = []
    missing = sorted(expected - present)
    extra = sorted(present - expected)
    if missing:
        problems.append(f"missing tensors: {missing}")
    if extra:
        problems.append(f"unexpected tensors: {extra}")
    for spec in specs:
        if spec.hf_name in files:
            shape = tuple(handles[files[spec.hf_name]].get_slice(spec.hf_name).get_shape())
            if shape != spec.hf_shape:
                problems.append(f"{spec.hf_name} has shape {shape}, expected {spec.hf_shape}")
    if problems:
        raise CheckpointError(f"{directory}: checkpoint does not match config.json: "
                              + "; ".join(problems))

    for spec in specs:
        source = files[spec.hf_name]
        try:
            tensor = handles[source].get_tensor(spec.hf_name)
        except Exception as e:
            raise CheckpointError(f"{source}: cannot read {spec.hf_name} ({e})") from None
        if spec.transpose:
            tensor = tensor.T
        spec.variable.assign(np.asarray(tensor, dtype=spec.variable.dtype))
    return model
