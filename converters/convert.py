"""Directory to directory, both ways: what `gemma-keras convert` runs.

Each direction checks its input completely before writing, writes into a temporary directory
beside OUT_DIR, optionally verifies the result against the source, and only then renames it
to OUT_DIR: a failed, interrupted or unverified conversion leaves no OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

from gemma_keras.atomic_files import atomic_directory
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.converters.files import TOKENIZER_NAME
from gemma_keras.converters.hf_checkpoint import (check_hf_checkpoint, fill_from_checkpoint,
                                                  read_hf_config)
from gemma_keras.converters.hf_export import MAX_SHARD_BYTES as HF_SHARD_BYTES
from gemma_keras.converters.hf_export import write_hf_dir
from gemma_keras.converters.keras_dir import (MAX_SHARD_BYTES as KERAS_SHARD_BYTES,
                                              read_metadata, weights_summary,
                                              write_model_dir)
from gemma_keras.converters.safetensors_io import CheckpointError, SafetensorsCheckpoint
from gemma_keras.converters.verify import DEFAULT_ATOL, VerifyResult, verify_conversion
from gemma_keras.converters.weight_map import weight_specs
from gemma_keras.pretrained import load_model_dir

DTYPES = ("float32", "bfloat16", "float16")


class VerificationError(ValueError):
    """The converted model's logits differ from the source's by more than the threshold."""


@dataclasses.dataclass
class ConversionSummary:
    """What a conversion did; `line()` is the summary the CLI prints."""

    direction: str
    out_dir: str
    tensors: int
    parameters: int
    bytes: int
    dtype: str
    seconds: float
    verify: VerifyResult | None = None

    def line(self) -> str:
        return (f"{self.direction}: {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 1e9:.3g} GB {self.dtype} in {self.seconds:.1f} s -> {self.out_dir}")


def _check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _verify(keras_dir, hf_dir, atol):
    result = verify_conversion(keras_dir, hf_dir, atol=atol)
    if not result.passed:
        raise VerificationError(result.line() + "; nothing was written")
    return result


def convert_hf_to_keras(src, out_dir, dtype=None, overwrite=False, verify=False,
                        atol=DEFAULT_ATOL, max_shard_bytes=KERAS_SHARD_BYTES,
                        progress=False) -> ConversionSummary:
    """Convert a Hugging Face Gemma 2 directory into a gemma-keras model directory.

    `dtype` defaults to the checkpoint's own (that of its embedding). With `verify`, the
    written directory is run against the source before it is renamed into place.
    """
    start = time.perf_counter()
    _check_dtype(dtype)
    src = Path(src)
    config = read_hf_config(src)
    checkpoint = SafetensorsCheckpoint(src)
    embedding = "model.embed_tokens.weight"
    source_dtype = checkpoint.float_dtype(embedding) if embedding in checkpoint.files else None
    model = Gemma2CausalLM.empty(config, dtype=dtype or source_dtype or "float32")
    check_hf_checkpoint(checkpoint, weight_specs(model.backbone))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        fill_from_checkpoint(model, checkpoint, progress=progress)
        metadata = write_model_dir(model, tmp, source=src.resolve(),
                                   tokenizer_path=src / TOKENIZER_NAME,
                                   max_shard_bytes=max_shard_bytes)
        del model
        gc.collect()
        result = _verify(tmp, src, atol) if verify else None
    return ConversionSummary("HF -> Keras", str(out_dir), len(checkpoint.names),
                             metadata["parameters"], metadata["bytes"], metadata["dtype"],
                             time.perf_counter() - start, result)


def convert_keras_to_hf(src, out_dir, dtype=None, overwrite=False, verify=False,
                        atol=DEFAULT_ATOL, max_shard_bytes=HF_SHARD_BYTES,
                        progress=False) -> ConversionSummary:
    """Convert a gemma-keras model directory into a transformers-loadable directory.

    `dtype` defaults to the dtype the Keras weights were saved in.
    """
    start = time.perf_counter()
    _check_dtype(dtype)
    read_metadata(src)
    model = load_model_dir(src)
    summary = weights_summary(model)
    out_dtype = dtype or summary["dtype"]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_hf_dir(model, tmp, out_dtype, tokenizer_path=Path(src) / TOKENIZER_NAME,
                             max_shard_bytes=max_shard_bytes, progress=progress)
        tensors = len(weight_specs(model.backbone))
        del model
        gc.collect()
        result = _verify(src, tmp, atol) if verify else None
    nbytes = summary["parameters"] * (4 if out_dtype == "float32" else 2)
    return ConversionSummary("Keras -> HF", str(out_dir), tensors, summary["parameters"],
                             nbytes, out_dtype, time.perf_counter() - start, result)


def detect_format(directory) -> str:
    """"keras" for a gemma-keras model directory, "hf" for a safetensors checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if (directory / "metadata.json").is_file():
        return "keras"
    if any(directory.glob("*.safetensors")):
        return "hf"
    raise CheckpointError(f"{directory}: neither a gemma-keras model directory (metadata.json) "
                          "nor a Hugging Face checkpoint (*.safetensors)")
