"""The export's default route: convert the graph without its weights, then stream them in.

TensorFlow's converter sees the export graph with a splat placeholder for every weight
matrix (`template.py`: a template file of a few MB, whatever the model's size), and
`weight_writer.py` writes each requested file from that one float32 template (float32,
float16 and int8 alike), reading the weights one block of rows at a time from where they
are: a Hugging Face safetensors directory, a gemma-keras model directory, or a
`Gemma2CausalLM` in memory. A model directory is never loaded whole. The int4 modes and "int8_channel" requantize the "dynamic_int8" file
(`requantize.py`), finding each weight by the checkpoint name the file records.
"weight_only_int8" runs ai-edge-quantizer on the float32 file, in memory (about 4.5 times the
float32 file: small models only).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gemma_keras.atomic_files import write_atomically
from gemma_keras.config import Gemma2Config
from gemma_keras.converters.weight_map import weight_specs
from gemma_keras.tflite import export_graph
from gemma_keras.tflite import quantize as quantize_lib
from gemma_keras.tflite import requantize as requantize_lib
from gemma_keras.tflite import template as template_lib
from gemma_keras.tflite import weight_sources, weight_writer


def model_and_source(model):
    """`(Gemma2CausalLM to trace, WeightSource)` for a model or a model directory; a
    directory gives a weightless model (its variables hold no storage)."""
    from gemma_keras.causal_lm import Gemma2CausalLM

    if isinstance(model, Gemma2CausalLM):
        export_graph.load_float32_model(model)  # refuses one that is not float32
        export_graph.refuse_lora(model)
        return model, weight_sources.KerasModelSource(model, weight_specs(model.backbone))
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected a Gemma2CausalLM or a model directory, got "
                        f"{type(model).__name__}")
    from gemma_keras.converters.convert import detect_format

    directory = Path(model)
    kind = detect_format(directory)
    config = Gemma2Config.from_json_file(directory / "config.json")
    traced = template_lib.weightless_model(config)
    specs = weight_specs(traced.backbone)
    if kind == "keras":
        source = weight_sources.KerasDirSource(directory, traced, specs)
    else:
        source = weight_sources.SafetensorsSource(directory)
    source.check(specs)
    return traced, source


def export_lean(model, source, outputs, kv_cache_max_len, prefill_lens, score_lens, steps):
    """Write every `{quantize: Path}` of `outputs` for `model` (see `model_and_source`)."""
    int8_modes = [q for q in outputs if q in requantize_lib.BLOCK_SIZES]
    writes = {q for q in outputs if q in weight_writer.ENCODINGS}
    if int8_modes:
        writes.add("dynamic_int8")
    if "weight_only_int8" in outputs:
        writes.add("none")
    work_parent = next(iter(outputs.values())).parent
    with tempfile.TemporaryDirectory(prefix=".gemma_tflite_", dir=work_parent) as work:
        work = Path(work)
        files = {}
        flatbuffer, placeholders = template_lib.convert_template(
            model, source, kv_cache_max_len, prefill_lens, score_lens, work)
        template = work / "template.tflite"
        template.write_bytes(flatbuffer)
        del flatbuffer
        steps.update("converted the template")
        for encoding in sorted(writes):
            files[encoding] = outputs.get(encoding, work / f"{encoding}.tflite")
            weight_writer.write_weights(template, placeholders, source, encoding,
                                        files[encoding])
            steps.update(f"wrote {files[encoding].name}")
        for quantize in int8_modes:
            requantize_lib.requantize_tflite(files["dynamic_int8"], source, quantize,
                                             outputs[quantize])
            steps.update(f"wrote {outputs[quantize].name}")
        if "weight_only_int8" in outputs:
            lookups = quantize_lib.gathers_to_embedding_lookups(files["none"].read_bytes())
            write_atomically(outputs["weight_only_int8"],
                             quantize_lib.quantize_flatbuffer(lookups, "weight_only_int8"))
            steps.update(f"wrote {outputs['weight_only_int8'].name}")
    return outputs

