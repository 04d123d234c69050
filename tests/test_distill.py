"""Distillation (`gemma_keras.distill`, on `keras.distillation`): the masked loss, a half-width
student learning the bundled task from the bundled model, and `gemma-keras distill`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_keras import tiny_task

TINY = tiny_task.tiny_model_dir()


def load_tiny():
    from gemma_keras.causal_lm import Gemma2CausalLM

    return Gemma2CausalLM.from_pretrained(TINY)


def half_width_config(teacher):
    """The tiny model's config at half its width (hidden 32, MLP 128, 2 query heads, 1 KV)."""
    from gemma_keras.config import Gemma2Config

    c = teacher.config
    return Gemma2Config.from_dict({**c.to_dict(), "hidden_size": c.hidden_size // 2,
                                   "intermediate_size": c.intermediate_size // 2,
                                   "num_attention_heads": c.num_attention_heads // 2,
                                   "num_key_value_heads": c.num_key_value_heads // 2})


def token_accuracy(model, data) -> float:
    """Next-token accuracy over the trained tokens of `data`."""
    logits = np.asarray(model.predict_on_batch({"token_ids": data.token_ids,
                                                "padding_mask": data.padding_mask}))
    hits = (logits.argmax(-1) == data.labels) * data.sample_weight
    return float(hits.sum() / data.sample_weight.sum())


def test_distillation_loss_is_the_masked_tempered_kl():
    from gemma_keras.distill import TokenLogitsDistillation

    rng = np.random.default_rng(0)
    teacher = rng.normal(0, 3, (2, 5, 11)).astype("float32")
    student = rng.normal(0, 3, (2, 5, 11)).astype("float32")
    weight = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], "float32")
    t = 2.5

    def log_softmax(x):
        x = x / t
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - x.max(-1, keepdims=True)

    kl = (np.exp(log_softmax(teacher)) * (log_softmax(teacher) - log_softmax(student))).sum(-1)
    expected = (kl * weight).sum() / weight.sum() * t * t
    loss = TokenLogitsDistillation(temperature=t).compute_loss(teacher, student,
                                                               sample_weight=weight)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # padding and prompt tokens count for nothing: changing them leaves the loss alone
    student[weight == 0] += 5.0
    again = TokenLogitsDistillation(temperature=t).compute_loss(teacher, student,
                                                                sample_weight=weight)
    np.testing.assert_allclose(float(again), expected, rtol=1e-5)


def test_mismatched_vocabularies_are_refused():
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.distill import GemmaDistiller

    teacher = load_tiny()
    config = half_width_config(teacher)
    config = type(config).from_dict({**config.to_dict(), "vocab_size": 300})
    with pytest.raises(ValueError, match="share a tokenizer.*286 ids.*300"):
        GemmaDistiller(teacher, Gemma2CausalLM(config))


@pytest.mark.trains
def test_half_width_student_learns_the_task_from_the_teacher():
    """A randomly initialised student of half the width, 64 steps of distillation on the
    bundled task: the distillation loss falls, and the student's next-token accuracy on
    held-out prompts rises far above the untrained one. (Against the same student trained on
    labels alone, see benchmarks/distill_tiny.py and docs/finetuning.md.)"""
    import keras

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.data import encode_records
    from gemma_keras.distill import GemmaDistiller
    from gemma_keras.training import adamw

    keras.utils.set_random_seed(0)
    teacher = load_tiny()
    student = Gemma2CausalLM(half_width_config(teacher))
    train = encode_records(tiny_task.training_examples(1024), teacher.tokenizer, 32)
    held = encode_records(tiny_task.held_out_examples(n=200), teacher.tokenizer, 32)
    untrained = token_accuracy(student, held)
    distiller = GemmaDistiller(teacher, student, temperature=1.0, student_loss_weight=0.5)
    distiller.compile(optimizer=adamw(student, learning_rate=3e-3), jit_compile=False)
    history = distiller.fit(train.tf_dataset(32), epochs=2, verbose=0).history
    first, last = history["distillation_loss"][0], history["distillation_loss"][-1]
    assert last < 0.8 * first, history["distillation_loss"]
    assert history["student_loss"][-1] < history["student_loss"][0]
    trained = token_accuracy(student, held)
    assert untrained < 0.1 and trained > untrained + 0.15, (untrained, trained)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_student_from_a_config_file(tmp_path):
    from gemma_keras.distill import load_student

    teacher = load_tiny()
    config = tmp_path / "student.json"
    config.write_text(json.dumps(half_width_config(teacher).to_hf_dict()))
    student = load_student(str(config), teacher)
    assert student.config.hidden_size == teacher.config.hidden_size // 2
    assert student.tokenizer is teacher.tokenizer
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a config"):
        load_student(str(tmp_path / "missing.json"), teacher)


@pytest.mark.trains
def test_distill_command_trains_lora_on_the_student(tmp_path, capsys):
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.cli import main

    teacher = load_tiny()
    data = tmp_path / "train.jsonl"
    write_jsonl(data, tiny_task.training_examples(48, task="repeat"))
    # LoRA on a student directory (here the model itself, on a task it does not know)
    assert main(["distill", "--teacher", TINY, "--student", TINY, "--data", str(data),
                 "--out", str(tmp_path / "lora"), "--lora-rank", "4", "--batch-size", "16",
                 "--learning-rate", "1e-2", "--eager", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: label loss" in out and "distillation loss" in out
    assert (tmp_path / "lora.adapter.safetensors").is_file()
    merged = Gemma2CausalLM.from_pretrained(tmp_path / "lora")
    ids = np.array([teacher.tokenizer.encode("repeat: cat dog")], np.int32)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    assert np.abs(np.asarray(merged(x)) - np.asarray(teacher(x))).max() > 1e-4
    assert main(["distill", "--teacher", TINY, "--student", str(tmp_path / "missing.json"),
                 "--data", str(data), "--out", str(tmp_path / "x")]) == 1
    assert "neither a model directory nor a config.json" in capsys.readouterr().err
