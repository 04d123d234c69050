"""Cached generation against transformers' greedy `generate` and the model's full forward."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_hf_model, save_hf_checkpoint_dir
from gemma_keras.converters import load_hf_checkpoint
from gemma_keras.conventions import PREFILL_CHUNK
from gemma_keras.generation import get_generator
from gemma_keras.samplers import (GreedySampler, TemperatureSampler, TopKSampler, TopPSampler,
                                  row_seeds)

# Prompts of different lengths; the longest takes two prefill chunks. With up to 64 new
# tokens every batch-of-3 test below shares one cache size: two compiled functions in all.
PROMPTS = [[2, 5, 9, 33, 40, 12, 7], [2, 70, 80], [2, *range(11, 50)]]


@pytest.fixture(scope="module")
def hf_varied():
    """The tiny random model with its post-norms scaled up, so that greedy decoding wanders
    over the vocabulary instead of repeating the last token (a test that can fail)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only fight the other processes
    model = make_hf_model(seed=3, num_hidden_layers=2)  # sliding + global; quick to compile
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "post_attention_layernorm" in name or "post_feedforward_layernorm" in name:
                param.mul_(20)
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def varied_checkpoint(hf_varied, tmp_path_factory):
    return save_hf_checkpoint_dir(hf_varied, tmp_path_factory.mktemp("varied"))


@pytest.fixture(scope="module")
def lm(varied_checkpoint, tiny_tokenizer):
    model = load_hf_checkpoint(varied_checkpoint)
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


JAX_SCRIPT = """
import json, sys
from gemma_keras.converters import load_hf_checkpoint
from gemma_keras.generation import get_generator
lm = load_hf_checkpoint(sys.argv[1])
out = lm.generate(json.loads(sys.argv[2]), max_new_tokens=32, stop_token_ids=())
print(json.dumps([out, list(get_generator(lm).trace_counts.values())]))
"""


def test_greedy_on_jax_identical_to_transformers(varied_checkpoint, hf_varied):
    """The same generation under jax.jit (a subprocess with KERAS_BACKEND=jax)."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, str(varied_checkpoint), json.dumps(PROMPTS)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours, traces = json.loads(result.stdout.strip().splitlines()[-1])
    assert ours == hf_greedy(hf_varied, PROMPTS, 32)
    assert traces == [1, 1]  # one prefill chunk function, one decode step


def test_per_sequence_stop_matches_transformers(lm, hf_varied):
    free = hf_greedy(hf_varied, PROMPTS, 32)
    stop = free[0][3]  # row 0 stops early; the other rows stop later or never
    ref = hf_greedy(hf_varied, PROMPTS, 32, eos=stop)
    ours = lm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=[stop])
    assert ours == ref
    assert len(ours[0]) < 4 and max(len(r) for r in ours) > 10


def test_cached_decode_logits_match_full_forward(lm, hf_varied):
    """Prefill left-padded prompts (7, 3 and 40 tokens: two chunks), then feed their
    continuations one token a step: every step's logits equal the full forward pass (Keras
    and transformers)."""
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(3, 160, 59).tolist()] for _ in range(3)]
    prompt_lengths, steps = [7, 3, 40], 12  # the shapes of PROMPTS: no new compilation
    slots = 2 * PREFILL_CHUNK
    start = np.array([slots - n for n in prompt_lengths], np.int32)
    prompt = np.zeros((3, slots), np.int32)
    for b, n in enumerate(prompt_lengths):
        prompt[b, start[b]:] = rows[b][:n]

    gen = get_generator(lm)
    logits, cache = gen.prefill(prompt, start, 128)
    cached = [logits]
    for t in range(steps):
        token = [[rows[b][n + t]] for b, n in enumerate(prompt_lengths)]
        logits, cache = gen.step(np.array(token), cache, slots + t, start)
        cached.append(logits)
    cached = np.stack(cached, axis=1)  # [3, steps + 1, vocab]

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
    other = [[2, 3, 4, 5], [2, 9], [2, *[8] * 35]]  # other lengths, same shapes
    lm.generate(other, max_new_tokens=30, stop_token_ids=())
    assert gen.trace_counts == before
    shapes = [k for k in gen.trace_counts if k[0][0] == 3]
    assert sorted(t for t, _ in shapes) == [(3, 1), (3, PREFILL_CHUNK)]  # decode and prefill
    assert all(n == 1 for n in gen.trace_counts.values()), gen.trace_counts


# ------------------------------------------------------------------- text in, text out
def test_text_generate_and_stream_agree(lm, tiny_tokenizer):
    prompt, kw = "hello the cat", dict(max_new_tokens=40, stop_token_ids=())
    ids = lm.generate(tiny_tokenizer.encode(prompt), **kw)
    text = lm.generate(prompt, **kw)
    assert isinstance(text, str) and text == tiny_tokenizer.decode(ids)
    assert lm.generate(["yes", prompt, "who is it"], **kw)[1] == text
    pieces = list(lm.stream(prompt, **kw))
    assert len(pieces) > 1 and "".join(pieces) == text
    streamed_ids = list(lm.stream(tiny_tokenizer.encode(prompt), **kw))
    assert streamed_ids == ids


def test_default_stops_are_eos_and_end_of_turn(lm):
    free = lm.generate(PROMPTS, max_new_tokens=32, stop_token_ids=())
    ours = lm.generate(PROMPTS, max_new_tokens=32)
    for row, full in zip(ours, free):
        cut = next((i for i, t in enumerate(full) if t in (1, 107)), len(full))
        assert row == full[:cut]


# --------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed(lm):
    kw = dict(max_new_tokens=24, stop_token_ids=())
    for sampler, extra in [("temperature", {"temperature": 1.5}), ("top_k", {"top_k": 20}),
                           ("top_p", {"top_p": 0.95})]:
        a = lm.generate(PROMPTS, sampler=sampler, seed=7, **extra, **kw)
        b = lm.generate(PROMPTS, sampler=sampler, seed=7, **extra, **kw)
        c = lm.generate(PROMPTS, sampler=sampler, seed=8, **extra, **kw)
        assert a == b and a != c, sampler
    greedy = lm.generate(PROMPTS, **kw)
    assert lm.generate(PROMPTS, sampler="top_k", top_k=1, seed=3, **kw) == greedy
    assert lm.generate(PROMPTS, sampler=TopPSampler(1e-6), seed=3, **kw) == greedy
    assert lm.generate(PROMPTS, sampler="temperature", temperature=0, seed=3, **kw) == greedy


def test_keras_hub_sampler_is_accepted(lm):
    import keras_hub

    kw = dict(max_new_tokens=8, stop_token_ids=())
    assert (lm.generate(PROMPTS, sampler=keras_hub.samplers.GreedySampler(), **kw)
            == lm.generate(PROMPTS, **kw))


def _frequencies(sampler, logits, n=4000):
    """How often each token is drawn in `n` rows of the same logits (row b: seed b)."""
    draws = sampler(np.repeat(logits[None], n, axis=0).astype("float32"), row_seeds(0, n), 0)
    return np.bincount(draws, minlength=len(logits)) / n


def test_samplers_draw_from_the_right_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_array_equal(GreedySampler()(logits[None], row_seeds(0, 1), 0), [0])
    np.testing.assert_allclose(_frequencies(TemperatureSampler(1.0), logits),
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)
    hot = np.exp(logits / 2) / np.exp(logits / 2).sum()
    np.testing.assert_allclose(_frequencies(TemperatureSampler(2.0), logits), hot, atol=0.03)
    np.testing.assert_allclose(_frequencies(TopKSampler(2), logits), [0.625, 0.375, 0, 0],
                               atol=0.03)
    # top_p=0.7: 0.5 < 0.7, so the token that crosses 0.7 (0.3) is kept; 0.15 and 0.05 not
    np.testing.assert_allclose(_frequencies(TopPSampler(0.7), logits), [0.625, 0.375, 0, 0],
                               atol=0.03)
    np.testing.assert_allclose(_frequencies(TopPSampler(1.0), logits),
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top-k 3 then top-p 0.6 over the renormalised three (0.5, 0.3, 0.15) / 0.95: the first
    # holds 0.526 < 0.6, so the second stays too
    np.testing.assert_allclose(_frequencies(TopKSampler(3, top_p=0.6), logits),
                               [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(_frequencies(TopKSampler(3, top_p=0.5), logits), [1, 0, 0, 0])


def test_batch_rows_draw_with_seed_plus_row(lm):
    """Row b of a batch with `seed` draws as a prompt alone with `seed + b`."""
    kw = dict(max_new_tokens=16, stop_token_ids=(), sampler="temperature", temperature=1.5)
    batch = lm.generate(PROMPTS, seed=40, **kw)
    assert [lm.generate(p, seed=40 + b, **kw) for b, p in enumerate(PROMPTS)] == batch
    assert lm.generate(PROMPTS, seed=[40, 41, 42], **kw) == batch


# ------------------------------------------------------------------------------ limits
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(sampler="temperature", temperature=-0.5), r"temperature must be a number >= 0"),
    (dict(sampler="top_k", temperature=float("nan")), r"temperature must be a number >= 0"),
    (dict(sampler="top_p", top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(sampler="top_p", top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(sampler="top_k", top_k=-1), "top_k must be a non-negative integer"),
    (dict(sampler="top_k", seed=[1, 2]), "2 seeds for 3 prompts"),
    (dict(sampler="beam"), "sampler must be one of"),
    (dict(sampler="greedy", top_p=0.5), "no effect with sampler='greedy'"),
    (dict(max_length=200), r"max_length \(200\) exceeds the limit of 128 positions \(the "
                           r"model's context"),
    (dict(max_length=20, max_new_tokens=15), "prompt 0 has 7 tokens.*limit of 20 tokens"),
    (dict(max_new_tokens=128), r"max_new_tokens \(128\) must be less than"),
])
def test_bad_arguments_are_refused(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lm.generate(PROMPTS, **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("prompts, match", [
    ("", "prompt 0 is an empty string"),
    (["hello", ""], "prompt 1 is an empty string"),
    ([[2, 5], []], "prompt 1 is empty"),
    ([], "not empty"),
    ([[2, 5], [2, 160]], r"prompt 1 has token ids outside \[0, 160\): \[160\]"),
    ([[2, -1]], r"outside \[0, 160\)"),
    ([[2, 5], "hi"], "cannot mix text and ids"),
])
def test_bad_prompts_are_refused(lm, prompts, match):
    with pytest.raises(ValueError, match=match):
        lm.generate(prompts, max_new_tokens=4)


def test_text_needs_a_tokenizer(lm):
    tokenizer, lm.tokenizer = lm.tokenizer, None
    try:
        with pytest.raises(ValueError, match="need a tokenizer"):
            lm.generate("hello", max_new_tokens=4)
    finally:
        lm.tokenizer = tokenizer


def test_truncate_keeps_bos_and_the_last_tokens(lm):
    long = [2, *range(20, 100)]  # 81 tokens; limit 100 with 40 new leaves room for 60
    kw = dict(max_new_tokens=40, stop_token_ids=())
    with pytest.raises(ValueError, match="truncate=True"):
        lm.generate([long], max_length=100, **kw)
    cut = lm.generate([long], max_length=100, truncate=True, **kw)
    assert cut == lm.generate([[2, *long[-59:]]], **kw)
