"""Quantization modes of the TFLite export.

"fp16" and "dynamic_int8" are applied by TensorFlow's converter (see `export.py`);
"weight_only_int8", "int4_block32" and "int4_block128" by `ai-edge-quantizer` on the finished
float32 file, which TensorFlow's converter cannot produce.
"""

from __future__ import annotations

QUANTIZATIONS = ("none", "fp16", "dynamic_int8", "weight_only_int8", "int4_block32",
                 "int4_block128")

# Bits per weight value of each mode (scales and zero points not counted).
WEIGHT_BITS = {"none": 32, "fp16": 16, "dynamic_int8": 8, "weight_only_int8": 8,
               "int4_block32": 4, "int4_block128": 4}

# ai-edge-quantizer settings: (num_bits, granularity name, weight-only?)
AI_EDGE_RECIPES = {
    "weight_only_int8": (8, "CHANNELWISE", True),
    "int4_block32": (4, "BLOCKWISE_32", False),
    "int4_block128": (4, "BLOCKWISE_128", False),
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
