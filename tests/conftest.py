"""Shared fixtures: tiny random Gemma 2 checkpoints (transformers) and a tiny tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# A small config on which ports break: GQA with KV heads > 1, num_heads * head_dim !=
# hidden_size, query_pre_attn_scalar != head_dim, a sliding window shorter than the test
# sequences, and soft-caps small enough to bend the random logits.
TINY_HF_CONFIG = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=5,
    attn_logit_softcapping=3.0,
    final_logit_softcapping=2.0,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def run_script(script, *args, backend="tensorflow", env=None, timeout=600):
    """Run `script` (Python source) in a fresh interpreter on Keras `backend` (JAX on the CPU)
    with `args` as its argv; fail with its stderr unless it exits 0, and return the JSON of
    its last line that starts with "RESULT"."""
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, f"the script printed no RESULT line; stdout ends: {proc.stdout[-2000:]}"
    return json.loads(lines[-1][len("RESULT"):])


def make_hf_model(seed=0, dtype="float32", **overrides):
    """A transformers Gemma2ForCausalLM with every weight (norms too) randomised."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**{**TINY_HF_CONFIG, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "norm" in name else 0.3
            param.copy_(torch.randn_like(param) * scale)
    return model.to(getattr(torch, dtype))


def save_hf_checkpoint_dir(model, directory):
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="session")
def hf_checkpoint(hf_model, tmp_path_factory):
    """A `save_pretrained` directory of the random tiny model, in float32."""
    return save_hf_checkpoint_dir(hf_model, tmp_path_factory.mktemp("hf_tiny"))


@pytest.fixture(scope="session")
def padded_batch():
    """Two sequences of length 12 and 8 (right padded), longer than the sliding window."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY_HF_CONFIG["vocab_size"], size=(2, 12)).astype("int32")
    mask = np.ones((2, 12), dtype="int32")
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Tests that train (marked `trains`) assert what holds on every CPU: accuracy with a margin, a
# loss that falls, agreement with a reference computed in the same process. `.ci/run`
# runs them a second time under perturbed numerics (oneDNN off, one thread, this seed 1) to
# show it; they seed with TRAIN_SEED.
TRAIN_SEED = int(os.environ.get("GEMMA_KERAS_TRAIN_SEED", "0"))


# ------------------------------------------------------------------ tiny tokenizer
TINY_TOKENIZER_WORDS = (
    "the a cat dog sat on mat and ran to hello world model user is was big small red blue "
    "green one two three what where who why how you i we they it this that yes no good"
).split()


def tiny_corpus(n=400, seed=0):
    """Deterministic toy sentences for training the tiny SentencePiece model."""
    rng = np.random.default_rng(seed)
    words = TINY_TOKENIZER_WORDS
    return [" ".join(words[j] for j in rng.integers(0, len(words), 9)) + ("?" if i % 4 else ".")
            for i in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A GemmaTokenizer with Gemma's special ids and TINY_HF_CONFIG's vocabulary size."""
    from gemma_keras.tokenizer import GemmaTokenizer, train_sentencepiece

    prefix = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer"
    path = train_sentencepiece(tiny_corpus(), prefix, vocab_size=TINY_HF_CONFIG["vocab_size"])
    return GemmaTokenizer(path)
