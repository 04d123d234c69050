"""Export a Gemma 2 causal LM to one `.tflite` file with prefill/decode signatures and a KV cache.

The signatures, their inputs and outputs (LiteRT-LM's conventions) and the converter's
settings are in `export_graph.py`. Two routes write the files:

- "lean" (the default, `lean_export.py`): the graph converted with placeholders for the
  weights, which are then streamed into the file from the model or its directory;
- "converter": TensorFlow's converter run on a SavedModel with all the weights, the reference
  of the lean route. The Keras weights are released while the converter runs (it reads them
  from the SavedModel on disk) and read back, bit for bit, at the end, also when the export
  fails (see `_ExportWeights`).

This module imports TensorFlow; `gemma_keras.tflite` imports it only when exporting.
"""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile
from pathlib import Path

from tqdm import tqdm

from gemma_keras import defaults
from gemma_keras.atomic_files import write_atomically
from gemma_keras.tflite import export_graph, lean_export
from gemma_keras.tflite import quantize as quantize_lib
from gemma_keras.tflite import requantize as requantize_lib
from gemma_keras.tflite.converter_weight_map import record_weight_map
from gemma_keras.tflite.weight_map_metadata import stored_factors


def _check_lengths(config, kv_cache_max_len, prefill_lens):
    kv_cache_max_len = defaults.kv_cache_max_len(kv_cache_max_len,
                                                 config.max_position_embeddings)[0]
    if int(kv_cache_max_len) < 2:
        raise ValueError(f"kv_cache_max_len must be at least 2, got {kv_cache_max_len}")
    if kv_cache_max_len > config.max_position_embeddings:
        raise ValueError(
            f"kv_cache_max_len={kv_cache_max_len} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    lens = sorted({int(t) for t in defaults.prefill_lens(prefill_lens, kv_cache_max_len)[0]})
    if not lens or lens[0] < 1:
        raise ValueError(f"prefill_lens must be positive integers, got {list(prefill_lens)}")
    if lens[-1] > kv_cache_max_len:
        raise ValueError(
            f"prefill length {lens[-1]} is longer than the cache (kv_cache_max_len="
            f"{kv_cache_max_len})"
        )
    return int(kv_cache_max_len), lens


class _ExportWeights:
    """Holds each weight once during an export, and gives the Keras model its weights back.

    A context manager around one export of `model`. `variables` are the tf.Variables under the
    Keras weights, in `model.variables` order (the SavedModel tracks them as `weights/<i>`).
    `release()`, once the SavedModel is written, frees them all in place, since the converter
    reads the weights from the SavedModel. On exit, even after an error, each released weight
    is read back from `checkpoint` (the SavedModel's `variables/variables`) one at a time, so
    the model is as it was, bit for bit. Refuses models with LoRA adapters (merge them first).
    """

    def __init__(self, model, checkpoint, restore=True):
        import tensorflow as tf

        self.tf = tf
        self.checkpoint = str(checkpoint)
        self.restore_model = restore
        export_graph.refuse_lora(model)
        self.variables = [v.value for v in model.variables]
        self.released = False

    def __enter__(self):
        return self

    def _free(self, variable):
        """Shrink `variable` to an empty tensor in place, freeing its buffer (deleting Python
        references would not: the traced functions hold the handles)."""
        self.tf.raw_ops.AssignVariableOp(resource=variable.handle,
                                         value=self.tf.zeros([0], variable.dtype),
                                         validate_shape=False)

    def release(self):
        """Free every weight (call once the SavedModel is written)."""
        self.released = True
        for variable in self.variables:
            self._free(variable)
        _return_freed_memory()

    def __exit__(self, *exc):
        if not (self.released and self.restore_model):
            return
        _return_freed_memory()  # what the converter freed
        reader = self.tf.train.load_checkpoint(self.checkpoint)
        for index, variable in enumerate(self.variables):
            value = reader.get_tensor(f"weights/{index}/.ATTRIBUTES/VARIABLE_VALUE")
            self.tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value,
                                             validate_shape=False)
            del value
        self.released = False


def _return_freed_memory():
    """Hand freed heap memory back to the OS before the converter runs: glibc keeps freed
    blocks under its mmap threshold (up to 32 MB, e.g. the 2B's attention kernels) in its
    arenas, about 1 GiB for the 2B. A no-op where there is no glibc."""

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def export_tflite(model, out, quantize="none", kv_cache_max_len=None,
                  prefill_lens=None, progress=True, score_lens=()):
    """Export `model` (a `Gemma2CausalLM` or a model directory) to the `.tflite` file `out`.

    Args:
      quantize: one of `gemma_keras.tflite.QUANTIZATIONS`: "none" (float32), "fp16",
        "dynamic_int8" (TensorFlow's converter's encoding, per-tensor scales),
        "weight_only_int8" (ai-edge-quantizer on the float32 file, per channel, in memory),
        "int8_channel", "int4_block32", "int4_block128", "int4_channel" (the dynamic_int8
        file's weights requantized from the float originals, `requantize.py`). All but
        weight_only_int8 stream the weights from the model or its directory (`lean_export`).
      kv_cache_max_len: cache slots S; prompt plus generated tokens must fit in S. Default:
        1024, or the model's max_position_embeddings if smaller.
      prefill_lens: one `prefill_<T>` signature per length T. Default: 8, 64 and 256, those
        that fit the cache.
      score_lens: one `score_<T>` signature per length T (logits at every position, for
        `gemma_keras.evaluation`); default none. Each must fit the cache.
    Returns the output path. The file is written under a temporary name and renamed when
    complete.

    Example:
    >>> export_tflite("my_model_dir", "gemma.tflite", quantize="int4_block32",
    ...               kv_cache_max_len=1280, prefill_lens=(8, 64, 256))  # doctest: +SKIP
    """
    return export_tflite_variants(model, {quantize: out}, kv_cache_max_len, prefill_lens,
                                  progress, score_lens)[quantize]


def export_tflite_variants(model, outputs, kv_cache_max_len=None,
                           prefill_lens=None, progress=True, score_lens=(), route="lean"):
    """Export several quantizations of one model, tracing it once.

    `outputs` maps a quantization mode to its output path, e.g.
    `{"dynamic_int8": "g8.tflite", "int4_block32": "g4.tflite"}`. Returns `{mode: Path}`.

    `route`: "lean" (the default, `lean_export.py`) converts the graph with placeholders for
    the weights and streams them in from the model or its directory, never holding them all;
    "converter" runs TensorFlow's converter on a SavedModel with all the weights (about twice
    the float32 weights in memory), the reference the lean route is tested against.
    """
    if not outputs:
        raise ValueError("outputs is empty: give at least one {quantize: path}")
    for quantize in outputs:
        quantize_lib.check_quantization(quantize)
    if route not in ("lean", "converter"):
        raise ValueError(f"route must be 'lean' or 'converter', got {route!r}")
    export_graph.require_tensorflow_backend()
    import tensorflow as tf

    restore = not isinstance(model, (str, os.PathLike))  # nobody else holds a model we load
    if route == "lean":
        model, source = lean_export.model_and_source(model)
    else:
        model = export_graph.load_float32_model(model)
    kv_cache_max_len, prefill_lens = _check_lengths(model.config, kv_cache_max_len, prefill_lens)
    score_lens = sorted({int(t) for t in score_lens or ()})
    if score_lens and not 1 <= score_lens[0] <= score_lens[-1] <= kv_cache_max_len:
        raise ValueError(f"score_lens must be in [1, {kv_cache_max_len}] (kv_cache_max_len), "
                         f"got {score_lens}")
    for quantize in outputs:
        quantize_lib.check_block_sizes(model.config, quantize)
    outputs = {q: Path(p) for q, p in outputs.items()}
    work_parent = next(iter(outputs.values())).parent
    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if route == "lean":
        steps = _progress(progress, total=len(outputs) + 2)
        lean_export.export_lean(model, source, outputs, kv_cache_max_len, prefill_lens,
                                score_lens, steps)
        steps.close()
        return outputs

    # The int4 modes are requantized from the dynamic_int8 file, one weight at a time, with the
    # float32 originals read back from the SavedModel's checkpoint: no float32 conversion.
    int4 = [q for q in outputs if q in requantize_lib.BLOCK_SIZES]
    conversions = {"fp16" if q == "fp16" else "dynamic_int8" if q == "dynamic_int8" or q in int4
                   else "none" for q in outputs}
    steps = _progress(progress, total=2 + len(conversions) + len(outputs))
    with tempfile.TemporaryDirectory(prefix=".gemma_tflite_", dir=work_parent) as work:
        saved_model_dir = Path(work) / "saved_model"
        checkpoint = saved_model_dir / "variables" / "variables"
        with _ExportWeights(model, checkpoint, restore=restore) as weights:
            signatures = export_graph.GemmaSignatures(model, kv_cache_max_len, weights)
            functions = signatures.concrete_functions(prefill_lens, score_lens)
            steps.update("traced signatures")
            tf.saved_model.save(signatures.module, str(saved_model_dir), signatures=functions)
            steps.update("wrote SavedModel")
            # From here on the weights live only in the SavedModel (and its checkpoint): the
            # converter's peak is the process's peak.
            weights.release()
            converted = {}
            for mode in sorted(conversions):
                converted[mode] = export_graph.convert(saved_model_dir, list(functions), mode)
                steps.update(f"converted ({mode})")
                if mode == "dynamic_int8":  # written (and freed) now: the int4 modes read it
                    int8_path = outputs.get(mode, Path(work) / "dynamic_int8.tflite")
                    write_atomically(int8_path, converted.pop(mode))
                    record_weight_map(int8_path, requantize_lib.checkpoint_weights(
                        checkpoint, model), stored_factors(model.config))
            lookups = None
            if "weight_only_int8" in outputs:
                lookups = quantize_lib.gathers_to_embedding_lookups(converted["none"])
            for quantize, out in outputs.items():
                if quantize in int4:
                    floats = requantize_lib.checkpoint_weights(checkpoint, model)
                    requantize_lib.requantize_tflite(int8_path, floats, quantize, out)
                elif quantize == "weight_only_int8":
                    write_atomically(out, quantize_lib.quantize_flatbuffer(lookups, quantize))
                elif quantize != "dynamic_int8":
                    write_atomically(out, converted[quantize])
                steps.update(f"wrote {out.name}")
            converted = lookups = None  # freed before the Keras weights return
        # (leaving `_ExportWeights` restored the Keras weights from the checkpoint)
    steps.close()
    return outputs




class _progress:
    """A tqdm bar over the export's stages (silent when disabled)."""

    def __init__(self, enabled, total):
        self.bar = None
        if enabled:
            self.bar = tqdm(total=total, desc="export-tflite", unit="step")

    def update(self, what):
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
