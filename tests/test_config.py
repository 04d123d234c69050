"""Gemma2Config: presets, transformers config.json round trips, and clear errors."""

import json
from pathlib import Path

import pytest

from gemma_keras.config import PRESETS, ConfigError, Gemma2Config

REAL_2B_CONFIG = Path(__file__).parent / "data" / "gemma-2-2b-config.json"


def test_presets_have_the_published_shapes():
    expected = {  # layers, hidden, intermediate, heads, kv heads, head_dim, scalar
        "gemma2_2b": (26, 2304, 9216, 8, 4, 256, 256),
        "gemma2_9b": (42, 3584, 14336, 16, 8, 256, 256),
        "gemma2_27b": (46, 4608, 36864, 32, 16, 128, 144),
    }
    for name, shape in expected.items():
        c = Gemma2Config.preset(name)
        assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                c.num_key_value_heads, c.head_dim, c.query_pre_attn_scalar) == shape
        assert c.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert Gemma2Config.preset("gemma2_2b").num_parameters() == 2_614_341_888
    assert sorted(PRESETS) == ["gemma2_27b", "gemma2_2b", "gemma2_9b"]


def test_real_config_json_round_trips():
    original = json.loads(REAL_2B_CONFIG.read_text())
    config = Gemma2Config.from_json_file(REAL_2B_CONFIG)
    assert config == Gemma2Config.preset("gemma2_2b")
    written = config.to_hf_dict()
    for key, value in original.items():
        if key not in ("torch_dtype", "transformers_version"):
            assert written[key] == value, key
    assert Gemma2Config.from_hf_dict(written) == config


def test_transformers_reads_what_we_write():
    from transformers import Gemma2Config as HFConfig

    ours = Gemma2Config.preset("gemma2_27b")
    hf = HFConfig(**ours.to_hf_dict())
    assert hf.query_pre_attn_scalar == 144 and hf.head_dim == 128
    assert hf.layer_types == ours.layer_types
    assert Gemma2Config.from_hf_dict(hf.to_dict()) == ours


def test_not_gemma2_is_refused():
    d = json.loads(REAL_2B_CONFIG.read_text())
    d["model_type"] = "llama"
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Gemma2Config.from_hf_dict(d)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"head_dim": 255}, "head_dim"),
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"bos_token_id": 300000}, "bos_token_id"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
    ],
)
def test_contradictory_fields_are_named(change, field):
    d = {**json.loads(REAL_2B_CONFIG.read_text()), **change}
    with pytest.raises(ConfigError, match=field):
        Gemma2Config.from_hf_dict(d, source="x/config.json")


def test_missing_field_is_named():
    d = json.loads(REAL_2B_CONFIG.read_text())
    del d["head_dim"]
    with pytest.raises(ConfigError, match="head_dim"):
        Gemma2Config.from_hf_dict(d)
