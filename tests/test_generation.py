"""Cached generation against transformers' greedy `generate` and the model's full forward."""

import numpy as np
import pytest
import torch

from conftest import make_hf_model, save_hf_checkpoint_dir
from gemma_keras.converters import load_hf_checkpoint
from gemma_keras.generation import PROMPT_BUCKET, get_generator
from gemma_keras.samplers import (GreedySampler, TemperatureSampler, TopKSampler, TopPSampler,
                                  get_sampler)

# Prompts of different lengths, all within one prompt bucket (one compiled prefill).
PROMPTS = [[2, 5, 9, 33, 40, 12, 7], [2, 70, 80], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def hf_varied():
    """The tiny random model with its post-norms scaled up, so that greedy decoding wanders
    over the vocabulary instead of repeating the last token (a test that can fail)."""
    model = make_hf_model(seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                param.mul_(10)
    return model


@pytest.fixture(scope="module")
def lm(hf_varied, tmp_path_factory, tiny_tokenizer):
    model = load_hf_checkpoint(save_hf_checkpoint_dir(hf_varied, tmp_path_factory.mktemp("g")))
    model.tokenizer = tiny_tokenizer
    return model


def hf_greedy(hf, prompts, max_new_tokens, eos=None):
    """transformers' greedy generate on a left-padded batch; new tokens only, cut after eos."""
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=eos, pad_token_id=0,
                      min_new_tokens=max_new_tokens if eos is None else 0)
    rows = out[:, length:].tolist()
    return [r[:r.index(eos)] if eos in r else r for r in rows]


def test_greedy_32_tokens_identical_to_transformers(lm, hf_varied):
    ours = lm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=())
    ref = hf_greedy(hf_varied, PROMPTS, 32)
    assert [len(set(r)) > 8 for r in ref] == [True] * 3  # the reference is not degenerate
    assert ours == ref


def test_per_sequence_stop_matches_transformers(lm, hf_varied):
    free = hf_greedy(hf_varied, PROMPTS, 32)
    stop = free[0][3]  # row 0 stops early; the other rows stop later or never
    ref = hf_greedy(hf_varied, PROMPTS, 32, eos=stop)
    ours = lm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=[stop])
    assert ours == ref
    assert len(ours[0]) < 4 and max(len(r) for r in ours) > 10


def test_cached_decode_logits_match_full_forward(lm, hf_varied):
    """Prefill two left-padded prompts (7 and 3 tokens), then feed their continuations one
    token a step: every step's logits equal the full forward pass (Keras and transformers)."""
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(3, 160, 24).tolist()] for _ in range(2)]
    prompt_lengths, steps = [7, 3], 12
    slots = PROMPT_BUCKET
    start = np.array([slots - n for n in prompt_lengths], np.int32)
    prompt = np.zeros((2, slots), np.int32)
    for b, n in enumerate(prompt_lengths):
        prompt[b, start[b]:] = rows[b][:n]

    gen = get_generator(lm)
    logits, cache = gen.prefill(prompt, start, 64)
    cached = [logits]
    for t in range(steps):
        token = [[rows[b][n + t]] for b, n in enumerate(prompt_lengths)]
        logits, cache = gen.step(np.array(token), cache, slots + t, start)
        cached.append(logits)
    cached = np.stack(cached, axis=1)  # [2, steps + 1, vocab]

    for b, n in enumerate(prompt_lengths):
        row = np.array([rows[b]])
        full = np.asarray(lm({"token_ids": row, "padding_mask": np.ones_like(row)}))[0]
        with torch.no_grad():
            ref = hf_varied(input_ids=torch.tensor(row)).logits[0].numpy()
        wanted = slice(n - 1, n + steps)  # predictions after tokens n-1 .. n-1+steps
        np.testing.assert_allclose(cached[b], full[wanted], atol=1e-4, rtol=0)
        np.testing.assert_allclose(cached[b], ref[wanted], atol=1e-4, rtol=0)


def test_step_compiled_once_per_shape(lm):
    gen = get_generator(lm)
    lm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=())
    before = dict(gen.trace_counts)
    other = [[2, 3, 4, 5], [2, 9], [2, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]]  # same buckets
    lm.generate(other, max_new_tokens=30, stop_token_ids=())
    assert gen.trace_counts == before
    assert all(n == 1 for n in gen.trace_counts.values()), gen.trace_counts
