"""keras-hub's `GemmaBackbone` config beside `Gemma2Config`, and where their numerics differ.

keras-hub describes Gemma 2 with flags (`use_post_ffw_norm`, `query_head_dim_normalize`,
`use_sliding_window_attention`) where `Gemma2Config` holds the numbers; the translation keeps
what keras-hub's model computes, not what its flags suggest:

- Query scaling. keras-hub's `GemmaDecoderBlock` builds its attention with
  `query_head_dim_normalize=True` whatever the backbone's flag says (keras-hub 0.32), so a
  preset with `query_head_dim_normalize=False` (the 27B's, asking for
  `hidden_dim // num_query_heads` = 144) is computed with `head_dim` (128). The scale in
  effect is read from the installed keras-hub (`keras_hub_query_scalar`), so a keras-hub that
  honours the flag is followed too.
- Sliding windows: keras-hub puts them on even-indexed layers and lets a query see keys fewer
  than `sliding_window_size` positions behind it, as transformers and this package do.
- RoPE: keras-hub fixes the wavelength at 10000.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemma_keras.config import Gemma2Config
from gemma_keras.converters.safetensors_io import CheckpointError

BACKBONE = "keras_hub>GemmaBackbone"
KERAS_HUB_ROPE_THETA = 10000.0
CONFIG_NAME = "config.json"


def keras_hub_query_scalar(head_dim, hidden_dim, num_query_heads, query_head_dim_normalize):
    """The `query_pre_attn_scalar` (scale = scalar ** -0.5) that the installed keras-hub's
    attention uses for this backbone configuration.

    `query_head_dim_normalize=True` means `head_dim` in every keras-hub; only for False is
    keras-hub asked (so that converting a preset in does not import it: 0.2 GB resident).
    """
    if query_head_dim_normalize:
        return head_dim
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock

    block = GemmaDecoderBlock(  # unbuilt: no weights are made
        hidden_dim=hidden_dim, intermediate_dim=2, head_dim=head_dim,
        num_query_heads=num_query_heads, num_key_value_heads=num_query_heads,
        query_head_dim_normalize=query_head_dim_normalize)
    if block.attention.query_head_dim_normalize:
        return head_dim
    return hidden_dim // num_query_heads


def read_preset_config(directory) -> dict:
    """The backbone config dict of a keras-hub preset's config.json, checked to be a
    `GemmaBackbone` (CheckpointError naming the class otherwise)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a keras-hub preset")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    name = data.get("registered_name") if isinstance(data, dict) else None
    if name != BACKBONE:
        raise CheckpointError(f"{path}: a keras-hub {name or 'object'} preset; only Gemma 2 "
                              f"({BACKBONE}) presets can be converted")
    return data["config"]


def from_hub_config(hub: dict, source="config.json") -> tuple[Gemma2Config, list[str]]:
    """`GemmaBackbone` config dict -> (`Gemma2Config`, notes on where keras-hub's numerics
    are kept rather than the reference's). CheckpointError for a Gemma 1 config."""
    gemma1 = [name for name in ("use_post_attention_norm", "use_post_ffw_norm")
              if not hub.get(name, False)]
    if gemma1:
        caps = [n for n in ("attention_logit_soft_cap", "final_logit_soft_cap")
                if hub.get(n) is None]
        raise CheckpointError(
            f"{source}: a Gemma 1 backbone ({', '.join(f'{n}=False' for n in gemma1)}"
            f"{''.join(f', {n}=None' for n in caps)}); this package converts Gemma 2 only")
    if hub["intermediate_dim"] % 2:
        raise CheckpointError(f"{source}: intermediate_dim {hub['intermediate_dim']} is odd; "
                              "keras-hub splits it between two gating kernels")
    head_dim, hidden, heads = hub["head_dim"], hub["hidden_dim"], hub["num_query_heads"]
    normalize = hub.get("query_head_dim_normalize", True)
    scalar = keras_hub_query_scalar(head_dim, hidden, heads, normalize)
    notes = []
    asked = head_dim if normalize else hidden // heads
    if scalar != asked:
        notes.append(
            f"query scale kept as keras-hub computes it: 1/sqrt({scalar}) (head_dim), although "
            f"query_head_dim_normalize={normalize} asks for 1/sqrt({asked}); "
            f"query_pre_attn_scalar={scalar}")
    sliding = hub.get("use_sliding_window_attention", False)
    layers = hub["num_layers"]
    try:
        config = Gemma2Config(
            vocab_size=hub["vocabulary_size"], hidden_size=hidden,
            intermediate_size=hub["intermediate_dim"] // 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=hub["num_key_value_heads"],
            head_dim=head_dim, query_pre_attn_scalar=scalar,
            sliding_window=hub.get("sliding_window_size", 4096),
            attn_logit_softcapping=hub.get("attention_logit_soft_cap"),
            final_logit_softcapping=hub.get("final_logit_soft_cap"),
            rope_theta=KERAS_HUB_ROPE_THETA, rms_norm_eps=hub.get("layer_norm_epsilon", 1e-6),
            layer_types=["sliding_attention" if sliding and i % 2 == 0 else "full_attention"
                         for i in range(layers)])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not a usable GemmaBackbone config ({e})") from None
    return config, notes


def to_hub_config(config: Gemma2Config, dtype: str, like: dict | None = None
                  ) -> tuple[dict, float, list[str]]:
    """`Gemma2Config` -> (`GemmaBackbone` config dict, factor for the query kernel, notes).

    The factor is 1 unless keras-hub cannot express `query_pre_attn_scalar`: it scales by
    `head_dim` (or `hidden // heads`), so another scalar (for example 144 in a 128-wide head,
    under a keras-hub that ignores `query_head_dim_normalize=False`) is folded into the query
    kernel: `sqrt(head_dim / query_pre_attn_scalar)`, exact up to float rounding.
    `like` is the keras-hub config the model came from, whose flags are kept when they give
    the same numbers (so a round trip rewrites the same config).
    """
    c = config
    if c.rope_theta != KERAS_HUB_ROPE_THETA:
        raise ValueError(f"rope_theta is {c.rope_theta}; keras-hub's Gemma fixes it at 10000")
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(c.num_hidden_layers)]
    if c.layer_types not in (alternating, ["full_attention"] * c.num_hidden_layers):
        raise ValueError("layer_types must alternate sliding (even layers) and full attention, "
                         "or be all full attention: keras-hub's Gemma has no other pattern")
    like = like or {}

    def scalar(flag):
        return keras_hub_query_scalar(c.head_dim, c.hidden_size, c.num_attention_heads, flag)

    preferred = [like["query_head_dim_normalize"]] if "query_head_dim_normalize" in like else []
    normalize = next((f for f in preferred + [True, False]
                      if scalar(f) == c.query_pre_attn_scalar), None)
    notes, factor = [], 1.0
    if normalize is None:
        normalize = True
        factor = (c.head_dim / c.query_pre_attn_scalar) ** 0.5
        notes.append(f"keras-hub scales queries by 1/sqrt({c.head_dim}); "
                     f"query_pre_attn_scalar={c.query_pre_attn_scalar:g} is folded into the "
                     f"query kernel (x{factor:.6g})")
    hub = {
        "name": like.get("name", "gemma_backbone"),
        "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype},
                  "registered_name": None},
        "vocabulary_size": c.vocab_size,
        "num_layers": c.num_hidden_layers,
        "num_query_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "hidden_dim": c.hidden_size,
        "intermediate_dim": 2 * c.intermediate_size,
        "head_dim": c.head_dim,
        "layer_norm_epsilon": c.rms_norm_eps,
        "dropout": like.get("dropout", 0),
        "query_head_dim_normalize": normalize,
        "use_post_ffw_norm": True,
        "use_post_attention_norm": True,
        "final_logit_soft_cap": c.final_logit_softcapping,
        "attention_logit_soft_cap": c.attn_logit_softcapping,
        "sliding_window_size": c.sliding_window,
        "use_sliding_window_attention": c.layer_types == alternating,
    }
    return hub, factor, notes
