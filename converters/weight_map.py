"""The one table of Hugging Face tensor names and layouts; both converter directions read it.

torch `Linear` weights are [out_features, in_features]; Keras `Dense` kernels are
[in_features, out_features], so projections are transposed. Norm scales and the tied
embedding keep their layout.
"""

from __future__ import annotations

import dataclasses

# Per decoder block: HF name suffix -> (path of the Keras layer inside the block, transpose).
BLOCK_TENSORS = {
    "input_layernorm.weight": ("input_layernorm.scale", False),
    "post_attention_layernorm.weight": ("post_attention_layernorm.scale", False),
    "pre_feedforward_layernorm.weight": ("pre_feedforward_layernorm.scale", False),
    "post_feedforward_layernorm.weight": ("post_feedforward_layernorm.scale", False),
    "self_attn.q_proj.weight": ("self_attn.q_proj.kernel", True),
    "self_attn.k_proj.weight": ("self_attn.k_proj.kernel", True),
    "self_attn.v_proj.weight": ("self_attn.v_proj.kernel", True),
    "self_attn.o_proj.weight": ("self_attn.o_proj.kernel", True),
    "mlp.gate_proj.weight": ("gate_proj.kernel", True),
    "mlp.up_proj.weight": ("up_proj.kernel", True),
    "mlp.down_proj.weight": ("down_proj.kernel", True),
}


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor: its HF name, its Keras variable, and whether to transpose."""

    hf_name: str
    variable: object  # keras.Variable
    transpose: bool

    @property
    def hf_shape(self) -> tuple:
        shape = tuple(self.variable.shape)
        return shape[::-1] if self.transpose else shape


def _resolve(root, dotted):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def weight_specs(backbone) -> list[WeightSpec]:
    """Every HF tensor of a Gemma 2 checkpoint paired with the backbone's variable."""
    specs = [
        WeightSpec("model.embed_tokens.weight", backbone.embed_tokens.embeddings, False),
        WeightSpec("model.norm.weight", backbone.final_norm.scale, False),
    ]
    for i, block in enumerate(backbone.blocks):
        for suffix, (path, transpose) in BLOCK_TENSORS.items():
            specs.append(WeightSpec(f"model.layers.{i}.{suffix}", _resolve(block, path), transpose))
    return specs


# transformers may also write the tied output head; it is the embedding, so it is skipped.
TIED_ALIASES = ("lm_head.weight",)
