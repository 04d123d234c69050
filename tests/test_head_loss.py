"""The chunked head loss (`gemma_keras.head_loss`): the same training step as Keras' loss on
the logits, on TensorFlow (with and without XLA) and JAX, without holding the logits."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_script

SAME_STEPS = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from gemma_keras import head_loss, tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.data import encode_records
    from gemma_keras.training import masked_accuracy, masked_lm_loss

    jit = sys.argv[1] == "1"
    head_loss.CHUNK_ELEMENTS = 5 * 286  # 5 tokens of the tiny vocabulary a chunk

    def lora_model(**compile_kwargs):
        model = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir())
        keras.utils.set_random_seed(0)  # the same random lora_a in both models
        model.enable_lora(2)
        # SGD: the update is proportional to the gradient (Adam's sign-like step is not)
        model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=jit, **compile_kwargs)
        return model

    chunked = lora_model()
    reference = lora_model(loss=masked_lm_loss(), weighted_metrics=[masked_accuracy()])
    data = encode_records(tiny_task.training_examples(8, task="repeat"), chunked.tokenizer, 32)
    x = {"token_ids": data.token_ids, "padding_mask": data.padding_mask}
    args = (x, data.labels, data.sample_weight)
    logs = [[m.train_on_batch(*args, return_dict=True) for m in (chunked, reference)]
            for _ in range(3)]
    diffs = [float(np.abs(a.numpy() - b.numpy()).max())
             for a, b in zip(chunked.trainable_variables, reference.trainable_variables)]
    scale = max(float(np.abs(v.numpy()).max()) for v in reference.trainable_variables)
    print("RESULT" + json.dumps({
        "applies": [head_loss.applies(chunked), head_loss.applies(reference)],
        "training_output": type(chunked(x, training=True)).__name__,
        "tokens": int(data.token_ids.size), "weighted": float(data.sample_weight.sum()),
        "logs": logs, "max_weight_diff": max(diffs), "weight_scale": scale}))
""")


@pytest.mark.parametrize("backend, jit", [("tensorflow", "0"), ("tensorflow", "1"),
                                          ("jax", "1")])
def test_chunked_head_loss_trains_as_keras_loss_on_the_logits(backend, jit):
    """Three SGD steps of LoRA on the bundled model (a task it was not trained on), the chunked loss (5-token chunks, the
    last one padded) against Keras' masked cross-entropy on the full logits: the same loss,
    accuracy and weights."""
    out = run_script(SAME_STEPS, jit, backend=backend)
    assert out["applies"] == [True, False]
    assert out["training_output"] == "dict"  # hidden states, not logits
    assert out["tokens"] % 5 != 0
    one_token = 1.0 / out["weighted"]
    for chunked, reference in out["logs"]:
        # a log-sum-exp of logits up to the soft-cap 30 rounds to about 30 * 2**-24 a token
        assert chunked["loss"] == pytest.approx(reference["loss"], abs=2e-5)
        # logits computed 5 rows at a time round differently: a near-tie may flip one token
        assert abs(chunked["accuracy"] - reference["accuracy"]) <= one_token + 1e-6
    assert out["logs"][-1][1]["loss"] < out["logs"][0][1]["loss"]  # the steps train
    assert out["logs"][0][1]["accuracy"] > 0.25  # some tokens right: the accuracy is compared
    assert out["max_weight_diff"] <= 1e-5 * out["weight_scale"], out


STEP_PEAK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from gemma_keras import head_loss
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.training import masked_accuracy, masked_lm_loss

    head_loss.CHUNK_ELEMENTS = 2**20  # 8 tokens of 128000 a chunk: 4 MiB of logits
    config = Gemma2Config(vocab_size=128000, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=32, query_pre_attn_scalar=32, layer_types=None)
    model = Gemma2CausalLM(config)
    model.enable_lora(2)
    keras_loss = dict(loss=masked_lm_loss(), weighted_metrics=[masked_accuracy()])
    model.compile(jit_compile=False, **(keras_loss if sys.argv[1] == "keras" else {}))
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 256)).astype("int32")
    args = ({"token_ids": ids, "padding_mask": np.ones_like(ids)}, ids,
            np.ones(ids.shape, "float32"))
    model.train_on_batch(*args)  # traced and warm

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                    if l.startswith(key + ":"))

    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    model.train_on_batch(*args)
    print("RESULT" + json.dumps({"step_peak": status("VmHWM") - before}))
""")


def test_chunked_head_loss_does_not_hold_the_logits():
    """The resident peak of a training step over its start, vocabulary 128000 and 256 tokens
    (the logits: 125 MiB in float32): Keras' loss holds several copies of the logits, the
    chunked loss a few 4 MiB chunks."""
    logits_bytes = 256 * 128000 * 4
    # oneDNN's allocator keeps the first step's buffers as a pool, so a later step's peak
    # shows nothing (a test running the `gemma-keras` command in this process turns oneDNN
    # on for its children); TensorFlow's own allocator returns large buffers when freed.
    eigen = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    keras_peak = run_script(STEP_PEAK, "keras", env=eigen)["step_peak"]
    chunked_peak = run_script(STEP_PEAK, "chunked", env=eigen)["step_peak"]
    assert keras_peak > 2 * logits_bytes, keras_peak  # the measure sees the logits
    assert chunked_peak < logits_bytes / 2, (chunked_peak, keras_peak)
