"""Converters: HF -> Keras directory -> HF, checked against transformers and bit for bit.

The tiny config (conftest.TINY_HF_CONFIG) has the shapes where ports break: 2 KV heads for 4
query heads, num_heads * head_dim (64) != hidden_size (48), query_pre_attn_scalar (24) !=
head_dim (16), a sliding window shorter than the input, and every weight randomised.
"""

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import make_hf_model, torch_logits
from gemma_keras import Gemma2CausalLM
from gemma_keras.cli import main as cli_main
from gemma_keras.config import ConfigError
from gemma_keras.converters import (CheckpointError, convert, load_hf_checkpoint,
                                    save_hf_checkpoint, streaming)
from gemma_keras.converters.keras_dir import save_model_dir
from gemma_keras.converters.safetensors_io import SafetensorsCheckpoint


def _tensors(directory):
    """Every tensor of an HF directory, read with safetensors' own numpy loader."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_bit_identical(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def hf_dir(hf_checkpoint, tiny_tokenizer, tmp_path_factory):
    """The float32 tiny checkpoint with a tokenizer.model beside it."""
    d = tmp_path_factory.mktemp("hf_with_tokenizer") / "src"
    shutil.copytree(hf_checkpoint, d)
    shutil.copyfile(tiny_tokenizer.proto_path, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def hf_bf16():
    return make_hf_model(seed=1, dtype="bfloat16")


@pytest.fixture(scope="module")
def hf_bf16_dir(hf_bf16, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_bf16")
    hf_bf16.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def keras_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("keras") / "model"
    convert.convert_hf_to_keras(hf_dir, out)
    return out


# ------------------------------------------------------------------------ HF -> Keras
def test_keras_dir_loads_with_tokenizer_and_matches_transformers(keras_dir, hf_model,
                                                                  padded_batch):
    files = sorted(p.name for p in keras_dir.iterdir())
    assert files == ["config.json", "metadata.json", "model.weights.h5", "tokenizer.model"]
    metadata = json.loads((keras_dir / "metadata.json").read_text())
    assert metadata["dtype"] == "float32"
    assert metadata["parameters"] == sum(p.numel() for p in hf_model.model.parameters())
    assert metadata["bytes"] == 4 * metadata["parameters"]

    model = Gemma2CausalLM.from_pretrained(keras_dir)
    assert model.tokenizer is not None and model.tokenizer.decode(
        model.tokenizer.encode("the cat sat")) == "the cat sat"
    ids, mask = padded_batch
    ours = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], torch_logits(hf_model, ids, mask)[valid],
                               atol=1e-4, rtol=0)


def test_bfloat16_source_reads_exactly(hf_bf16_dir, padded_batch):
    """A bfloat16 checkpoint lands bit-exact in bfloat16 variables and upcasts exactly."""
    source = _tensors(hf_bf16_dir)
    for dtype in ("bfloat16", "float32"):
        model = load_hf_checkpoint(hf_bf16_dir, dtype=dtype)
        embedding = np.asarray(model.backbone.embed_tokens.embeddings.numpy())
        assert str(embedding.dtype) == dtype
        np.testing.assert_array_equal(embedding.astype("float32"),
                                      source["model.embed_tokens.weight"].astype("float32"))
    # The float32 model on bfloat16 weights matches transformers loading them into float32
    # (not `hf_bf16.float()`: its RoPE frequencies were rounded to bfloat16 with the weights).
    import torch
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        hf_bf16_dir, dtype=torch.float32, attn_implementation="eager")
    ids, mask = padded_batch
    ref = torch_logits(reference, ids, mask)
    ours = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_streamed_blocks_give_the_same_model(hf_dir, monkeypatch):
    """With tiny blocks every large tensor moves in many row blocks; nothing changes."""
    whole = load_hf_checkpoint(hf_dir)
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 1000)  # 160 x 48 embedding -> 32 blocks
    blocked = load_hf_checkpoint(hf_dir)
    for a, b in zip(whole.weights, blocked.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_variable_rows_reads_back_assigned_rows(dtype):
    """Rows written block by block read back exactly, block by block."""
    import keras
    import ml_dtypes

    values = np.random.default_rng(0).standard_normal((37, 5)).astype(
        ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    variable = keras.Variable(np.zeros((37, 5), values.dtype), dtype=dtype)
    for start in range(0, 37, 8):
        streaming.assign_rows(variable, start, values[start:start + 8])
    for start, stop in [(0, 37), (3, 11), (36, 37)]:
        rows = streaming.variable_rows(variable, start, stop)
        assert rows.shape == (stop - start, 5)
        np.testing.assert_array_equal(rows.astype(np.float32),
                                      values[start:stop].astype(np.float32))


def test_rows_assigned_in_blocks_at_every_rank_in_turn():
    """The row writer serves tensors of any rank, in any order (its trace is shared once it
    has seen two ranks): norms [n], projections [out, in], and back."""
    import keras

    rng = np.random.default_rng(1)
    for shape in [(7, 4), (7,), (7, 2, 3), (5, 4), (6,)]:
        values = rng.standard_normal(shape).astype(np.float32)
        variable = keras.Variable(np.zeros(shape, np.float32))
        for start in range(0, shape[0], 3):
            streaming.assign_rows(variable, start, values[start:start + 3])
        np.testing.assert_array_equal(np.asarray(variable), values, str(shape))


def _peak_of_a_read(variable):
    """Bytes the resident peak rises by while a compiled (non-XLA) function reads `variable`."""
    import tensorflow as tf

    def status(key):
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0]) * 1024

    read = tf.function(lambda x: tf.linalg.matvec(variable, x))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the current resident size
    before = status("VmRSS")
    read(tf.ones([variable.shape[1]]))
    return status("VmHWM") - before


def test_streamed_variables_are_read_without_a_copy():
    """Row blocks are written in place without leaving TensorFlow's copy-on-read mode on: a
    scatter does, and every later read outside XLA then copies the whole variable."""
    import keras
    import tensorflow as tf

    size = 8192 * 8192 * 4  # 256 MiB
    streamed = keras.Variable(np.zeros([8192, 8192], np.float32))
    for start in range(0, 8192, 2048):
        streamed_rows = np.full([2048, 8192], start, np.float32)
        streaming.assign_rows(streamed, start, streamed_rows)
    assert streamed.value[6144:6146, :3].numpy().tolist() == [[6144.0] * 3] * 2
    assert _peak_of_a_read(streamed.value) < size / 4
    assert streaming.variable_rows(streamed, 2047, 2049)[:, 0].tolist() == [0.0, 2048.0]
    assert _peak_of_a_read(streamed.value) < size / 4  # reading rows back leaves it so

    scattered = tf.Variable(np.zeros([8192, 8192], np.float32))
    scattered.scatter_update(tf.IndexedSlices(tf.ones([2, 8192]), tf.constant([0, 1])))
    assert _peak_of_a_read(scattered) > size * 3 / 4  # what the test guards against


def test_construction_skips_initializers_only_inside(hf_dir):
    from gemma_keras.config import Gemma2Config

    config = Gemma2Config.from_json_file(hf_dir / "config.json")
    empty = Gemma2CausalLM.empty(config)
    assert all(not np.any(w.numpy()) for w in empty.weights)
    fresh = Gemma2CausalLM(config)  # ordinary construction still initialises randomly
    assert np.any(fresh.backbone.embed_tokens.embeddings.numpy())


# ------------------------------------------------------------------------ round trips
def test_round_trip_float32_bit_identical(hf_dir, keras_dir, tmp_path):
    out = tmp_path / "hf"
    convert.convert_keras_to_hf(keras_dir, out)
    _assert_bit_identical(hf_dir, out)
    assert (out / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("keras_dtype", [None, "float32"])
def test_round_trip_bfloat16_bit_identical(hf_bf16_dir, tmp_path, keras_dtype):
    convert.convert_hf_to_keras(hf_bf16_dir, tmp_path / "k", dtype=keras_dtype)
    expected = keras_dtype or "bfloat16"
    assert json.loads((tmp_path / "k" / "metadata.json").read_text())["dtype"] == expected
    convert.convert_keras_to_hf(tmp_path / "k", tmp_path / "hf", dtype="bfloat16")
    _assert_bit_identical(hf_bf16_dir, tmp_path / "hf")


def test_float16_conversion_rounds_like_numpy(hf_dir, tmp_path):
    model = load_hf_checkpoint(hf_dir, dtype="float16")
    save_hf_checkpoint(model, tmp_path / "hf")
    source, out = _tensors(hf_dir), _tensors(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"
    for name, tensor in out.items():
        assert tensor.dtype == np.float16
        np.testing.assert_array_equal(tensor, source[name].astype(np.float16))


def test_transformers_loads_sharded_export(hf_dir, hf_model, padded_batch, tmp_path):
    import transformers

    model = load_hf_checkpoint(hf_dir)
    files = save_hf_checkpoint(model, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) == 4 and shards[0] == "model-00001-of-00004.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == 4 * sum(
        p.numel() for p in hf_model.model.parameters())
    assert all((tmp_path / "hf" / s).stat().st_size <= 100_000 + 4096 for s in shards)
    assert "tokenizer.model" in files  # from model.tokenizer

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager")
    assert type(loaded).__name__ == "Gemma2ForCausalLM"
    ids, mask = padded_batch
    np.testing.assert_array_equal(torch_logits(loaded, ids, mask),
                                  torch_logits(hf_model, ids, mask))


def test_lora_projection_exports_merged(hf_dir, tmp_path):
    model = load_hf_checkpoint(hf_dir)
    q_proj = model.backbone.blocks[0].self_attn.q_proj
    q_proj.enable_lora(2, lora_alpha=4)
    q_proj.lora_b.assign(np.random.default_rng(0).normal(size=(64, 2)))
    a, b = q_proj.lora_a.numpy(), q_proj.lora_b.numpy()
    expected = q_proj.kernel.numpy() + 2 * b @ a  # alpha / rank = 2
    save_hf_checkpoint(model, tmp_path / "hf")
    exported = _tensors(tmp_path / "hf")["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(exported, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="merge_lora"):
        save_model_dir(model, tmp_path / "k")
    assert not (tmp_path / "k").exists()


def test_keras_weights_shard_where_large(hf_dir, tmp_path, padded_batch):
    convert.convert_hf_to_keras(hf_dir, tmp_path / "k", max_shard_bytes=150_000)
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert "model.weights.json" in names and "model_00001.weights.h5" in names
    a = Gemma2CausalLM.from_pretrained(tmp_path / "k")
    b = load_hf_checkpoint(hf_dir)
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@pytest.mark.parametrize("weights", ["model.weights.h5", "model.weights.json"])
def test_keras_dir_weights_are_a_plain_keras_weights_file(hf_dir, tmp_path, weights):
    """The embedding is written outside Keras' saver (in row blocks) at Keras' own path, so
    `model.load_weights` reads the file like any other, sharded or not."""
    shard = 150_000 if weights.endswith("json") else 10**9
    convert.convert_hf_to_keras(hf_dir, tmp_path / "k", max_shard_bytes=shard)
    model = Gemma2CausalLM.empty(load_hf_checkpoint(hf_dir).config)
    model.load_weights(tmp_path / "k" / weights)
    for x, y in zip(model.weights, load_hf_checkpoint(hf_dir).weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_model_dir_of_a_compiled_model_holds_no_optimizer_state(hf_dir, tmp_path):
    import h5py
    import keras

    model = load_hf_checkpoint(hf_dir)
    model.compile(optimizer=keras.optimizers.Adam(),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    save_model_dir(model, tmp_path / "k")
    with h5py.File(tmp_path / "k" / "model.weights.h5") as f:
        assert sorted(f.keys()) == ["backbone", "vars"]
    reloaded = Gemma2CausalLM.from_pretrained(tmp_path / "k")
    for x, y in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_from_pretrained_dtype_override(hf_bf16_dir, tmp_path):
    convert.convert_hf_to_keras(hf_bf16_dir, tmp_path / "k")
    assert Gemma2CausalLM.from_pretrained(tmp_path / "k").dtype_policy.name == "bfloat16"
    model = Gemma2CausalLM.from_pretrained(tmp_path / "k", dtype="float32")
    assert str(model.backbone.embed_tokens.embeddings.dtype) == "float32"


# ------------------------------------------------------------------------ checks
def _write_variant(src, dst, edit):
    """Copy an HF dir, applying `edit(tensors) -> tensors` to its model.safetensors."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_extra_and_misshapen_tensors_are_all_listed(hf_checkpoint, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.9.self_attn.q_proj.weight"] = np.zeros((2, 2), "float32")
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((31, 48), "float32")
        return t

    src = _write_variant(hf_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        convert.convert_hf_to_keras(src, tmp_path / "out")
    msg = str(e.value)
    assert "missing tensors: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors: ['model.layers.9.self_attn.q_proj.weight']" in msg
    assert "model.layers.0.self_attn.k_proj.weight has shape (31, 48), expected (32, 48)" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_wrong_model_type_is_refused(hf_checkpoint, tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(hf_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama', expected 'gemma2'"):
        convert.convert_hf_to_keras(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_and_corrupt_files_are_named(hf_checkpoint, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(hf_checkpoint, src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable .*not fully"):
        convert.convert_hf_to_keras(src, tmp_path / "out")

    (src / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        SafetensorsCheckpoint(src)
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_shard(tmp_path, hf_dir):
    model = load_hf_checkpoint(hf_dir)
    save_hf_checkpoint(model, tmp_path / "hf", max_shard_bytes=100_000)
    (tmp_path / "hf" / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names model-00003-of-00004.safetensors"):
        load_hf_checkpoint(tmp_path / "hf")


def test_failure_midway_leaves_no_out_dir(hf_dir, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "write_model_dir", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_hf_to_keras(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_out_dir_needs_overwrite(hf_dir, keras_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert_keras_to_hf(keras_dir, out)
    assert (out / "old.txt").exists()
    convert.convert_keras_to_hf(keras_dir, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


# ------------------------------------------------------------------------ verify and CLI
def test_verify_passes_and_catches_a_broken_conversion(hf_dir, tmp_path, monkeypatch):
    summary = convert.convert_hf_to_keras(hf_dir, tmp_path / "good", verify=True)
    assert summary.verify.passed and summary.verify.max_abs_diff < 1e-4
    assert summary.verify.reference.startswith("transformers")

    fill = convert.fill_from_checkpoint

    def fill_with_swapped_kv(model, checkpoint, progress=False):  # a classic porting bug
        fill(model, checkpoint, progress)
        attn = model.backbone.blocks[1].self_attn
        k, v = attn.k_proj.kernel.numpy(), attn.v_proj.kernel.numpy()
        attn.k_proj.kernel.assign(v)
        attn.v_proj.kernel.assign(k)

    monkeypatch.setattr(convert, "fill_from_checkpoint", fill_with_swapped_kv)
    with pytest.raises(convert.VerificationError, match="verify FAILED"):
        convert.convert_hf_to_keras(hf_dir, tmp_path / "bad", verify=True)
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []


def test_cli_convert_both_ways(hf_bf16_dir, tmp_path, capsys):
    assert cli_main(["convert", str(hf_bf16_dir), str(tmp_path / "k"), "--quiet",
                     "--dtype", "float32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify ok" in out and "bfloat16" in out  # rounded through the source's dtype
    assert "HF -> Keras: 46 tensors, 91,440 parameters, 0.000366 GB float32" in out
    # A gemma-keras directory converts back to HF by default.
    assert cli_main(["convert", str(tmp_path / "k"), str(tmp_path / "hf"), "--quiet",
                     "--dtype", "bfloat16", "--max-shard-size", "100KB"]) == 0
    assert "Keras -> HF: 46 tensors" in capsys.readouterr().out
    _assert_bit_identical(hf_bf16_dir, tmp_path / "hf")


def test_cli_reports_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "neither a gemma-keras model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert", str(tmp_path / "empty"), str(tmp_path / "out"),
                  "--max-shard-size", "lots"])
    assert "expected a size like 5GB or 500MB, got 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_from_pretrained_on_a_non_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a gemma-keras model directory"):
        Gemma2CausalLM.from_pretrained(tmp_path)
