"""The Keras model: serialization, the KV cache, dtypes and bad input."""

import numpy as np
import pytest

import keras
from gemma_keras import Gemma2Backbone, Gemma2CausalLM
from gemma_keras.converters import load_hf_checkpoint


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_hf_checkpoint(hf_checkpoint)


def _logits(model, ids, mask):
    return np.asarray(model({"token_ids": ids, "padding_mask": mask}))


def test_get_config_from_config_and_keras_file(model, padded_batch, tmp_path):
    ids, mask = padded_batch
    expected = _logits(model, ids, mask)

    clone = Gemma2CausalLM.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(_logits(clone, ids, mask), expected)

    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Gemma2CausalLM)
    assert loaded.config == model.config
    np.testing.assert_array_equal(_logits(loaded, ids, mask), expected)


def test_keras_file_keeps_the_tokenizer(tmp_path):
    """`model.save("x.keras")` stores the tokenizer as an asset; `load_model` gives it back:
    the same SentencePiece model, the same ids, the same greedy completion from text."""
    from gemma_keras.pretrained import load_model

    model = load_model()  # the bundled tiny model, tokenizer.model beside its weights
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "reverse: a b c"}])
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.tokenizer is not None and loaded.tokenizer.proto_path is None  # from the file
    assert loaded.tokenizer.proto == model.tokenizer.proto
    ids = model.tokenizer.encode(prompt)
    assert loaded.tokenizer.encode(prompt) == ids
    assert loaded.tokenizer.decode(ids, skip_special_tokens=False) == prompt
    assert loaded.generate(prompt, max_new_tokens=6) == model.generate(prompt, max_new_tokens=6)


def test_keras_file_without_tokenizer(model, tmp_path):
    assert model.tokenizer is None  # the random checkpoint has no tokenizer.model
    model.save(tmp_path / "bare.keras")
    assert keras.saving.load_model(tmp_path / "bare.keras").tokenizer is None


def test_weights_are_the_expected_set(model):
    config = model.config
    assert model.count_params() == config.num_parameters()
    assert isinstance(model.backbone, Gemma2Backbone)
    assert len(model.backbone.blocks) == config.num_hidden_layers


def test_cached_decoding_matches_full_forward(model):
    """Prefill 5 tokens, then decode one at a time; the logits match the full forward."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 11)).astype("int32")
    full = _logits(model, ids, np.ones_like(ids))

    backbone = model.backbone
    cache = backbone.init_cache(batch_size=2, max_length=16)
    hidden, cache = backbone.call_with_cache(ids[:, :5], cache, cache_index=0)
    steps = [np.asarray(model.logits(hidden))]
    for t in range(5, 11):
        hidden, cache = backbone.call_with_cache(ids[:, t:t + 1], cache, cache_index=t)
        steps.append(np.asarray(model.logits(hidden)))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_left_padded_cache_rows_match_unpadded(model):
    """A row starting at slot 3 (left padding) gives the logits of the same tokens unpadded."""
    rng = np.random.default_rng(4)
    ids = rng.integers(3, model.config.vocab_size, size=(1, 8)).astype("int32")
    alone = _logits(model, ids, np.ones_like(ids))[0]
    padded = np.concatenate([np.zeros((1, 3), "int32"), ids], axis=1)
    cache = model.backbone.init_cache(batch_size=1, max_length=12)
    hidden, _ = model.backbone.call_with_cache(padded, cache, 0, start=np.array([3]))
    np.testing.assert_allclose(np.asarray(model.logits(hidden))[0, 3:], alone, atol=1e-4)


def test_out_of_range_token_ids_fail_clearly(model):
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        ids = np.array([[2, 5, bad]], dtype="int32")
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 160\)"):
            model({"token_ids": ids, "padding_mask": np.ones_like(ids)})


# Measured on the tiny random model (soft-caps 3 and 2 keep logits within +-2), 4 x 12
# positions: bfloat16 deviates from float32 by at most 0.13 (mean 0.014), and 98% of greedy
# choices agree. bfloat16 keeps 8 bits of mantissa (relative error ~4e-3 per op), which
# compounds over the layers. The bounds leave about 2x headroom over what was measured.
BFLOAT16_MAX_ERROR = 0.3
BFLOAT16_MEAN_ERROR = 0.03


def test_bfloat16_model_close_to_float32(model, hf_checkpoint, padded_batch):
    ids, mask = padded_batch
    bf16 = load_hf_checkpoint(hf_checkpoint, dtype="bfloat16")
    assert bf16.backbone.blocks[0].gate_proj.kernel.dtype == "bfloat16"
    valid = mask.astype(bool)
    ref = _logits(model, ids, mask)[valid]
    got = _logits(bf16, ids, mask)[valid]
    err = np.abs(got - ref)
    assert err.max() < BFLOAT16_MAX_ERROR, err.max()
    assert err.mean() < BFLOAT16_MEAN_ERROR, err.mean()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_large_16_bit_kernels_are_multiplied_in_row_blocks(dtype, monkeypatch):
    """A 16-bit kernel larger than WIDENED_BLOCK_ELEMENTS is multiplied in row blocks (so
    TensorFlow widens one block at a time to float32); the product is unchanged."""
    from gemma_keras import matmul

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.standard_normal([2, 3, 64]), dtype)
    w = keras.ops.convert_to_tensor(rng.standard_normal([1000, 64]), dtype)
    whole = keras.ops.convert_to_numpy(keras.ops.cast(matmul.matmul_transposed(x, w), "float32"))
    monkeypatch.setattr(matmul, "WIDENED_BLOCK_ELEMENTS", 64 * 300)
    assert len(matmul._row_blocks(w)) == (4 if dtype == "bfloat16" else 1)
    blocked = keras.ops.convert_to_numpy(keras.ops.cast(matmul.matmul_transposed(x, w), "float32"))
    assert blocked.shape == (2, 3, 1000)
    x64 = keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")).astype(np.float64)
    w64 = keras.ops.convert_to_numpy(keras.ops.cast(w, "float32")).astype(np.float64)
    reference = x64 @ w64.T
    tolerance = 2 * 8 * float(np.finfo(np.float32).eps if dtype == "float32" else 2.0**-8)
    for product in (whole, blocked):
        np.testing.assert_allclose(product, reference, atol=tolerance * np.abs(reference).max())


def test_generation_uses_xla_only_for_float32_compute(model):
    """XLA on CPU widens every 16-bit kernel to float32 at once (3x the weights at 2B)."""
    from gemma_keras.generation import uses_xla

    config = model.config
    assert uses_xla(model)
    assert not uses_xla(Gemma2CausalLM.empty(config, dtype="bfloat16"))
    assert not uses_xla(Gemma2CausalLM.empty(config, dtype="mixed_bfloat16"))
