"""Fine-tuning with model.fit: data pipeline, compile defaults, masked loss, TF and JAX fits."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from conftest import TRAIN_SEED, run_script
from gemma_keras import tiny_task
from gemma_keras.data import DataError, encode_records, load_jsonl

TINY = tiny_task.tiny_model_dir()


@pytest.fixture(scope="module")
def tokenizer():
    from gemma_keras.tokenizer import GemmaTokenizer

    return GemmaTokenizer(os.path.join(TINY, "tokenizer.model"))


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "reverse: cat dog", "response": "dog cat"})


@pytest.mark.parametrize("lines, kwargs, expected", [
    ([], {}, "empty"),
    ([GOOD, "{not json"], {}, "line 2: not valid JSON"),
    ([GOOD, GOOD, json.dumps({"prompt": "reverse: a b"})], {}, "line 3: has 'prompt' or "
                                                              "'response' but is missing 'response'"),
    ([json.dumps({"question": "x"})], {}, "line 1: expected 'text', 'prompt'"),
    ([json.dumps([1, 2])], {}, "line 1: expected a JSON object"),
    ([GOOD, "", json.dumps({"text": "cat " * 40})], {"sequence_length": 32},
     "line 3: 43 tokens, longer than sequence_length=32"),
    ([json.dumps({"messages": [{"role": "system", "content": "x"}]})], {},
     "line 1: message 0 has role 'system'"),
    ([json.dumps({"messages": [{"role": "user", "content": "x"}]})], {}, "line 1: no model turn"),
    ([json.dumps({"prompt": "x", "response": 3})], {}, "line 1: message 1: 'content' must be a "
                                                        "string"),
])
def test_bad_data_is_reported_with_its_line(tmp_path, tokenizer, lines, kwargs, expected):
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_jsonl(path, tokenizer, **kwargs)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_loss_only_on_response_tokens(tokenizer):
    data = encode_records([{"prompt": "reverse: cat dog", "response": "dog cat"},
                           {"text": "cat dog"}], tokenizer, sequence_length=32)
    prompt = tokenizer.encode(tiny_task.chat_prompts(tokenizer, ["reverse: cat dog"])[0])
    response = tokenizer.encode("dog cat<end_of_turn>\n", add_bos=False)
    full = prompt + response
    n = len(full) - 1
    assert data.token_ids[0, :n].tolist() == full[:-1]
    assert data.labels[0, :n].tolist() == full[1:]
    assert data.padding_mask[0].tolist() == [1] * n + [0] * (32 - n)
    # trained labels are exactly the response and its end of turn
    trained = data.labels[0][data.sample_weight[0] > 0].tolist()
    assert trained == response
    # plain text: every token (and the appended <eos>) is trained, padding is not
    text = tokenizer.encode("cat dog") + [tokenizer.eos_id]
    assert data.labels[1][data.sample_weight[1] > 0].tolist() == text[1:]
    assert data.sample_weight[1, len(text) - 1:].sum() == 0


def test_multi_turn_messages_train_every_model_turn(tokenizer):
    record = {"messages": [{"role": "user", "content": "repeat: sun"},
                           {"role": "model", "content": "sun"},
                           {"role": "user", "content": "reverse: cat dog"},
                           {"role": "assistant", "content": "dog cat"}]}
    data = encode_records([record], tokenizer)
    trained = tokenizer.decode(data.labels[0][data.sample_weight[0] > 0],
                               skip_special_tokens=False)
    assert trained == "sun<end_of_turn>\ndog cat<end_of_turn>\n"


def test_compile_defaults():
    import keras

    from gemma_keras.causal_lm import Gemma2CausalLM

    model = Gemma2CausalLM.from_pretrained(TINY)
    model.compile()
    assert isinstance(model.optimizer, keras.optimizers.AdamW)
    assert float(model.optimizer.learning_rate) == pytest.approx(5e-5)
    model.enable_lora(2)
    model.compile()
    assert float(model.optimizer.learning_rate) == pytest.approx(2e-4)


def cross_entropy(logits, labels, weights):
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    return (nll * weights).sum() / weights.sum()


@pytest.mark.trains
def test_full_finetune_lowers_validation_loss_with_exact_masked_loss(tokenizer):
    """A generator trains, a tf.data set validates; Keras' loss is the masked mean computed
    by hand, and two epochs of full fine-tuning on a new task lower the validation loss."""
    import keras

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.training import adamw

    keras.utils.set_random_seed(TRAIN_SEED)
    model = Gemma2CausalLM.from_pretrained(TINY)
    train = encode_records(tiny_task.training_examples(192, task="repeat"), tokenizer, 32)
    val = encode_records(tiny_task.held_out_examples("repeat", n=48), tokenizer, 32)
    # eager: a dozen steps run faster than tracing the step (the LoRA test fits compiled)
    model.compile(optimizer=adamw(model, learning_rate=2e-3), run_eagerly=True)

    logits = np.asarray(model.predict_on_batch({"token_ids": val.token_ids,
                                                "padding_mask": val.padding_mask}))
    expected = cross_entropy(logits, val.labels, val.sample_weight)
    before = model.evaluate(val.tf_dataset(48, shuffle=False), return_dict=True, verbose=0)
    assert before["loss"] == pytest.approx(expected, rel=1e-4)

    history = model.fit(train.batches(32, repeat=True), steps_per_epoch=train.num_batches(32),
                        validation_data=val.tf_dataset(48), epochs=2, verbose=0)
    val_losses = history.history["val_loss"]
    assert val_losses[-1] < 0.5 * before["loss"], (before, val_losses)


JAX_FIT = textwrap.dedent("""
    import json, os, keras
    from gemma_keras import tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.data import encode_records
    from gemma_keras.training import adamw, remat_scope
    assert keras.backend.backend() == "jax"
    keras.utils.set_random_seed(int(os.environ.get("GEMMA_KERAS_TRAIN_SEED", "0")))
    with remat_scope(Gemma2Config.from_json_file(tiny_task.tiny_model_dir() + "/config.json")):
        model = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir(),
                                               dtype="mixed_bfloat16")
    remat = [str(block._remat_mode.mode) for block in model.backbone.blocks]
    data = encode_records(tiny_task.training_examples(64, task="repeat"), model.tokenizer, 32)
    model.compile(optimizer=adamw(model, learning_rate=3e-3, gradient_accumulation_steps=2))
    history = model.fit(data.batches(16, repeat=True), steps_per_epoch=4, epochs=3, verbose=0)
    print("RESULT" + json.dumps({"loss": history.history["loss"],
                                 "compute_dtype": model.compute_dtype,
                                 "variable_dtype": model.variable_dtype,
                                 "iterations": int(model.optimizer.iterations),
                                 "remat": remat}))
""")


JAX_REMAT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import keras
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.training import remat_scope

    config = Gemma2Config(vocab_size=512, hidden_size=128, intermediate_size=1024,
                          num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                          max_position_embeddings=256)
    ids = np.random.default_rng(0).integers(3, 512, (1, 129)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    out = {}
    for name in ("stored", "remat"):
        keras.utils.set_random_seed(0)
        if name == "remat":
            with remat_scope(config):
                lm = Gemma2CausalLM(config)
        else:
            lm = Gemma2CausalLM(config)
        lm.enable_lora(4)
        lm.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=True)
        losses = [float(lm.train_on_batch(x, ids[:, 1:])[0]) for _ in range(3)]
        state = tuple([v.value for v in vs] for vs in (
            lm.trainable_variables, lm.non_trainable_variables, lm.optimizer.variables,
            lm.metrics_variables))
        step = jax.jit(lm.train_step).lower(state, (x, ids[:, 1:], None)).compile()
        out[name] = {"losses": losses, "temp": step.memory_analysis().temp_size_in_bytes,
                     "lora": [np.asarray(v.value).tolist() for v in lm.trainable_variables[:2]]}
    diff = max(float(np.max(np.abs(np.array(a) - np.array(b))))
               for a, b in zip(out["stored"]["lora"], out["remat"]["lora"]))
    print("RESULT" + json.dumps({"stored": out["stored"]["losses"], "remat": out["remat"]["losses"],
          "temp_stored": out["stored"]["temp"], "temp_remat": out["remat"]["temp"], "lora_diff": diff}))
""")


def test_remat_on_jax_trains_as_stored_activations_in_less_memory():
    """Each block saves only its input and is recomputed after its gradient arrives
    (`decoder_block.recomputed_after_gradient`): three LoRA steps on 8 layers give the
    losses and adapters of the same steps with stored activations, and XLA's buffer plan
    of the step is smaller (jax.checkpoint barely lowered it on XLA's CPU backend)."""
    out = run_script(JAX_REMAT, backend="jax")
    assert out["remat"] == pytest.approx(out["stored"], abs=1e-5)
    assert out["stored"][-1] < out["stored"][0]  # the steps train
    assert out["lora_diff"] < 1e-5
    # measured on AMD EPYC: 5.1 MB against 29.3 MB
    assert out["temp_remat"] < 0.5 * out["temp_stored"], out


@pytest.mark.trains
def test_fit_on_jax_backend_in_mixed_bfloat16_with_gradient_accumulation_and_remat():
    out = run_script(JAX_FIT, backend="jax")
    assert out["remat"] == ["list_of_layers"] * 4
    assert out["compute_dtype"] == "bfloat16" and out["variable_dtype"] == "float32"
    assert out["iterations"] == 6  # 12 batches, gradients accumulated over 2
    first, *_, last = out["loss"]
    assert last < 0.8 * first, out


@pytest.mark.trains
def test_finetune_command_validates_checkpoints_and_resumes(tmp_path, capsys):
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.cli import main

    data = tmp_path / "repeat.jsonl"
    write_lines(data, [json.dumps(e) for e in tiny_task.training_examples(80, task="repeat")])
    out = tmp_path / "tuned"
    common = ["finetune", "--data", str(data), "--out", str(out), "--lora-rank", "4",
              "--learning-rate", "1e-2", "--batch-size", "16", "--eager", "--quiet",
              "--seed", str(TRAIN_SEED)]
    assert main(common + ["--epochs", "1"]) == 0
    first = capsys.readouterr().out
    assert "epoch 1: validation loss" in first
    checkpoints = str(out) + ".checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["adapter.safetensors", "epoch-0001.safetensors"]

    assert main(common + ["--epochs", "2", "--overwrite"]) == 0
    second = capsys.readouterr().out
    assert "resuming from" in second and "epoch-0001" in second
    assert "epoch 2: validation loss" in second and "epoch 1:" not in second
    first_loss = float(first.split("epoch 1: validation loss")[1].split()[0])
    second_loss = float(second.split("epoch 2: validation loss")[1].split()[0])
    assert second_loss < first_loss
    assert "epoch-0002.safetensors" in os.listdir(checkpoints)

    model = Gemma2CausalLM.from_pretrained(out)  # a directory every subcommand accepts
    assert model.tokenizer is not None and not any("lora" in v.path for v in model.variables)
    # a changed setting does not silently resume someone else's run
    with pytest.raises(ValueError, match="other settings"):
        from gemma_keras.finetune import finetune

        finetune(tiny_task.tiny_model_dir(), data, tmp_path / "other", epochs=3, lora_rank=8,
                 checkpoint_dir=checkpoints, verbose=0)


def test_remat_on_tensorflow_recomputes_blocks_with_the_same_logits_and_gradients():
    """`remat_scope` on TensorFlow (the blocks wrap themselves in `tf.recompute_grad`): the
    same logits and gradients as without it, in a compiled step."""
    import keras
    import tensorflow as tf

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.training import remat_scope

    plain = Gemma2CausalLM.from_pretrained(TINY)
    with remat_scope(Gemma2Config.from_json_file(os.path.join(TINY, "config.json"))):
        remat = Gemma2CausalLM.from_pretrained(TINY)
    assert all(b._remat_mode is not None for b in remat.backbone.blocks)
    ids = np.random.default_rng(0).integers(3, plain.config.vocab_size, (2, 24)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}

    @tf.function
    def logits_and_grads(model):
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                ids, logits, from_logits=True))
        return logits, tape.gradient(loss, model.trainable_variables)

    expected, expected_grads = logits_and_grads(plain)
    logits, grads = logits_and_grads(remat)
    # float32: the same ops, possibly fused differently in the rewritten graph
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-4)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)
