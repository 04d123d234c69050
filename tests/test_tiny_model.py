"""The bundled tiny model: HF layout, size, parity with transformers, and its task accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gemma_keras import tiny_task

TINY = tiny_task.tiny_model_dir()


@pytest.fixture(scope="module")
def tiny_lm():
    from gemma_keras.causal_lm import Gemma2CausalLM

    return Gemma2CausalLM.from_pretrained(TINY)


def test_asset_is_a_small_hf_checkpoint():
    for name in ("config.json", "model.safetensors", "tokenizer.model", "eval.jsonl"):
        assert os.path.isfile(os.path.join(TINY, name)), name
    size = sum(os.path.getsize(os.path.join(TINY, f)) for f in os.listdir(TINY))
    assert size <= 15 * 2**20
    from gemma_keras.config import Gemma2Config

    config = Gemma2Config.from_json_file(os.path.join(TINY, "config.json"))
    assert 64 <= config.hidden_size <= 256 and config.num_hidden_layers <= 6


def test_eval_file_is_the_held_out_set_and_unseen_in_training():
    stored = tiny_task.eval_examples()
    assert stored == tiny_task.held_out_examples() and len(stored) == 200
    training = {e["prompt"] for e in tiny_task.training_examples(5000)}
    assert not training & {e["prompt"] for e in stored}


def test_greedy_exact_match_on_held_out_prompts(tiny_lm):
    accuracy = tiny_task.exact_match_accuracy(
        lambda prompts: tiny_task.keras_answers(tiny_lm, prompts), tiny_task.eval_examples())
    assert accuracy >= 0.95, accuracy


def test_teacher_forced_score_agrees_with_generation(tiny_lm):
    from gemma_keras.data import encode_records

    examples = tiny_task.eval_examples()[:50]
    data = encode_records(examples, tiny_lm.tokenizer)
    forced = tiny_task.teacher_forced_exact_match(tiny_lm, data)
    generated = tiny_task.exact_match_accuracy(
        lambda prompts: tiny_task.keras_answers(tiny_lm, prompts), examples)
    assert forced == pytest.approx(generated, abs=0.02)


def test_logits_match_transformers(tiny_lm):
    import torch
    from transformers import Gemma2ForCausalLM

    hf = Gemma2ForCausalLM.from_pretrained(TINY, attn_implementation="eager",
                                           torch_dtype=torch.float32).eval()
    prompt = tiny_task.chat_prompts(tiny_lm.tokenizer, ["reverse: cat dog sun moon star"])[0]
    ids = np.array([tiny_lm.tokenizer.encode(prompt + "star moon sun dog cat")], np.int32)
    assert ids.shape[1] > tiny_lm.config.sliding_window
    mask = np.ones_like(ids)
    ours = np.asarray(tiny_lm({"token_ids": ids, "padding_mask": mask}))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_reverse_answers_read_well(tiny_lm):
    answers = tiny_task.keras_answers(tiny_lm, ["reverse: red fish blue fish"])
    assert answers == ["fish blue fish red"]


def test_demo_learns_the_new_task_and_saves_a_loadable_model(tmp_path):
    """`gemma-keras demo` without its export part (the exports have their own tests)."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.demo import run_demo

    lines = []
    result = run_demo(tmp_path, exports=False, echo=lines.append)
    assert result["before"] <= 0.1 and result["after"] >= 0.9, result
    assert any("before ->" in line for line in lines)
    model = Gemma2CausalLM.from_pretrained(tmp_path / "tiny-repeat")
    assert tiny_task.keras_answers(model, ["repeat: cat dog sun"]) == ["cat dog sun"]
