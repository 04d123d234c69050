"""The one table of Hugging Face tensor names and layouts; both converter directions read it.

Every tensor keeps its layout: the model's projections (`gemma_keras.layers.Linear`) store
[out_features, in_features] like torch's `Linear`, so a checkpoint tensor and its Keras
variable have the same shape and bytes.
"""

from __future__ import annotations

import dataclasses

# Per decoder block: HF name suffix -> path of the Keras variable inside the block.
BLOCK_TENSORS = {
    "input_layernorm.weight": "input_layernorm.scale",
    "post_attention_layernorm.weight": "post_attention_layernorm.scale",
    "pre_feedforward_layernorm.weight": "pre_feedforward_layernorm.scale",
    "post_feedforward_layernorm.weight": "post_feedforward_layernorm.scale",
    "self_attn.q_proj.weight": "self_attn.q_proj.kernel",
    "self_attn.k_proj.weight": "self_attn.k_proj.kernel",
    "self_attn.v_proj.weight": "self_attn.v_proj.kernel",
    "self_attn.o_proj.weight": "self_attn.o_proj.kernel",
    "mlp.gate_proj.weight": "gate_proj.kernel",
    "mlp.up_proj.weight": "up_proj.kernel",
    "mlp.down_proj.weight": "down_proj.kernel",
}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor: its HF name, its Keras variable (same shape; a quantized layer's
    integers when the specs were taken with `quantized=True`) and that variable's layer."""

    hf_name: str
    variable: object  # keras.Variable
    layer: object  # keras.layers.Layer
    hf_shape: tuple


def _spec(hf_name, layer, name, quantized):
    if quantized and layer.quantization_mode is not None:
        integers, _ = layer.quantized_weights()
        return WeightSpec(hf_name, integers, layer, layer.float_shape)
    variable = getattr(layer, name)  # raises for a quantized layer: the exports need floats
    return WeightSpec(hf_name, variable, layer, tuple(variable.shape))


def _resolve(root, dotted):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def weight_specs(backbone, quantized=False) -> list[WeightSpec]:
    """Every HF tensor of a Gemma 2 checkpoint paired with the backbone's variable. A
    quantized layer's spec holds its stored integers and the float shape with
    `quantized=True` (for filling it from a checkpoint); without, taking it raises."""
    specs = [_spec("model.embed_tokens.weight", backbone.embed_tokens, "embeddings", quantized),
             _spec("model.norm.weight", backbone.final_norm, "scale", quantized)]
    for i, block in enumerate(backbone.blocks):
        for suffix, path in BLOCK_TENSORS.items():
            layer_path, name = path.rsplit(".", 1)
            specs.append(_spec(f"model.layers.{i}.{suffix}", _resolve(block, layer_path), name,
                               quantized))
    return specs


# transformers may also write the tied output head; it is the embedding, so it is skipped.
TIED_ALIASES = ("lm_head.weight",)
