"""Read a Hugging Face Gemma 2 checkpoint directory into a Keras model, streaming
(`gemma_keras.pretrained.load_hf_checkpoint` builds the model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gemma_keras.config import Gemma2Config
from gemma_keras.converters.files import PretrainedFiles, read_tokenizer
from gemma_keras.converters.safetensors_io import CheckpointError, SafetensorsCheckpoint
from gemma_keras.converters.streaming import assign_rows, rows_per_block
from gemma_keras.converters.weight_map import TIED_ALIASES, weight_specs
from gemma_keras.quantization import pack, quantize_rows


def read_hf_config(directory) -> Gemma2Config:
    """The `Gemma2Config` of an HF directory's config.json (model_type must be gemma2)."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    return Gemma2Config.from_json_file(config_path)


def check_hf_checkpoint(checkpoint: SafetensorsCheckpoint, specs) -> None:
    """Raise CheckpointError listing every missing, unexpected, misshapen or non-float tensor."""
    expected = {s.hf_name for s in specs}
    present = set(checkpoint.names) - set(TIED_ALIASES)
    problems = []
    missing = sorted(expected - present)
    extra = sorted(present - expected)
    if missing:
        problems.append(f"missing tensors: {missing}")
    if extra:
        problems.append(f"unexpected tensors: {extra}")
    for spec in specs:
        if spec.hf_name not in checkpoint.files:
            continue
        shape = checkpoint.shapes[spec.hf_name]
        if shape != spec.hf_shape:
            problems.append(f"{spec.hf_name} has shape {shape}, expected {spec.hf_shape}")
        if checkpoint.float_dtype(spec.hf_name) is None:
            problems.append(f"{spec.hf_name} has dtype {checkpoint.dtypes[spec.hf_name]}, "
                            "expected F32, BF16 or F16")
    if problems:
        raise CheckpointError(f"{checkpoint.directory}: checkpoint does not match config.json: "
                              + "; ".join(problems))


def fill_from_checkpoint(model, checkpoint: SafetensorsCheckpoint, progress=False) -> int:
    """Stream every tensor of `checkpoint` into `model`'s variables; return bytes read.

    Tensors move in blocks of rows (every tensor keeps its layout). A model built quantized
    (`quantization.quantized_dtype`) is filled by quantizing each block as it arrives, so no
    float copy of a quantized weight is ever whole in memory.
    """
    specs = weight_specs(model.backbone, quantized=True)
    total = 0
    for spec in tqdm(specs, desc="HF -> Keras", unit="tensor", disable=not progress):
        name, variable = spec.hf_name, spec.variable
        num_rows, rows = spec.hf_shape[0], rows_per_block(spec.hf_shape, 4)
        for start in range(0, num_rows, rows):
            block = checkpoint.read(name, slice(start, min(start + rows, num_rows)))
            if spec.layer.quantization_mode is None:
                assign_rows(variable, start, block)
            else:
                _assign_quantized_rows(spec.layer, start, block)
        total += checkpoint.nbytes(name)
    return total


def _assign_quantized_rows(layer, start, rows):
    """Quantize float `rows` (rows `start:` of `layer`'s float weight) into its stored integers
    and scales: one row's scale depends on that row alone, so a block at a time is exact."""
    mode = layer.quantization_mode
    q, scale = quantize_rows(np.asarray(rows, np.float32), mode)
    integers, scales = layer.quantized_weights()
    assign_rows(integers, start, pack(q, mode))
    assign_rows(scales, start, scale)


def open_hf_checkpoint(directory) -> PretrainedFiles:
    """A Hugging Face Gemma 2 checkpoint directory, opened for `Gemma2CausalLM.from_files`.

    The directory holds config.json and model.safetensors (or sharded model-*.safetensors with
    model.safetensors.index.json) in float32, float16 or bfloat16. The config's model_type is
    checked here; every tensor's presence and shape before any weight is read (an error lists
    the missing, misshapen or unexpected names). Tensors are read one at a time (large ones in
    blocks of rows) straight into the model's variables. The weights load as float32 unless
    asked otherwise: on CPU Keras computes fastest in float32.
    """
    directory = Path(directory)
    config = read_hf_config(directory)
    checkpoint = SafetensorsCheckpoint(directory)

    def fill(model, progress=False):
        check_hf_checkpoint(checkpoint, weight_specs(model.backbone, quantized=True))
        fill_from_checkpoint(model, checkpoint, progress=progress)

    return PretrainedFiles(directory, config, "float32", read_tokenizer(directory), fill,
                           fills_quantized=True)
