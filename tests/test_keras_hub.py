"""keras-hub Gemma 2 models and presets in and out, against keras-hub's and transformers' own
forward passes."""

from __future__ import annotations

import json
import shutil

import keras_hub
import numpy as np
import pytest

from gemma_keras.cli import main as cli_main
from gemma_keras.converters import (CheckpointError, convert_keras_hub_to_keras,
                                    convert_keras_to_hf, from_keras_hub, load_hf_checkpoint,
                                    to_keras_hub)

ATOL = 1e-4
# Gemma 2 in keras-hub's terms; hidden_dim // num_query_heads (12) != head_dim (16), so the two
# settings of query_head_dim_normalize ask for different query scales; the window (5) is
# shorter than the sequences.
HUB_CONFIG = dict(vocabulary_size=160, num_layers=4, num_query_heads=4, num_key_value_heads=2,
                  hidden_dim=48, intermediate_dim=160, head_dim=16, use_post_ffw_norm=True,
                  use_post_attention_norm=True, attention_logit_soft_cap=5.0,
                  final_logit_soft_cap=10.0, use_sliding_window_attention=True,
                  sliding_window_size=5)
PROMPTS = ["the cat sat on", "hello world", "who is big"]
MAX_LENGTH = 16


def randomise(backbone, seed):
    """Every weight random, norms included; a small embedding (as trained models have) keeps
    the tied head from repeating the last token, so greedy text varies."""
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        scale = 0.5 if "norm" in w.path else 0.02 if "embedding" in w.path else 0.3
        w.assign(rng.standard_normal(tuple(w.shape)).astype("float32") * scale)


def make_hub_model(tokenizer_path, normalize, seed=0, **overrides):
    backbone = keras_hub.models.GemmaBackbone(
        **{**HUB_CONFIG, **overrides}, query_head_dim_normalize=normalize, dtype="float32")
    randomise(backbone, seed)
    tokenizer = keras_hub.models.GemmaTokenizer(proto=str(tokenizer_path), name="gemma_tokenizer")
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=MAX_LENGTH, name="gemma_causal_lm_preprocessor")
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor,
                                          name="gemma_causal_lm")


@pytest.fixture(scope="module", params=[True, False], ids=["head_dim_norm", "hidden_norm"])
def hub_model(request, tiny_tokenizer):
    return make_hub_model(tiny_tokenizer.proto_path, request.param)


@pytest.fixture(scope="module")
def converted(hub_model):
    return from_keras_hub(hub_model)


def hub_logits(hub_model, ids, mask):
    return np.asarray(hub_model({"token_ids": ids, "padding_mask": mask}))


def assert_logits_close(actual, expected, mask):
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(actual) - expected)[valid].max()
    assert diff <= ATOL, f"max |logit difference| {diff:.3g} > {ATOL}"


def assert_same_weights(a, b):
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    for wa, wb in zip(a.weights, b.weights):
        va, vb = np.asarray(wa.numpy()), np.asarray(wb.numpy())
        assert va.dtype == vb.dtype and np.array_equal(va, vb), wa.path


# --------------------------------------------------------------------------- in memory
def test_logits_equal_keras_hubs(hub_model, converted, padded_batch):
    ids, mask = padded_batch
    assert converted.config.sliding_window < ids.shape[1]
    assert_logits_close(converted({"token_ids": ids, "padding_mask": mask}),
                        hub_logits(hub_model, ids, mask), mask)


def test_query_scale_kept_and_noted(hub_model, converted):
    normalize = hub_model.backbone.query_head_dim_normalize
    # keras-hub's attention (which this package follows) decides the scale, not the flag
    effective = hub_model.backbone.transformer_layers[0].attention.query_head_dim_normalize
    scalar = 16 if effective else 48 // 4
    assert converted.config.query_pre_attn_scalar == scalar
    if (16 if normalize else 12) != scalar:
        assert any("query scale kept as keras-hub computes it" in n
                   for n in converted.keras_hub_notes)
    else:
        assert converted.keras_hub_notes == []


@pytest.fixture(scope="module")
def hidden_norm_pair(tiny_tokenizer):
    """The query_head_dim_normalize=False model and its conversion (generation compiles for
    a minute per model pair, so it runs on this setting only; the logits tests cover both)."""
    hub = make_hub_model(tiny_tokenizer.proto_path, False)
    return hub, from_keras_hub(hub)


def test_greedy_text_equals_keras_hubs(hidden_norm_pair):
    hub_model, converted = hidden_norm_pair
    tokenizer = converted.tokenizer
    hub_text = hub_model.generate(PROMPTS, max_length=MAX_LENGTH, stop_token_ids=None)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    # one batch (left padded here, right padded in keras-hub); keras-hub stops each row at
    # MAX_LENGTH tokens, greedy tokens do not depend on later ones
    new = converted.generate(prompts, max_new_tokens=MAX_LENGTH - min(map(len, prompts)),
                             stop_token_ids=())
    rows = [p + n[:MAX_LENGTH - len(p)] for p, n in zip(prompts, new)]
    # No near-ties: keras-hub's own top-2 gap exceeds twice the logit tolerance, so two
    # forward passes within ATOL of each other choose the same tokens.
    seqs = np.array(rows, "int32")
    logits = hub_logits(hub_model, seqs, np.ones_like(seqs))
    for b, prompt in enumerate(prompts):
        chosen = logits[b, len(prompt) - 1:-1]
        top = np.sort(chosen, axis=-1)
        assert (top[:, -1] - top[:, -2]).min() > 2 * ATOL
        assert np.array_equal(chosen.argmax(-1), seqs[b, len(prompt):])
    assert len({tuple(r) for r in rows}) == len(rows) and len(set(rows[0])) > 3
    assert hub_text == [tokenizer.decode(r) for r in rows]


def test_in_memory_round_trip_is_bit_identical(hub_model, converted):
    back = to_keras_hub(converted)
    assert_same_weights(back.backbone, hub_model.backbone)
    assert back.backbone.get_config() == hub_model.backbone.get_config()
    assert back.preprocessor.sequence_length == hub_model.preprocessor.sequence_length


def test_lora_adapters_come_merged(tiny_tokenizer, padded_batch):
    hub = make_hub_model(tiny_tokenizer.proto_path, True, seed=1)
    hub.backbone.enable_lora(2)
    rng = np.random.default_rng(2)
    for w in hub.backbone.weights:
        if "lora_kernel" in w.path:
            w.assign(rng.standard_normal(tuple(w.shape)).astype("float32") * 0.3)
    model = from_keras_hub(hub)
    assert not any("lora" in w.path for w in model.weights)
    ids, mask = padded_batch
    assert_logits_close(model({"token_ids": ids, "padding_mask": mask}),
                        hub_logits(hub, ids, mask), mask)


def test_query_pre_attn_scalar_keras_hub_lacks_is_folded(hf_checkpoint, padded_batch):
    """A Hugging Face model whose query_pre_attn_scalar (24) is neither head_dim (16) nor
    hidden // heads (12): keras-hub computes the same logits from the folded query kernel."""
    model = load_hf_checkpoint(hf_checkpoint)
    hub = to_keras_hub(model)
    assert any("folded into the query kernel" in n for n in hub.keras_hub_notes)
    ids, mask = padded_batch
    assert_logits_close(hub_logits(hub, ids, mask),
                        np.asarray(model({"token_ids": ids, "padding_mask": mask})), mask)


# ------------------------------------------------------------------------ directories (CLI)
@pytest.fixture(scope="module")
def cli_round_trip(hidden_norm_preset, tmp_path_factory):
    """The query_head_dim_normalize=False preset (whose flag keras-hub does not follow) through
    the command line and back."""
    root = tmp_path_factory.mktemp("cli")
    keras_dir, hub_dir = root / "keras", root / "hub"
    assert cli_main(["convert", str(hidden_norm_preset), str(keras_dir), "--quiet"]) == 0
    assert cli_main(["convert", "--to", "keras-hub", str(keras_dir), str(hub_dir),
                     "--quiet"]) == 0
    return keras_dir, hub_dir


def test_cli_preset_to_model_dir_equals_keras_hub(cli_round_trip, hidden_norm_pair,
                                                  padded_batch):
    from gemma_keras import Gemma2CausalLM

    hub_model = hidden_norm_pair[0]

    model = Gemma2CausalLM.from_pretrained(cli_round_trip[0])
    ids, mask = padded_batch
    assert_logits_close(model({"token_ids": ids, "padding_mask": mask}),
                        hub_logits(hub_model, ids, mask), mask)
    assert (cli_round_trip[0] / "tokenizer.model").read_bytes() == \
        hub_model.preprocessor.tokenizer.proto


def test_cli_round_trip_preset_is_bit_identical(cli_round_trip, hidden_norm_preset,
                                                hidden_norm_pair):
    hub_dir, preset, hub_model = cli_round_trip[1], hidden_norm_preset, hidden_norm_pair[0]
    for name in ("config.json", "task.json", "tokenizer.json", "preprocessor.json"):
        assert json.loads((hub_dir / name).read_text()) == \
            json.loads((preset / name).read_text()), name
    spm = "assets/tokenizer/vocabulary.spm"
    assert (hub_dir / spm).read_bytes() == (preset / spm).read_bytes()
    loaded = keras_hub.models.GemmaCausalLM.from_preset(str(hub_dir))
    assert_same_weights(loaded.backbone, hub_model.backbone)
    assert loaded.preprocessor.tokenizer.proto == hub_model.preprocessor.tokenizer.proto


@pytest.fixture(scope="module")
def hidden_norm_preset(hidden_norm_pair, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hidden_norm") / "preset"
    hidden_norm_pair[0].save_to_preset(str(directory))
    return directory


def test_bfloat16_preset_round_trip_is_bit_identical(tiny_tokenizer, tmp_path):
    from gemma_keras.converters import convert_keras_to_keras_hub
    from gemma_keras.converters.keras_hub_layout import WeightsFile

    hub = make_hub_model(tiny_tokenizer.proto_path, True, seed=3)
    bf16 = keras_hub.models.GemmaBackbone.from_config(
        {**hub.backbone.get_config(), "dtype": "bfloat16"})
    for a, b in zip(bf16.weights, hub.backbone.weights):
        a.assign(b.numpy().astype(a.dtype))  # rounded to bfloat16 once, here
    bf16.save_to_preset(str(tmp_path / "preset"))
    hub.preprocessor.save_to_preset(str(tmp_path / "preset"))
    summary = convert_keras_hub_to_keras(tmp_path / "preset", tmp_path / "keras")
    assert summary.dtype == "bfloat16"
    convert_keras_to_keras_hub(tmp_path / "keras", tmp_path / "back")
    with WeightsFile(tmp_path / "preset" / "model.weights.h5") as a, \
            WeightsFile(tmp_path / "back" / "model.weights.h5") as b:
        assert sorted(a.datasets) == sorted(b.datasets)
        for layer in a.datasets:
            x, y = a.dataset(layer), b.dataset(layer)
            assert x.attrs.get("dtype") == y.attrs.get("dtype") == "bfloat16", layer
            assert x[()].tobytes() == y[()].tobytes(), layer
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == \
        json.loads((tmp_path / "preset" / "config.json").read_text())


def test_sharded_preset_reads_as_the_model(hidden_norm_pair, tmp_path):
    from gemma_keras import Gemma2CausalLM

    hub, converted = hidden_norm_pair
    hub.save_to_preset(str(tmp_path / "preset"), max_shard_size=0.0001)  # GB: 4 shards
    assert (tmp_path / "preset" / "model.weights.json").is_file()
    convert_keras_hub_to_keras(tmp_path / "preset", tmp_path / "keras")
    assert_same_weights(Gemma2CausalLM.from_pretrained(tmp_path / "keras"), converted)


def test_preset_to_hf_checkpoint_matches_keras_hub_in_transformers(
        hidden_norm_preset, hidden_norm_pair, padded_batch, tmp_path):
    """keras-hub's query scale (not the one its flag asks for) reaches transformers."""
    from conftest import torch_logits
    from transformers import Gemma2ForCausalLM

    hub_model = hidden_norm_pair[0]
    summary = convert_keras_hub_to_keras(hidden_norm_preset, tmp_path / "keras")
    assert ("query scale kept" in summary.line()) == \
        hub_model.backbone.transformer_layers[0].attention.query_head_dim_normalize
    convert_keras_to_hf(tmp_path / "keras", tmp_path / "hf")
    hf = Gemma2ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids, mask = padded_batch
    assert_logits_close(torch_logits(hf, ids, mask), hub_logits(hub_model, ids, mask), mask)


# ------------------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def refused_presets(tiny_tokenizer, hidden_norm_preset, tmp_path_factory):
    """Name -> (preset directory, words the error must contain)."""
    root = tmp_path_factory.mktemp("refused")
    gemma1 = make_hub_model(tiny_tokenizer.proto_path, True, use_post_ffw_norm=False,
                            use_post_attention_norm=False, attention_logit_soft_cap=None,
                            final_logit_soft_cap=None, use_sliding_window_attention=False)
    gemma1.save_to_preset(str(root / "gemma1"))
    llama = keras_hub.models.LlamaBackbone(vocabulary_size=160, num_layers=1, num_query_heads=2,
                                           num_key_value_heads=1, hidden_dim=8,
                                           intermediate_dim=16)
    llama.save_to_preset(str(root / "llama"))
    shutil.copytree(hidden_norm_preset, root / "truncated")
    weights = root / "truncated" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(hidden_norm_preset, root / "no_tokenizer")
    (root / "no_tokenizer" / "assets" / "tokenizer" / "vocabulary.spm").unlink()
    return {
        "gemma1": (root / "gemma1", ["Gemma 1", "use_post_ffw_norm=False"]),
        "other_family": (root / "llama", ["LlamaBackbone", "Gemma 2"]),
        "truncated": (root / "truncated", ["model.weights.h5", "truncated"]),
        "no_tokenizer": (root / "no_tokenizer", ["no tokenizer", "vocabulary.spm"]),
    }


@pytest.mark.parametrize("case", ["gemma1", "other_family", "truncated", "no_tokenizer"])
def test_bad_presets_are_refused_leaving_nothing(refused_presets, case, tmp_path, capsys):
    src, words = refused_presets[case]
    out = tmp_path / "out"
    assert cli_main(["convert", str(src), str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        convert_keras_hub_to_keras(src, out)
    assert list(tmp_path.iterdir()) == []
