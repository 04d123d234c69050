"""`model.quantize("int8" | "int4")` on Gemma 2: int8 weights with per-row scales, the error
they add, `.keras` files, LoRA fine-tuning on the frozen int8 base, and merging back to float."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from conftest import run_script
from gemma_keras import tiny_task

TINY = tiny_task.tiny_model_dir()
NEW_TASK = "repeat"
# Measured on the tiny model (AMD EPYC, AVX2): int8 weights and per-token int8 activations
# move the logits by 1.0% of their RMS (int8 weights alone 0.5%), int4 per-channel weights by
# 9.8%. The bounds allow 3x and 2x: rounding differences between CPUs are far smaller.
INT8_RELATIVE_RMS = 0.03
INT4_RELATIVE_RMS = 0.2


def load_tiny():
    from gemma_keras.causal_lm import Gemma2CausalLM

    return Gemma2CausalLM.from_pretrained(TINY)


def forward(model, data):
    return np.asarray(model({"token_ids": data.token_ids, "padding_mask": data.padding_mask}))


def relative_rms(a, b, mask):
    """RMS of `a - b` over the unpadded positions, relative to the RMS of `b`."""
    diff, ref = (a - b)[mask > 0], b[mask > 0]
    return float(np.sqrt(np.mean(diff**2) / np.mean(ref**2)))


@pytest.fixture(scope="module")
def held_out():
    from gemma_keras.data import encode_records

    return encode_records(tiny_task.held_out_examples(n=200), load_tiny().tokenizer, 32)


@pytest.fixture(scope="module")
def float_reference(held_out):
    model = load_tiny()
    return (forward(model, held_out.subset(slice(0, 32))),
            tiny_task.teacher_forced_exact_match(model, held_out))


def test_int8_stores_int8_rows_and_stays_close_to_float(held_out, float_reference):
    from gemma_keras.quantization import weight_bytes

    ref_logits, ref_accuracy = float_reference
    model = load_tiny()
    float_bytes = weight_bytes(model)
    model.quantize("int8")
    q_proj = model.backbone.blocks[0].self_attn.q_proj
    assert str(q_proj._kernel.dtype) == "int8" and q_proj._kernel.shape == (64, 64)
    assert q_proj.kernel_scale.shape == (64,)
    embedding = model.backbone.embed_tokens
    assert str(embedding._embeddings.dtype) == "int8"
    assert embedding.embeddings_scale.shape == (model.config.vocab_size,)
    int8_vars = [v for v in model.variables if str(v.dtype) == "int8"]
    assert len(int8_vars) == 1 + 7 * model.config.num_hidden_layers
    # int8 values plus float32 scales and norms: close to a quarter of the float32 bytes
    assert weight_bytes(model) < 0.3 * float_bytes
    part = held_out.subset(slice(0, 32))
    error = relative_rms(forward(model, part), ref_logits, part.padding_mask)
    assert 0 < error < INT8_RELATIVE_RMS, error
    assert tiny_task.teacher_forced_exact_match(model, held_out) >= ref_accuracy - 0.02
    # generation runs on the int8 weights (greedy answers through the KV cache)
    examples = tiny_task.eval_examples()[:40]
    accuracy = tiny_task.exact_match_accuracy(
        lambda prompts: tiny_task.keras_answers(model, prompts), examples)
    assert accuracy >= ref_accuracy - 0.1, accuracy
    # the float views refuse to hand out integers
    with pytest.raises(ValueError, match="int8-quantized.*merge_lora"):
        q_proj.kernel
    with pytest.raises(ValueError, match="embedding is int8-quantized"):
        embedding.embeddings


def test_weight_only_int8_is_the_dequantized_float_model_and_blocked_backward(held_out,
                                                                              monkeypatch):
    """With float activations, the int8 model computes exactly the float model whose weights
    are `q / scale`; its input gradients (dequantized a block of rows at a time) too."""
    import keras
    import tensorflow as tf

    from gemma_keras import quantization
    from gemma_keras.quantization import dequantize

    model = load_tiny()
    model.quantize(config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    model.enable_lora(rank=4, targets="all")
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(0, 0.05, variable.shape).astype("float32"))
    part = held_out.subset(slice(0, 8))

    def loss_and_grads(m):
        x = {"token_ids": part.token_ids, "padding_mask": part.padding_mask}
        with tf.GradientTape() as tape:
            logits = m(x)
            loss = keras.losses.sparse_categorical_crossentropy(part.labels, logits,
                                                                from_logits=True)
            loss = tf.reduce_sum(loss * part.sample_weight) / part.sample_weight.sum()
        return logits.numpy(), [g.numpy() for g in tape.gradient(loss, m.trainable_variables)]

    logits_q, grads_q = loss_and_grads(model)
    # the 286-row embedding's gradient in blocks of 13 rows (22 loop steps)
    monkeypatch.setattr(quantization, "BACKWARD_BLOCK_ELEMENTS", 16 * 64)
    assert quantization._block_rows(286, 64) == 13
    _, grads_blocked = loss_and_grads(model)
    for g, b in zip(grads_q, grads_blocked):
        np.testing.assert_allclose(b, g, rtol=1e-4, atol=1e-6)
    # the int8 x int8 head product in blocks: the same int32 sums
    w8a8 = load_tiny()
    w8a8.quantize("int8")
    blocked = forward(w8a8, part)
    monkeypatch.undo()
    np.testing.assert_allclose(blocked, forward(w8a8, part), rtol=1e-6, atol=1e-6)
    dequantize(model)
    assert not quantization.is_quantized(model)
    logits_f, grads_f = loss_and_grads(model)
    np.testing.assert_allclose(logits_q, logits_f, atol=1e-4)
    for g, f in zip(grads_q, grads_f):
        np.testing.assert_allclose(g, f, rtol=1e-3, atol=1e-5)


JAX_INT8_STEP_MEMORY = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from gemma_keras import quantization
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.training import remat_scope

    if sys.argv[1] == "unordered":  # the control: dequantize without waiting for the gradient
        quantization.read_after = lambda value, tensor: value
    config = Gemma2Config(vocab_size=1024, hidden_size=256, intermediate_size=1024,
                          num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                          max_position_embeddings=64)
    with remat_scope(config):
        lm = Gemma2CausalLM(config, dtype=quantization.quantized_dtype("int8"))
    lm.enable_lora(4)
    lm.compile(jit_compile=True)
    ids = np.random.default_rng(0).integers(3, 1024, (1, 33)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    lm.train_on_batch(x, ids[:, 1:])  # builds the optimizer and the metrics
    state = tuple([v.value for v in variables] for variables in (
        lm.trainable_variables, lm.non_trainable_variables, lm.optimizer.variables,
        lm.metrics_variables))
    step = jax.jit(lm.train_step).lower(state, (x, ids[:, 1:], None)).compile()
    float_bytes = sum(4 * int(np.prod(w.shape)) for layer in quantization.quantized_layers(lm)
                      for w in layer.weights if w.dtype == "int8")
    print("RESULT" + json.dumps({"temp": step.memory_analysis().temp_size_in_bytes,
                                 "float_bytes": float_bytes}))
""")


def test_int8_lora_step_on_jax_never_holds_a_float_copy_of_the_model():
    """XLA may schedule the backward pass's dequantization of every int8 kernel at the
    start of the step (they depend on the weights alone): a float copy of the whole model,
    which `matmul.read_after` prevents by making each wait for its gradient. Measured on
    XLA's own buffer plan of the compiled step (8 layers, LoRA, remat)."""
    ordered = run_script(JAX_INT8_STEP_MEMORY, "ordered", backend="jax")
    unordered = run_script(JAX_INT8_STEP_MEMORY, "unordered", backend="jax")
    # measured on AMD EPYC: 0.27x ordered, 1.23x without the order
    assert ordered["temp"] < 0.5 * ordered["float_bytes"], ordered
    assert unordered["temp"] > 2 * ordered["temp"], (ordered, unordered)  # the control


def test_int4_per_channel_and_unsupported_modes(held_out, float_reference):
    import keras

    ref_logits, _ = float_reference
    model = load_tiny()
    with pytest.raises(ValueError, match="int4 is stored per channel.*block_size=-1"):
        model.quantize("int4")  # Keras' default int4 config has blocks of 128
    model = load_tiny()
    model.quantize(config=keras.quantizers.Int4QuantizationConfig(block_size=-1))
    q_proj = model.backbone.blocks[0].self_attn.q_proj
    assert q_proj._kernel.shape == (64, 32)  # two 4-bit values a byte
    part = held_out.subset(slice(0, 32))
    error = relative_rms(forward(model, part), ref_logits, part.padding_mask)
    assert INT8_RELATIVE_RMS / 10 < error < INT4_RELATIVE_RMS, error


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_hf_checkpoint_quantized_as_it_streams_in(hf_checkpoint, padded_batch, mode,
                                                 monkeypatch):
    """`from_pretrained(hf_dir, quantize=mode)` quantizes each block of rows as it is read
    (three rows a block here): the same integers and scales as loading float and calling
    `quantize`, so the same logits."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.converters import hf_checkpoint as reader
    from gemma_keras.quantization import quantize_model, quantized_layers

    reference = quantize_model(Gemma2CausalLM.from_pretrained(hf_checkpoint), mode)
    monkeypatch.setattr(reader, "rows_per_block", lambda shape, itemsize: 3)
    streamed = Gemma2CausalLM.from_pretrained(hf_checkpoint, quantize=mode)

    layers, expected = quantized_layers(streamed), quantized_layers(reference)
    assert [layer.path for layer in layers] == [layer.path for layer in expected]
    assert len(layers) == 1 + 7 * streamed.config.num_hidden_layers  # embedding, projections
    for layer, twin in zip(layers, expected):
        assert layer.quantization_mode == mode
        for stored, wanted in zip(layer.quantized_weights(), twin.quantized_weights()):
            assert stored.dtype == wanted.dtype and stored.shape == wanted.shape, layer.path
            np.testing.assert_array_equal(np.asarray(stored), np.asarray(wanted), layer.path)
    ids, mask = padded_batch
    inputs = {"token_ids": ids, "padding_mask": mask}
    np.testing.assert_array_equal(np.asarray(streamed(inputs)), np.asarray(reference(inputs)))


def test_quantize_argument_is_checked_before_loading():
    from gemma_keras.causal_lm import Gemma2CausalLM

    with pytest.raises(ValueError, match="quantization mode 'int3' is not supported"):
        Gemma2CausalLM.from_pretrained(TINY, quantize="int3")


@pytest.fixture(scope="module")
def lora_runs():
    """The same LoRA fine-tune (rank 8, all projections, 160 steps) on the float model and on
    its int8 quantization, with the held-out exact match before and after."""
    import keras

    from gemma_keras.data import encode_records
    from gemma_keras.training import adamw

    results = {}
    for mode in ("float", "int8"):
        keras.utils.set_random_seed(0)
        model = load_tiny()
        held = encode_records(tiny_task.held_out_examples(NEW_TASK, n=100), model.tokenizer, 32)
        if mode == "int8":
            model.quantize("int8")
        before = tiny_task.teacher_forced_exact_match(model, held)
        model.enable_lora(rank=8, targets="all")
        train = encode_records(tiny_task.training_examples(1024, task=NEW_TASK),
                               model.tokenizer, 32)
        model.compile(optimizer=adamw(model, learning_rate=1e-2), jit_compile=False)
        model.fit(train.tf_dataset(32), epochs=5, shuffle=False, verbose=0)
        results[mode] = (model, before, tiny_task.teacher_forced_exact_match(model, held), held)
    return results


@pytest.mark.trains
def test_lora_on_int8_learns_like_lora_on_float(lora_runs):
    _, float_before, float_after, _ = lora_runs["float"]
    model, before, after, _ = lora_runs["int8"]
    assert all("/lora_" in v.path for v in model.trainable_variables)
    assert before <= 0.1 and float_before <= 0.1, (before, float_before)
    # Held-out exact match after 160 steps at seed 0: float 60%, int8 91% (with Keras' loss
    # on the logits, 96 steps: float 81%, int8 74%). A run's exact match moves by more than
    # int8 moves it (tests/test_lora.py: 60% to 98% with the seed), so the robust claim is
    # that both learn the task.
    assert float_after >= float_before + 0.5 and after >= before + 0.5, (float_after, after)


@pytest.mark.trains
def test_int8_lora_model_saves_and_loads_as_keras_file(lora_runs, tmp_path):
    import keras

    model, _, _, held = lora_runs["int8"]
    model.save(tmp_path / "int8-lora.keras")
    loaded = keras.saving.load_model(tmp_path / "int8-lora.keras")
    assert [str(v.dtype) for v in loaded.variables] == [str(v.dtype) for v in model.variables]
    assert sorted(v.path for v in loaded.trainable_variables) == sorted(
        v.path for v in model.trainable_variables)
    part = held.subset(slice(0, 16))
    np.testing.assert_allclose(forward(loaded, part), forward(model, part), atol=1e-6)


@pytest.mark.trains
def test_merge_lora_on_int8_gives_a_float_model_that_exports(lora_runs, tmp_path):
    from gemma_keras.converters import load_hf_checkpoint, save_hf_checkpoint
    from gemma_keras.lora import load_lora_weights, save_lora_weights
    from gemma_keras.quantization import is_quantized

    trained, _, after, held = lora_runs["int8"]
    model = load_tiny()
    model.quantize("int8")
    load_lora_weights(model, save_lora_weights(trained, tmp_path / "adapter.safetensors"))
    part = held.subset(slice(0, 32))
    expected = forward(model, part)
    with pytest.raises(ValueError, match="quantized.*merge_lora"):
        save_hf_checkpoint(model, tmp_path / "refused")
    model.merge_lora()
    assert not is_quantized(model)
    assert all(str(v.dtype) == "float32" and v.trainable for v in model.variables)
    assert not any("lora" in v.path for v in model.variables)
    # the merged float model drops only the activations' int8 rounding
    merged = forward(model, part)
    assert relative_rms(merged, expected, part.padding_mask) < 2 * INT8_RELATIVE_RMS
    assert tiny_task.teacher_forced_exact_match(model, held) >= after - 0.1
    save_hf_checkpoint(model, tmp_path / "merged")
    np.testing.assert_allclose(forward(load_hf_checkpoint(tmp_path / "merged"), part), merged,
                               atol=1e-5)


def test_finetune_command_on_an_int8_base(tmp_path, capsys):
    import json

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.cli import main
    from gemma_keras.quantization import is_quantized
    from gemma_keras.finetune import finetune

    data = tmp_path / "repeat.jsonl"
    data.write_text("".join(json.dumps(e) + "\n"
                            for e in tiny_task.training_examples(40, task=NEW_TASK)))
    out = tmp_path / "tuned"
    assert main(["finetune", "--data", str(data), "--out", str(out), "--quantize", "int8",
                 "--lora-rank", "4", "--learning-rate", "1e-2", "--batch-size", "16",
                 "--eager", "--quiet"]) == 0
    assert "epoch 1: validation loss" in capsys.readouterr().out
    tuned = Gemma2CausalLM.from_pretrained(out)  # merged: a float model directory
    assert not is_quantized(tuned)
    assert all(str(v.dtype) == "float32" for v in tuned.variables)
    with pytest.raises(ValueError, match="freezes the base weights.*lora"):
        finetune(TINY, data, tmp_path / "refused", quantize="int8", verbose=0)
