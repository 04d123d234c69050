"""The export graph converted without its weights: a template `.tflite` file of a few MB.

TensorFlow's converter holds every weight it converts about twice (the flatbuffer it builds,
then the bytes it returns): 21 GiB for Gemma 2 2B in float32. Here it sees none of them. The
model is built with no weight storage (Keras `StatelessScope` with deferred variables) and
traced with every weight matrix replaced by a splat constant (`tf.fill`) holding one value of
its own (`placeholder_values`), so that no two constants fold or merge into one. The
converter keeps a large splat constant as a FILL op (`_experimental_unfold_large_splat_constant`),
so the template stores a few bytes per weight; `weight_writer.py` then turns each such FILL
back into a stored tensor and streams the real values into it from the checkpoint.

The norm scales (vectors, 105 of 2304 floats at 2B) are traced with their real values: the
converter folds `1 + scale` into them exactly as in a conversion with all the weights.
The tied embedding's placeholder stands for the stored table, `E / final_logit_softcapping`
(`export_graph.GemmaSignatures.table`): the writer applies that factor to the checkpoint's rows.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from gemma_keras.converters.weight_map import weight_specs
from gemma_keras.tflite import export_graph
from gemma_keras.tflite.weight_map_metadata import EMBEDDING, stored_factors


@dataclasses.dataclass(frozen=True)
class Placeholder:
    """A weight matrix in the template: its checkpoint tensor, shape, the splat value that
    stands for it, and the factor the graph stores it multiplied by (1 but for the table)."""

    name: str
    shape: tuple
    value: float
    factor: float = 1.0


def placeholder_values(specs, config):
    """`{hf_name: Placeholder}` of every 2-D weight of `specs` (`weight_map.weight_specs`).

    Values 1 + (i + 1) / 1024 are exact and distinct in float32, and none is 1."""
    factors = stored_factors(config)
    matrices = [s for s in specs if len(s.hf_shape) == 2]
    if len(matrices) >= 1023:
        raise ValueError(f"{len(matrices)} weight matrices: the placeholders run out at 1022")
    out = {}
    for i, spec in enumerate(matrices):
        factor = factors.get(spec.hf_name, 1.0)
        out[spec.hf_name] = Placeholder(spec.hf_name, tuple(spec.hf_shape),
                                        float(np.float32(1.0 + (i + 1) / 1024)), factor)
    return out


class PlaceholderSignatures(export_graph.GemmaSignatures):
    """The export's signatures, traced with placeholders for the weight matrices and the
    real norm scales, under a Keras StatelessScope (no variable is read)."""

    def __init__(self, model, kv_cache_max_len, specs, placeholders, vectors):
        import tensorflow as tf

        self.tf = tf
        self.model = model
        self.config = model.config
        self.cache_len = kv_cache_max_len
        self.module = tf.Module()
        self.weight_specs, self.placeholders, self.vectors = specs, placeholders, vectors

    def _fill(self, name):
        p = self.placeholders[name]
        return self.tf.fill(p.shape, self.tf.constant(p.value, self.tf.float32))

    def step(self, inputs, *args, **kwargs):
        import keras

        mapping = []
        for spec in self.weight_specs:
            if spec.hf_name in self.placeholders:
                value = self._fill(spec.hf_name)
            else:
                value = self.tf.constant(self.vectors[spec.hf_name], self.tf.float32)
            mapping.append((spec.variable, value))
        with keras.StatelessScope(state_mapping=mapping, initialize_variables=False):
            return super().step(inputs, *args, **kwargs)

    def table(self):
        """The stored table's own placeholder (no multiply left for the converter)."""
        p = self.placeholders[EMBEDDING]
        return self.tf.fill(p.shape, self.tf.constant(p.value * p.factor, self.tf.float32))


def table_value(placeholder):
    """The splat value the template stores for `placeholder` (the table's includes its
    factor, computed in float32 as TensorFlow does)."""
    return float(np.float32(placeholder.value) * np.float32(placeholder.factor))


def weightless_model(config):
    """A float32 `Gemma2CausalLM` of `config` whose variables hold no storage."""
    import keras

    from gemma_keras.causal_lm import Gemma2CausalLM

    with keras.StatelessScope(initialize_variables=False):
        return Gemma2CausalLM(config, dtype="float32")


def convert_template(model, source, kv_cache_max_len, prefill_lens, score_lens=(),
                     work_dir=None):
    """The float32 template flatbuffer (bytes) of `model`'s export graph and its placeholders
    (every encoding, "fp16" included, is written from it by `weight_writer`).

    `model`: a float32 `Gemma2CausalLM` (weightless or not: its variables are never read);
    `source`: a `weight_sources.WeightSource` giving the norm scales.
    Returns `(bytes, {hf_name: Placeholder})`.
    """
    import tensorflow as tf

    specs = weight_specs(model.backbone)
    placeholders = placeholder_values(specs, model.config)
    vectors = {s.hf_name: source.read(s.hf_name) for s in specs
               if s.hf_name not in placeholders}
    signatures = PlaceholderSignatures(model, kv_cache_max_len, specs, placeholders, vectors)
    functions = signatures.concrete_functions(prefill_lens, score_lens)
    with tempfile.TemporaryDirectory(prefix=".gemma_tflite_template_", dir=work_dir) as work:
        saved_model_dir = Path(work) / "saved_model"
        tf.saved_model.save(signatures.module, str(saved_model_dir), signatures=functions)
        flatbuffer = export_graph.convert(saved_model_dir, list(functions), "none",
                                          placeholders=True)
    return flatbuffer, placeholders
