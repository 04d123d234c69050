"""Quantization modes of the TFLite export.

"fp16" and "dynamic_int8" are applied by TensorFlow's converter (see `export.py`);
"weight_only_int8" by `ai-edge-quantizer` on the finished float32 file; "int4_block32",
"int4_block128" and "int4_channel" by `requantize.py`, which rewrites the dynamic_int8 file's
weights from the float32 originals in ai-edge-quantizer's encoding, one tensor at a time.
"""

from __future__ import annotations

QUANTIZATIONS = ("none", "fp16", "dynamic_int8", "int8_channel", "weight_only_int8",
                 "int4_block32", "int4_block128", "int4_channel")
# `gemma-keras export-tflite`'s default: int8 with one scale per row. On the random 2B it
# decodes as fast as per-tensor "dynamic_int8" (XNNPACK runs both with its per-channel int8
# kernel) with 0.7x its logit error (benchmarks/README.md).
DEFAULT_INT8 = "int8_channel"

# Stored bytes per weight-matrix value of each mode, scales included (int4 blocks carry one
# float16 scale each; "int4_channel" one float32 per row, not counted here). Norm scales
# (vectors) stay float32, except in "fp16".
BYTES_PER_WEIGHT = {"none": 4, "fp16": 2, "dynamic_int8": 1, "int8_channel": 1,
                    "weight_only_int8": 1,
                    "int4_block32": 0.5 + 2 / 32, "int4_block128": 0.5 + 2 / 128,
                    "int4_channel": 0.5}


def weight_bytes(config, quantize):
    """Bytes the model's weights take at `quantize`, the tied embedding counted once."""
    check_quantization(quantize)
    vectors = (4 * config.num_hidden_layers + 1) * config.hidden_size  # the RMSNorm scales
    matrices = config.num_parameters() - vectors
    vector_bytes = 2 if quantize == "fp16" else 4
    return int(matrices * BYTES_PER_WEIGHT[quantize] + vectors * vector_bytes)


# ai-edge-quantizer settings: (num_bits, granularity name, weight-only?)
AI_EDGE_RECIPES = {
    "weight_only_int8": (8, "CHANNELWISE", True),
    "int8_channel": (8, "CHANNELWISE", False),
    "int4_block32": (4, "BLOCKWISE_32", False),
    "int4_block128": (4, "BLOCKWISE_128", False),
    "int4_channel": (4, "CHANNELWISE", False),
}


def check_quantization(quantize):
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}")


def ai_edge_recipe(quantize):
    """The ai-edge-quantizer recipe for one of the `AI_EDGE_RECIPES` modes."""
    from ai_edge_quantizer import qtyping, recipe_manager

    num_bits, granularity, weight_only = AI_EDGE_RECIPES[quantize]
    manager = recipe_manager.RecipeManager()
    add = manager.add_weight_only_config if weight_only else manager.add_dynamic_config
    add(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=num_bits,
        granularity=qtyping.QuantGranularity[granularity])
    return manager.get_quantization_recipe()


def quantize_flatbuffer(flatbuffer: bytes, quantize: str) -> bytes:
    """Quantize a float32 `.tflite` flatbuffer with ai-edge-quantizer; returns the new bytes."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(flatbuffer))
    q.load_quantization_recipe(ai_edge_recipe(quantize))
    result = q.quantize(enable_progress_report=False)
    return bytes(result.quantized_model)


def gathers_to_embedding_lookups(flatbuffer: bytes) -> bytes:
    """Turn the GATHERs of a constant 2-D table by 1-D ids into EMBEDDING_LOOKUPs.

    Both return `table[ids]`; ai-edge-quantizer quantizes the table of an EMBEDDING_LOOKUP
    (with the same rows and blocks as a FULLY_CONNECTED weight, so the tied embedding stays
    one tensor) but leaves a GATHER's table in float32, next to a quantized copy for the head.
    The file is patched in place, nothing re-packed
    (`flatbuffer.gathers_to_lookups_in_place`), so files with offset buffers (over 2 GB) stay
    valid. Returned unchanged unless every op using the GATHER code is such a lookup.
    """
    from gemma_keras.tflite.flatbuffer import gathers_to_lookups_in_place

    return gathers_to_lookups_in_place(flatbuffer)


def check_block_sizes(config, quantize):
    """Raise ValueError if a weight's input dimension is not a multiple of the mode's block."""
    granularity = AI_EDGE_RECIPES.get(quantize, (None, ""))[1]
    if not granularity.startswith("BLOCKWISE_"):
        return
    block = int(granularity.split("_")[1])
    inputs = {"hidden_size": config.hidden_size,
              "intermediate_size": config.intermediate_size,
              "num_attention_heads * head_dim": config.num_attention_heads * config.head_dim}
    bad = {name: n for name, n in inputs.items() if n % block}
    if bad:
        detail = ", ".join(f"{name} = {n}" for name, n in bad.items())
        raise ValueError(f"quantize={quantize!r} splits each weight row into blocks of {block}, "
                         f"but these are not multiples of {block}: {detail}")
