"""keras-hub Gemma 2 models and presets into this package and back.

- `from_keras_hub(causal_lm_or_backbone)`: a live keras-hub `GemmaCausalLM` (or
  `GemmaBackbone`) -> `Gemma2CausalLM`, tokenizer attached.
- `to_keras_hub(model)`: `Gemma2CausalLM` -> keras-hub `GemmaCausalLM` (with its preprocessor
  when the model has a tokenizer).
- `convert_keras_hub_to_keras(preset_dir, out_dir)`: a `save_to_preset` directory -> a
  gemma-keras model directory, streaming one tensor at a time from model.weights.h5.
- `convert_keras_to_keras_hub(model_dir, out_dir)`: the reverse; the output loads with
  `keras_hub.models.GemmaCausalLM.from_preset(out_dir)`.

Each conversion keeps the numbers keras-hub's model computes (see `keras_hub_config`), and
its summary says where they differ from the reference Gemma 2.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from gemma_keras.atomic_files import atomic_directory
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.converters.convert import ConversionSummary
from gemma_keras.converters.keras_dir import (MAX_SHARD_BYTES, METADATA_NAME, is_model_dir,
                                              read_metadata, weights_summary, write_model_dir)
from gemma_keras.converters.keras_hub_config import (CONFIG_NAME, from_hub_config,
                                                     read_preset_config, to_hub_config)
from gemma_keras.converters.keras_hub_layout import (EMBEDDING, HubTensor, Layout,
                                                     WeightsFile, hub_tensors)
from gemma_keras.converters.safetensors_io import CheckpointError, numpy_dtype
from gemma_keras.converters.keras_hub_preset import scaffold_preset, write_weights
from gemma_keras.converters.streaming import (assign_rows, rows_per_block,
                                              variable_rows, zeros_initializers)
from gemma_keras.converters.weight_map import weight_specs
from gemma_keras.tokenizer import GemmaTokenizer

WEIGHTS_NAME = "model.weights.h5"
SHARDED_WEIGHTS_NAME = "model.weights.json"
TOKENIZER_CONFIG = "tokenizer.json"
VOCABULARY = Path("assets") / "tokenizer" / "vocabulary.spm"
PREPROCESSOR_CONFIG = "preprocessor.json"
# metadata.json key (and `Gemma2CausalLM` attribute) under which a converted model keeps the
# keras-hub settings it came from, {"backbone": config, "sequence_length": n}, so that a round
# trip writes the same preset files.
ORIGIN_KEY = "keras_hub_origin"


@dataclasses.dataclass
class KerasHubSummary(ConversionSummary):
    """A `ConversionSummary` with notes on where keras-hub's numerics were kept."""

    notes: tuple = ()

    def line(self) -> str:
        return super().line() + "".join(f"\n  note: {n}" for n in self.notes)


def is_keras_hub_preset(directory) -> bool:
    """True for a directory whose config.json is a serialized keras-hub object."""
    path = Path(directory) / CONFIG_NAME
    try:
        return path.is_file() and "registered_name" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


# -------------------------------------------------------------------------------- in memory
def _value_attribute(tensor: HubTensor) -> str:
    """The keras-hub layer attribute holding the tensor (a LoRA-enabled kernel reads merged)."""
    if tensor.layer == EMBEDDING:
        return "embeddings"
    return "scale" if tensor.layout is Layout.SAME else "kernel"


def _hub_layers(backbone) -> dict:
    return {layer.path: layer for layer in backbone._flatten_layers() if layer.path}


def _gemma_keras_variables(model) -> dict:
    return {spec.hf_name: spec.variable for spec in weight_specs(model.backbone)}


def from_keras_hub(model, dtype=None):
    """A keras-hub `GemmaCausalLM` or `GemmaBackbone` (Gemma 2) as a `Gemma2CausalLM`.

    `dtype` defaults to the keras-hub model's dtype policy. LoRA adapters are merged (keras-hub's
    kernels read merged). The tokenizer of a `GemmaCausalLM`'s preprocessor is attached as
    `model.tokenizer`. The model's `keras_hub_notes` list where keras-hub's numerics were kept.

    Example:
    >>> hub = keras_hub.models.GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
    >>> model = from_keras_hub(hub)
    """
    from keras_hub.models import GemmaBackbone

    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, GemmaBackbone):
        raise TypeError(f"expected a keras-hub GemmaCausalLM or GemmaBackbone, got "
                        f"{type(backbone).__name__}")
    hub_config = backbone.get_config()
    config, notes = from_hub_config(hub_config, source=f"{type(backbone).__name__} config")
    out = Gemma2CausalLM.empty(config, dtype=dtype or backbone.dtype_policy.name)
    layers = _hub_layers(backbone)
    variables = _gemma_keras_variables(out)
    for tensor in hub_tensors(config):
        value = getattr(layers[tensor.layer], _value_attribute(tensor))
        array = tensor.to_gemma_keras(keras.ops.convert_to_numpy(value))
        assign_rows(variables[tensor.hf_name], 0, array)
    preprocessor = getattr(model, "preprocessor", None)
    out.keras_hub_notes = notes
    setattr(out, ORIGIN_KEY, {"backbone": hub_config,
                              "sequence_length": getattr(preprocessor, "sequence_length", None)})
    proto = getattr(getattr(preprocessor, "tokenizer", None), "proto", None)
    if isinstance(proto, (bytes, bytearray)):
        out.tokenizer = GemmaTokenizer.from_proto(proto, name="the keras-hub preprocessor")
    elif proto is not None:
        out.tokenizer = GemmaTokenizer(proto)
    return out


def _origin(model) -> dict:
    return getattr(model, ORIGIN_KEY, None) or {}


def _hub_backbone_config(model, dtype):
    summary_dtype = weights_summary(model)["dtype"]
    return to_hub_config(model.config, dtype or summary_dtype, like=_origin(model).get("backbone"))


def _hub_arrays(model, tensors, factor, dtype):
    """Yield `(tensor, rows source)` for every keras-hub tensor: the embedding as a function
    of (start, stop) so that it moves in blocks, the others as whole arrays."""
    variables = _gemma_keras_variables(model)
    stored_dtype = numpy_dtype(dtype)
    for tensor in tensors:
        variable = variables[tensor.hf_name]
        if tensor.layer == EMBEDDING:
            yield tensor, lambda a, b, v=variable: variable_rows(v, a, b).astype(stored_dtype)
            continue
        array = keras.ops.convert_to_numpy(variable.value)
        if factor != 1.0 and tensor.layer.endswith("attention/query"):
            array = array.astype("float32") * np.float32(factor)
        yield tensor, tensor.to_keras_hub(array).astype(stored_dtype)


def to_keras_hub(model, dtype=None):
    """A `Gemma2CausalLM` as a keras-hub `GemmaCausalLM` (weights copied; the preprocessor
    built from `model.tokenizer` when there is one, else None).

    `dtype` defaults to the dtype of the model's weights. A `query_pre_attn_scalar` keras-hub
    cannot express is folded into the query kernel (see `keras_hub_config.to_hub_config`).
    """
    from keras_hub.models import GemmaBackbone, GemmaCausalLM

    hub, factor, notes = _hub_backbone_config(model, dtype)
    dtype = hub["dtype"]["config"]["name"]
    with zeros_initializers():
        backbone = GemmaBackbone.from_config({**hub, "dtype": dtype})
    layers = _hub_layers(backbone)
    for tensor, source in _hub_arrays(model, hub_tensors(model.config), factor, dtype):
        if callable(source):
            source = source(0, tensor.shape[0])
        getattr(layers[tensor.layer], _value_attribute(tensor)).assign(source)
    preprocessor = hub_preprocessor(model)
    causal_lm = GemmaCausalLM(backbone=backbone, preprocessor=preprocessor,
                              name="gemma_causal_lm")
    causal_lm.keras_hub_notes = notes
    return causal_lm


def hub_preprocessor(model):
    """A keras-hub `GemmaCausalLMPreprocessor` of `model.tokenizer` (None without one), with
    the sequence length of the keras-hub model it came from, if any."""
    from keras_hub.models import GemmaCausalLMPreprocessor
    from keras_hub.models import GemmaTokenizer as HubGemmaTokenizer

    if model.tokenizer is None:
        return None
    length = _origin(model).get("sequence_length")
    kwargs = {} if length is None else {"sequence_length": length}
    tokenizer = HubGemmaTokenizer(proto=model.tokenizer.proto, name="gemma_tokenizer")
    return GemmaCausalLMPreprocessor(tokenizer, name="gemma_causal_lm_preprocessor", **kwargs)


# ----------------------------------------------------------------------- preset directories
def _preset_weights(src: Path) -> Path:
    for name in (WEIGHTS_NAME, SHARDED_WEIGHTS_NAME):
        if (src / name).is_file():
            return src / name
    raise CheckpointError(f"{src}: no {WEIGHTS_NAME} (or {SHARDED_WEIGHTS_NAME})")


def _check_tokenizer(src: Path):
    missing = [str(name) for name in (TOKENIZER_CONFIG, VOCABULARY) if not (src / name).is_file()]
    if missing:
        raise CheckpointError(f"{src}: the preset has no tokenizer ({', '.join(missing)} "
                              "missing); save it with its preprocessor "
                              "(GemmaCausalLM.save_to_preset)")
    return src / VOCABULARY


def _fill_from_weights(model, weights: WeightsFile, tensors, progress):
    variables = _gemma_keras_variables(model)
    for tensor in tqdm(tensors, desc="keras-hub -> Keras", unit="tensor", disable=not progress):
        variable = variables[tensor.hf_name]
        if tensor.layout is Layout.SAME:  # rows in blocks, no copy of the whole tensor
            num_rows = tensor.shape[0]
            rows = rows_per_block(tensor.shape, 4)
            for start in range(0, num_rows, rows):
                stop = min(start + rows, num_rows)
                assign_rows(variable, start, weights.read(tensor, start, stop))
        else:
            assign_rows(variable, 0, tensor.to_gemma_keras(weights.read(tensor)))


def convert_keras_hub_to_keras(src, out_dir, dtype=None, overwrite=False,
                               max_shard_bytes=MAX_SHARD_BYTES, progress=False
                               ) -> KerasHubSummary:
    """Convert a keras-hub Gemma 2 preset directory into a gemma-keras model directory.

    The preset's config, tokenizer and every tensor's presence and shape are checked before
    anything is written; tensors then move one at a time (the embedding in blocks of rows).
    `dtype` defaults to the preset's own (that of its embedding).
    """
    start = time.perf_counter()
    src = Path(src)
    hub = read_preset_config(src)
    config, notes = from_hub_config(hub, source=str(src / CONFIG_NAME))
    vocabulary = _check_tokenizer(src)
    tensors = hub_tensors(config)
    with WeightsFile(_preset_weights(src)) as weights:
        weights.check(tensors)
        model = Gemma2CausalLM.empty(config, dtype=dtype or weights.float_dtype(EMBEDDING))
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            _fill_from_weights(model, weights, tensors, progress)
            metadata = write_model_dir(model, tmp, source=src.resolve(),
                                       tokenizer_path=vocabulary,
                                       max_shard_bytes=max_shard_bytes)
            metadata[ORIGIN_KEY] = {"backbone": hub, "sequence_length": _sequence_length(src)}
            (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    del model
    gc.collect()
    return KerasHubSummary("keras-hub -> Keras", str(out_dir), len(tensors),
                           metadata["parameters"], metadata["bytes"], metadata["dtype"],
                           time.perf_counter() - start, notes=tuple(notes))


def _sequence_length(src: Path):
    try:
        return json.loads((src / PREPROCESSOR_CONFIG).read_text())["config"]["sequence_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def convert_keras_to_keras_hub(src, out_dir, dtype=None, overwrite=False, progress=False
                               ) -> KerasHubSummary:
    """Convert a gemma-keras model directory (or a Hugging Face Gemma 2 directory) into a
    keras-hub preset directory that `keras_hub.models.GemmaCausalLM.from_preset` loads
    (tokenizer included when the source has one). Weights are written one tensor at a time;
    `dtype` defaults to the saved one."""
    start = time.perf_counter()
    src = Path(src)
    model = Gemma2CausalLM.from_pretrained(src)
    if is_model_dir(src):
        setattr(model, ORIGIN_KEY, read_metadata(src).get(ORIGIN_KEY))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        hub, notes, nbytes = write_preset(model, tmp, dtype=dtype, progress=progress)
    summary = weights_summary(model)
    tensors = len(hub_tensors(model.config))
    del model
    gc.collect()
    return KerasHubSummary("Keras -> keras-hub", str(out_dir), tensors, summary["parameters"],
                           nbytes, hub["dtype"]["config"]["name"], time.perf_counter() - start,
                           notes=tuple(notes))


def write_preset(model, directory, dtype=None, progress=False):
    """Write `model` as a keras-hub preset into the existing empty `directory`.

    The files other than the weights (config.json, task.json, preprocessor.json,
    tokenizer.json, assets/, metadata.json) are keras-hub's own `save_to_preset` output for a
    one-unit-wide model of the same depth, with the real sizes put in; model.weights.h5 copies
    that model's file layout, with each real tensor written as it is converted.
    Returns `(backbone config, notes, bytes of weights)`.
    """
    hub, factor, notes = _hub_backbone_config(model, dtype)
    directory = Path(directory)
    scaffold = scaffold_preset(hub, hub_preprocessor(model), directory)
    try:
        dtype = hub["dtype"]["config"]["name"]
        nbytes = write_weights(scaffold / WEIGHTS_NAME, directory / WEIGHTS_NAME,
                               _hub_arrays(model, hub_tensors(model.config), factor, dtype),
                               progress=progress)
    finally:
        shutil.rmtree(scaffold, ignore_errors=True)
    return hub, notes, nbytes
