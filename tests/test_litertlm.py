"""The `.litertlm` bundle runs in Google's LiteRT-LM engine and generates what Keras does.

One tiny random Gemma 2 (the conftest config: GQA, sliding window 5, soft-caps) is exported
once with `gemma_keras.tflite.export_tflite` (float32), bundled with `write_litertlm`, and
run greedily through `litert_lm.Engine` (session sampler top_k=1). The reference is the Keras
model's own greedy `generate` on the same prompt.

The random weights are drawn so that greedy decoding does not collapse into repeating one
token (the conftest model does, which would not exercise the cache): a small embedding and
post-norm scales near 2 let the blocks, not the input token, decide the next token. The test
checks that the reference is varied and that its argmax margins are far above float32 noise.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import TINY_HF_CONFIG, save_hf_checkpoint_dir

litert_lm = pytest.importorskip("litert_lm", reason="litert-lm-api is a test dependency")

CACHE_LEN = 64
PREFILL_LENS = (8, 32)
MAX_NEW = 24
PROMPTS = (
    "the cat",                                            # shorter than the smallest prefill
    "who is the big red dog and where did it sat on the mat",  # > 8 tokens, > the window (5)
)


def make_varied_hf_model(seed=0):
    """A random tiny Gemma2ForCausalLM whose greedy output does not repeat one token."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**TINY_HF_CONFIG, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.copy_(torch.randn_like(param) * 0.05)
            elif "post_" in name and "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + 2.0)
            elif "norm" in name:
                param.copy_(torch.randn_like(param) * 0.5)
            else:
                param.copy_(torch.randn_like(param) * 0.3)
    return model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_tokenizer):
    """(Keras model with tokenizer, .tflite path, .litertlm path)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from gemma_keras.pretrained import load_hf_checkpoint
    from gemma_keras.tflite import export_tflite
    from gemma_keras.tflite.litertlm import write_litertlm

    work = tmp_path_factory.mktemp("litertlm")
    save_hf_checkpoint_dir(make_varied_hf_model(), work / "hf")
    model = load_hf_checkpoint(work / "hf", dtype="float32")
    model.tokenizer = tiny_tokenizer
    tflite_path = export_tflite(model, work / "tiny.tflite", quantize="none",
                                kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS,
                                progress=False)
    out = write_litertlm(tflite_path, tiny_tokenizer.proto_path, work / "tiny.litertlm",
                         max_num_tokens=CACHE_LEN)
    return model, tflite_path, out


@pytest.fixture(scope="module")
def engine(bundle):
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    eng = litert_lm.Engine(str(bundle[2]), backend=litert_lm.Backend.CPU(thread_count=1))
    yield eng
    eng.close()


def keras_greedy(model, ids, max_new):
    """Greedy ids from the Keras model and the smallest top-1/top-2 logit margin on the way."""
    from gemma_keras.generation import generate_ids

    out, margins = [], []
    for step_ids, _ in generate_ids(model, [ids], max_new_tokens=max_new):
        token = int(step_ids[0])
        out.append(token)
        if token in (model.config.eos_token_id, model.config.end_of_turn_id):
            break
    # Margins from a full forward pass over prompt + completion (the same logits as above).
    seq = np.array([ids + out[:-1]], np.int32)
    logits = np.asarray(model({"token_ids": seq, "padding_mask": np.ones_like(seq)}))[0]
    top2 = np.sort(logits[len(ids) - 1:], axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    return out, float(margins.min())


def engine_greedy(engine, text, max_new, apply_prompt_template=False):
    session = engine.create_session(apply_prompt_template=apply_prompt_template,
                                    sampler_config=litert_lm.SamplerConfig(top_k=1),
                                    max_output_tokens=max_new)
    try:
        session.run_prefill([text])
        return session.run_decode().texts[0]
    finally:
        session.close()


def test_bundle_metadata(bundle, engine):
    from gemma_keras.tflite.litertlm import read_litertlm

    meta, sections = read_litertlm(bundle[2])
    assert list(meta.start_token.token_ids.ids) == [2]
    assert [list(t.token_ids.ids) for t in meta.stop_tokens] == [[1], [107]]
    assert meta.max_num_tokens == CACHE_LEN
    assert meta.llm_model_type.WhichOneof("model_type") == "generic_model"
    kinds = [s[0] for s in sections]
    assert kinds == ["TFLiteModel", "SP_Tokenizer", "LlmMetadataProto"]
    assert sections[0][1]["model_type"] == "tf_lite_prefill_decode"
    assert sections[0][2] == os.path.getsize(bundle[1])  # the .tflite, byte for byte
    # The engine reads the same start and stop tokens and the same tokenizer.
    assert engine.bos_token_id == 2
    assert engine.eos_token_ids == [[1], [107]]
    tokenizer = bundle[0].tokenizer
    for text in PROMPTS:
        assert engine.tokenize(text) == tokenizer.encode(text, add_bos=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_engine_greedy_matches_keras(bundle, engine, prompt):
    model = bundle[0]
    tokenizer = model.tokenizer
    ids, margin = keras_greedy(model, tokenizer.encode(prompt), MAX_NEW)
    # A meaningful reference: varied tokens, argmax decided far above float32 noise.
    assert len(set(ids)) >= 6, ids
    assert margin > 1e-4, margin

    text = engine_greedy(engine, prompt, MAX_NEW)
    expected = tokenizer.decode(ids)
    print(f"\nprompt {prompt!r}\n  keras  {expected!r}\n  engine {text!r}")
    assert text == expected
    # Token for token: the engine's text re-encodes to the Keras ids (stop token aside).
    body = [t for t in ids if t not in (1, 107)]
    assert engine.tokenize(text) == body


def test_engine_chat_template_matches_keras(bundle, engine):
    """The conversation API formats Gemma's turns from the bundled Jinja template."""
    model = bundle[0]
    tokenizer = model.tokenizer
    messages = [{"role": "user", "content": "what is the red dog"}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    ids, _ = keras_greedy(model, prompt_ids, MAX_NEW)
    expected = tokenizer.decode(ids)

    conversation = engine.create_conversation(sampler_config=litert_lm.SamplerConfig(top_k=1))
    try:
        rendered = conversation.render_message_to_string(messages[0])
        reply = conversation.send_message(messages[0], max_output_tokens=MAX_NEW)
    finally:
        conversation.close()
    print(f"\nrendered {rendered!r}\nkeras {expected!r}\nreply {reply!r}")
    # The engine adds <bos> itself (the start token); the turn text is the Keras prompt's.
    assert engine.tokenize(rendered) == prompt_ids[1:]
    assert "".join(c.text for c in reply.contents) == expected


def test_bad_inputs_leave_no_file(bundle, tmp_path, tiny_tokenizer):
    from gemma_keras.tflite.litertlm import LiteRTLMBundleError, write_litertlm

    _, tflite_path, _ = bundle
    out = tmp_path / "x.litertlm"
    with pytest.raises(ValueError, match="max_num_tokens .* KV cache length"):
        write_litertlm(tflite_path, tiny_tokenizer.proto_path, out, max_num_tokens=CACHE_LEN + 1)
    with pytest.raises(LiteRTLMBundleError, match="not a TFLite flatbuffer"):
        write_litertlm(tiny_tokenizer.proto_path, tiny_tokenizer.proto_path, out)
    with pytest.raises(LiteRTLMBundleError, match="not a SentencePiece model"):
        write_litertlm(tflite_path, tflite_path, out)
    with pytest.raises(FileNotFoundError, match="no such"):
        write_litertlm(tmp_path / "missing.tflite", tiny_tokenizer.proto_path, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("quantize", ["int8_channel", "int4_channel"])
def test_engine_runs_a_per_channel_bundle_like_gemma_tflite(bundle, tmp_path, tiny_tokenizer,
                                                           quantize):
    """A per-channel int8 file (`gemma-keras export-tflite`'s default) or int4 file (row
    scales shared by the signatures' tensors) bundled and run by the engine gives the greedy
    text our own runtime gives on the same file."""
    from gemma_keras.tflite import GemmaTFLite, export_tflite
    from gemma_keras.tflite.litertlm import write_litertlm

    model = bundle[0]
    path = export_tflite(model, tmp_path / f"tiny_{quantize}.tflite", quantize=quantize,
                         kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS, progress=False)
    out = write_litertlm(path, tiny_tokenizer.proto_path, tmp_path / f"tiny_{quantize}.litertlm",
                         max_num_tokens=CACHE_LEN)
    ours = GemmaTFLite(path, tiny_tokenizer.proto_path, num_threads=1)
    eng = litert_lm.Engine(str(out), backend=litert_lm.Backend.CPU(thread_count=1))
    try:
        for prompt in PROMPTS:
            expected = ours.generate(prompt, max_new_tokens=MAX_NEW)
            assert len(set(tiny_tokenizer.encode(expected))) >= 6, expected
            assert engine_greedy(eng, prompt, MAX_NEW) == expected
    finally:
        eng.close()
        ours.close()
