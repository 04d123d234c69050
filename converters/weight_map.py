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
    """One checkpoint tensor: its HF name, its Keras variable (same shape) and that
    variable's layer."""

    hf_name: str
    variable: object  # keras.Variable
    layer: object  # keras.layers.Layer

    @property
    def hf_shape(self) -> tuple:
        return tuple(self.variable.shape)


def _resolve(root, dotted):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def weight_specs(backbone) -> list[WeightSpec]:
    """Every HF tensor of a Gemma 2 checkpoint paired with the backbone's variable."""
    specs = [
        WeightSpec("model.embed_tokens.weight", backbone.embed_tokens.embeddings,
                   backbone.embed_tokens),
        WeightSpec("model.norm.weight", backbone.final_norm.scale, backbone.final_norm),
    ]
    for i, block in enumerate(backbone.blocks):
        for suffix, path in BLOCK_TENSORS.items():
            layer_path, name = path.rsplit(".", 1)
            layer = _resolve(block, layer_path)
            specs.append(WeightSpec(f"model.layers.{i}.{suffix}", getattr(layer, name), layer))
    return specs


# transformers may also write the tied output head; it is the embedding, so it is skipped.
TIED_ALIASES = ("lm_head.weight",)
