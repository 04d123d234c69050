"""The bundled tiny model: HF layout, size, parity with transformers, and its task accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import TRAIN_SEED
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


# Answers of the bundled model that tests elsewhere compare as exact strings (the TFLite, CLI
# and chat tests). They hold on every CPU only if no step is near a tie: checked here.
KNOWN_ANSWERS = [
    (["reverse: red fish blue fish"], "fish blue fish red"),
    (["reverse: cat dog sun"], "sun dog cat"),
    (["reverse: cat dog sun", "sun dog cat", "reverse: red blue"], "blue red"),
    (["reverse: one two six ten"], "ten six two one"),
]
# float32 logits of this model differ between CPUs (AVX2, AVX-512, oneDNN on or off, thread
# counts) by about 1e-5; a step whose best token leads by 1 nat cannot change.
SAFE_MARGIN = 1.0


@pytest.mark.parametrize("turns, answer", KNOWN_ANSWERS)
def test_known_answers_are_far_from_ties(tiny_lm, turns, answer):
    """Greedy decoding gives `answer` then <end_of_turn>, each token ahead of the runner-up
    by at least SAFE_MARGIN (teacher-forced logits of the same ids)."""
    tokenizer = tiny_lm.tokenizer
    messages = [{"role": "user" if i % 2 == 0 else "model", "content": text}
                for i, text in enumerate(turns)]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    new = tiny_lm.generate([ids], max_new_tokens=8)[0] + [tiny_lm.config.end_of_turn_id]
    assert tokenizer.decode(new[:-1]) == answer
    full = np.array([ids + new], np.int32)
    logits = np.asarray(tiny_lm({"token_ids": full, "padding_mask": np.ones_like(full)}))[0]
    for position, token in enumerate(new, start=len(ids) - 1):
        row = logits[position]
        margin = row[token] - np.delete(row, token).max()
        assert margin >= SAFE_MARGIN, (answer, position, margin)


@pytest.mark.trains
def test_demo_learns_the_new_task_and_saves_a_loadable_model(tmp_path):
    """`gemma-keras demo` without its export part (the exports have their own tests)."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras import demo
    from gemma_keras.demo import run_demo

    lines = []
    result = run_demo(tmp_path, exports=False, echo=lines.append, seed=TRAIN_SEED)
    # The demo reaches 95-100% under every perturbation measured (benchmarks/README.md);
    # the margin below that is for CPUs not measured yet.
    assert result["before"] <= 0.1 and result["after"] >= 0.9, result
    assert any("before ->" in line for line in lines)
    # The saved model is the one that was scored: the same accuracy on the same prompts.
    model = Gemma2CausalLM.from_pretrained(tmp_path / "tiny-repeat")
    shown = demo.NEW_TASK_PROMPTS + demo.DEMO_PROMPTS[:1]  # the batch the demo scored
    _, reloaded = demo._answer_and_score(model, shown, tiny_task.held_out_examples("repeat", 100))
    assert reloaded == result["after"]
