"""GemmaTFLite on the bundled tiny model: no TensorFlow or Keras, chunked prefill, refusals,
text/stream/chat against Keras, and task accuracy of the quantized exports.

The tiny model (`gemma_keras/assets/tiny`, trained on "reverse: <words>") is exported once
in float32, dynamic_int8 and int4_block32 with prefill lengths 4 and 8 and a 62-slot cache,
so that its chat prompts (about 20 tokens) are prefilled in several chunks.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gemma_keras import tiny_task

TINY = tiny_task.tiny_model_dir()
CACHE_LEN = 62
PREFILL_LENS = (4, 8)
VARIANTS = ("none", "dynamic_int8", "int4_block32", "int4_channel")


@pytest.fixture(scope="module")
def tiny_lm():
    from gemma_keras.causal_lm import Gemma2CausalLM

    return Gemma2CausalLM.from_pretrained(TINY)


@pytest.fixture(scope="module")
def tiny_exports(tiny_lm, tmp_path_factory):
    from gemma_keras.tflite.export import export_tflite_variants

    out = tmp_path_factory.mktemp("tiny_tflite")
    return export_tflite_variants(tiny_lm, {q: out / f"tiny_{q}.tflite" for q in VARIANTS},
                                  kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS,
                                  progress=False)


@pytest.fixture(scope="module")
def runtime(tiny_exports):
    from gemma_keras.tflite import GemmaTFLite

    return GemmaTFLite(tiny_exports["none"], f"{TINY}/tokenizer.model")


def chat(text):
    return [{"role": "user", "content": text}]


def test_runtime_imports_neither_tensorflow_nor_keras(tiny_exports):
    code = f"""
import sys
from gemma_keras.tflite import GemmaTFLite
lm = GemmaTFLite({str(tiny_exports['int4_block32'])!r}, {TINY + '/tokenizer.model'!r})
pieces = list(lm.stream("reverse: cat dog", max_new_tokens=4))
reply = lm.chat([{{"role": "user", "content": "reverse: sun moon"}}], max_new_tokens=4)
assert isinstance(reply, str) and pieces, (reply, pieces)
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "keras_hub"))
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout, result.stdout


CHECK_IMPORTS_AT_EXIT = """
import atexit, sys

def report():
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "keras_hub"))
    print("LOADED", heavy)

atexit.register(report)
sys.argv = ["gemma-keras", *sys.argv[1:]]
from gemma_keras.cli import run
run()
"""


@pytest.mark.parametrize("command, stdin, expected", [
    (["generate", "--chat", "reverse: red fish blue fish"], None, ["fish blue fish red"]),
    (["chat"], "reverse: cat dog sun\nreverse: red blue\n", ["sun dog cat", "blue red"]),
])
def test_cli_with_tflite_imports_neither_tensorflow_nor_keras(tiny_exports, command, stdin,
                                                               expected):
    """`gemma-keras generate --tflite` and `gemma-keras chat --tflite` (the console command,
    in a fresh process) answer without importing TensorFlow or Keras (checked at exit)."""
    args = [*command, "--tflite", str(tiny_exports["none"]), "--tokenizer",
            f"{TINY}/tokenizer.model", "--max-new-tokens", "8"]
    result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS_AT_EXIT, *args], input=stdin,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [*expected, "LOADED []"]


def test_chunked_prefill_matches_keras(runtime, tiny_lm):
    """A prompt longer than the largest prefill length (8) goes in as 8 + 8 + 8 + 4 (3
    tokens and a pad), then its last token through decode; the logits match Keras."""
    tok = tiny_lm.tokenizer
    text = tiny_task.chat_prompts(tok, ["reverse: cat dog sun moon star tree"])[0]
    ids = tok.encode(text + "tree star moon")
    assert len(ids) == 28
    assert runtime._prefill_plan(0, len(ids) - 1) == [(8, 8), (8, 8), (8, 8), (4, 3)]
    reference = np.asarray(tiny_lm({"token_ids": np.array([ids]),
                                    "padding_mask": np.ones((1, len(ids)))}))[0, -1]
    np.testing.assert_allclose(runtime.start(ids), reference, atol=1e-4, rtol=0)


def test_prefill_near_the_end_of_the_cache_never_writes_past_it(runtime, tiny_lm):
    """62 prompt tokens in a 62-slot cache: after 7 chunks of 8, a padded 8-chunk would run
    past the cache (DYNAMIC_UPDATE_SLICE would then shift it), so the rest goes through
    prefill_4 and decode."""
    rng = np.random.default_rng(0)
    ids = [2] + rng.integers(3, tiny_lm.config.vocab_size, 61).tolist()
    assert runtime._prefill_plan(0, len(ids) - 1) == [(8, 8)] * 7 + [(4, 4), (1, 1)]
    reference = np.asarray(tiny_lm({"token_ids": np.array([ids]),
                                    "padding_mask": np.ones((1, len(ids)))}))[0, -1]
    np.testing.assert_allclose(runtime.start(ids), reference, atol=1e-4, rtol=0)


def test_prompt_too_long_for_the_cache_is_refused(runtime):
    ids = [2] + [10] * 57
    with pytest.raises(ValueError, match=r"58 tokens; with max_new_tokens=8 that exceeds the "
                                         r"limit of 62 tokens .*tiny_none.tflite was exported with a cache of 62"):
        runtime.generate(ids, max_new_tokens=8)
    assert runtime.generate(ids, max_new_tokens=8, stop_token_ids=(), truncate=True) == \
        runtime.generate([2] + ids[-53:], max_new_tokens=8, stop_token_ids=())
    with pytest.raises(ValueError, match="63 tokens but the model's cache holds 62"):
        runtime.start([2] + [10] * 62)
    assert len(runtime.generate(ids, max_new_tokens=4, stop_token_ids=())) == 4  # 62 fit


def test_closed_runtime_refuses_to_run(tiny_exports):
    from gemma_keras.tflite import GemmaTFLite

    with GemmaTFLite(tiny_exports["dynamic_int8"], f"{TINY}/tokenizer.model") as lm:
        first = lm.start([2, 17, 42])
    assert np.all(np.isfinite(first))
    lm.close()  # a second close is a no-op
    with pytest.raises(ValueError, match="is closed"):
        lm.start([2, 17, 42])


def test_caches_update_in_place_and_a_new_prompt_forgets_the_last(runtime, tiny_exports):
    """The caches are one buffer each, updated in place and not cleared between prompts: a
    short prompt after a long one gives the logits of a fresh runtime (the slots the long
    prompt left are masked)."""
    from gemma_keras.tflite import GemmaTFLite

    rng = np.random.default_rng(1)
    long_ids = [2] + rng.integers(3, runtime.vocab_size, 40).tolist()
    short_ids = [2, 17, 42, 9, 5, 61]
    runtime.start(long_ids)
    for token in (7, 8, 9):
        runtime.step(token)
    fresh = GemmaTFLite(tiny_exports["none"], weight_cache=False)
    np.testing.assert_array_equal(runtime.start(short_ids), fresh.start(short_ids))
    np.testing.assert_array_equal(runtime.step(11), fresh.step(11))


def test_xnnpack_weight_cache_file(tiny_exports, tmp_path):
    """By default the packed weights go to a file beside the model, named after its size and
    mtime: reused by the next load, replaced (the stale one deleted) when the model changes;
    weight_cache=False writes none. Same logits either way."""
    import os

    from gemma_keras.tflite import GemmaTFLite

    model = tmp_path / "m.tflite"
    model.write_bytes(tiny_exports["dynamic_int8"].read_bytes())
    ids = [2, 17, 42, 9, 5, 61]
    no_file = GemmaTFLite(model, weight_cache=False)
    assert no_file.weight_cache_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite"]
    expected = no_file.start(ids)

    first = GemmaTFLite(model)
    cache = first.weight_cache_path
    st = model.stat()
    assert cache == f"{model}.{st.st_size}-{st.st_mtime_ns}.xnnpack_cache"
    assert os.path.getsize(cache) > 0.5 * st.st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tflite", os.path.basename(cache)]
    np.testing.assert_array_equal(first.start(ids), expected)
    written = os.stat(cache).st_mtime_ns
    again = GemmaTFLite(model)  # loads the file, does not rewrite it
    assert again.weight_cache_path == cache and os.stat(cache).st_mtime_ns == written
    np.testing.assert_array_equal(again.start(ids), expected)

    model.write_bytes(tiny_exports["int4_block32"].read_bytes())  # re-exported in place
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = GemmaTFLite(model)
    assert changed.weight_cache_path != cache and not os.path.exists(cache)
    np.testing.assert_array_equal(
        changed.start(ids), GemmaTFLite(model, weight_cache=False).start(ids))
    explicit = tmp_path / "elsewhere.bin"
    GemmaTFLite(model, weight_cache=explicit)
    assert explicit.is_file()


def test_weight_cache_of_a_read_only_model_goes_to_the_user_cache(tiny_exports, tmp_path,
                                                                  monkeypatch):
    import os

    from gemma_keras.tflite import GemmaTFLite

    folder = tmp_path / "read_only"
    folder.mkdir()
    model = folder / "m.tflite"
    model.write_bytes(tiny_exports["dynamic_int8"].read_bytes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: (
        False if os.path.abspath(p) == str(folder) else real_access(p, mode)))
    lm = GemmaTFLite(model)
    assert os.path.dirname(lm.weight_cache_path) == str(tmp_path / "xdg" / "gemma_keras")
    assert os.path.isfile(lm.weight_cache_path)
    assert sorted(p.name for p in folder.iterdir()) == ["m.tflite"]


def test_text_stream_and_chat_agree_with_keras(runtime, tiny_lm):
    messages = chat("reverse: red fish blue fish")
    prompt = tiny_lm.tokenizer.apply_chat_template(messages)
    expected = tiny_lm.generate(prompt, max_new_tokens=8)
    assert expected == "fish blue fish red"
    assert runtime.chat(messages, max_new_tokens=8) == expected
    assert "".join(runtime.stream(prompt, max_new_tokens=8)) == expected
    assert runtime.generate(prompt, max_new_tokens=8) == expected


# ------------------------------------------------- one seed, the same tokens everywhere
# A prompt outside the chat format the tiny model was trained on, at temperature 2: its
# next-token distributions are spread, so every sampler's draws differ from greedy.
SAMPLINGS = {
    "greedy": dict(sampler="greedy"),
    "temperature": dict(sampler="temperature", temperature=2.0),
    "top_k": dict(sampler="top_k", top_k=3, temperature=2.0),
    "top_p": dict(sampler="top_p", top_p=0.4, temperature=2.0),
    "top_k_top_p": dict(sampler="top_k", top_k=4, top_p=0.7, temperature=2.0),
}
SAMPLED_PROMPT = "reverse: one two six ten red"
SAMPLE_SEED, SAMPLE_STEPS = 11, 10
LOGIT_TOLERANCE = 1e-4  # how far the runtimes' float32 logits may differ (docs/testing.md)


@pytest.fixture(scope="module")
def tiny_saved_model(tiny_lm, tmp_path_factory):
    """The bundled tiny model as a SavedModel, loaded in this process."""
    import tensorflow as tf

    from gemma_keras.saved_model import export_saved_model

    path = export_saved_model(tiny_lm, tmp_path_factory.mktemp("tiny_saved_model"),
                              max_length=CACHE_LEN, max_new_tokens=SAMPLE_STEPS)
    return tf.saved_model.load(str(path)).signatures["serving_default"]


def _saved_model_ids(serving_default, prompt, settings):
    import tensorflow as tf

    out = serving_default(
        prompts=tf.constant([prompt]), max_new_tokens=tf.constant(SAMPLE_STEPS),
        temperature=tf.constant(settings.get("temperature", 1.0) if settings["sampler"] !=
                                "greedy" else 0.0),
        top_k=tf.constant(settings.get("top_k", 0)), top_p=tf.constant(settings.get("top_p", 1.0)),
        seed=tf.constant(SAMPLE_SEED, tf.int64))
    row = out["token_ids"].numpy()[0].tolist()
    cut = next((i for i, t in enumerate(row) if t in (1, 107)), len(row))
    return row[:cut]


def _assert_no_near_tie(logits, sampler, step):
    """The draw from `logits` cannot change when every logit moves by LOGIT_TOLERANCE: the
    winner's margin, the top-k cut and the top-p cut all hold with room to spare."""
    from gemma_keras import samplers

    d = LOGIT_TOLERANCE
    if sampler.temperature == 0:
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 2 * d, f"near-tie at step {step}"
        return
    x = logits.astype(np.float64) / sampler.temperature
    ranked = np.sort(x)[::-1]
    if sampler.top_k:
        assert ranked[sampler.top_k - 1] - ranked[sampler.top_k] > 2 * d / sampler.temperature
    kept = samplers.kept_tokens(x[None], sampler.top_k, sampler.top_p)[0]
    if sampler.top_p < 1:
        weights = np.exp(ranked[:sampler.top_k or None] - ranked[0])
        share = (np.cumsum(weights) - weights) / weights.sum()  # mass before each rank
        assert np.min(np.abs(share - sampler.top_p)) > 10 * d / sampler.temperature
    scores = np.sort(np.where(kept, x + samplers.gumbel([SAMPLE_SEED], step, len(x))[0],
                              -np.inf))
    assert scores[-1] - scores[-2] > 2 * d / sampler.temperature, f"near-tie at step {step}"


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_one_seed_gives_the_same_tokens_in_every_runtime(name, runtime, tiny_lm,
                                                          tiny_saved_model):
    """Keras `generate`, the float32 .tflite file and the SavedModel draw the same tokens for
    one seed and one sampling setting. The draws along the path are checked to be no
    near-ties (the runtimes' logits differ by up to ~1e-5, kernels and CPU apart)."""
    from gemma_keras.samplers import get_sampler

    settings = SAMPLINGS[name]
    prompt_ids = tiny_lm.tokenizer.encode(SAMPLED_PROMPT)
    kwargs = dict(max_new_tokens=SAMPLE_STEPS, seed=SAMPLE_SEED, **settings)
    keras_ids = tiny_lm.generate(prompt_ids, **kwargs)
    path = np.array([prompt_ids + keras_ids])
    logits = np.asarray(tiny_lm({"token_ids": path, "padding_mask": np.ones_like(path)}))[0]
    sampler = get_sampler(**settings)
    for step in range(len(keras_ids)):
        _assert_no_near_tie(logits[len(prompt_ids) - 1 + step], sampler, step)

    assert runtime.generate(prompt_ids, **kwargs) == keras_ids
    assert _saved_model_ids(tiny_saved_model, SAMPLED_PROMPT, settings) == keras_ids
    if name != "greedy":  # the setting samples: not the greedy answer
        greedy = tiny_lm.generate(prompt_ids, max_new_tokens=SAMPLE_STEPS)
        assert keras_ids != greedy


def test_bad_inputs_get_clear_errors(tiny_exports, tmp_path):
    from gemma_keras.tflite import GemmaTFLite

    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        GemmaTFLite(tmp_path / "missing.tflite")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(ValueError, match="garbage.tflite"):
        GemmaTFLite(garbage)
    bare = tmp_path / "bare.tflite"  # no tokenizer.model beside it
    bare.write_bytes(tiny_exports["none"].read_bytes())
    lm = GemmaTFLite(bare)
    with pytest.raises(ValueError, match="need a tokenizer"):
        lm.generate("reverse: cat dog")
    with pytest.raises(ValueError, match=r"token ids outside \[0, 286\): \[999\]"):
        lm.generate([2, 999])
    with pytest.raises(ValueError, match="at most 1 at a time"):
        lm.generate([[2, 5], [2, 6]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate([2, 5], max_new_tokens=0)


def test_quantized_exports_keep_task_accuracy(tiny_exports, tiny_lm):
    """dynamic_int8 within 2 points of the Keras float model, int4_block32 and int4_channel
    within 5, on the 200 held-out examples."""
    from gemma_keras.tflite import GemmaTFLite

    examples = tiny_task.eval_examples()
    keras_accuracy = tiny_task.exact_match_accuracy(
        lambda prompts: tiny_task.keras_answers(tiny_lm, prompts), examples)
    accuracies = {}
    for quantize in VARIANTS:
        lm = GemmaTFLite(tiny_exports[quantize], f"{TINY}/tokenizer.model")
        accuracies[quantize] = tiny_task.exact_match_accuracy(
            lambda prompts: [lm.chat(chat(p), max_new_tokens=tiny_task.MAX_NEW_TOKENS)
                             for p in prompts], examples)
    print(f"\nKeras float32: accuracy {keras_accuracy:.3f}")
    for quantize in VARIANTS:
        print(f"{quantize:>14}: accuracy {accuracies[quantize]:.3f}, "
              f"file {tiny_exports[quantize].stat().st_size:,} bytes")
    # The float32 file computes what Keras does with other kernels: equal up to a near-tie
    # (one of 200 answers) whose rounding differs between the two.
    assert abs(accuracies["none"] - keras_accuracy) <= 1 / len(examples)
    assert accuracies["dynamic_int8"] >= keras_accuracy - 0.02
    assert accuracies["int4_block32"] >= keras_accuracy - 0.05
    assert accuracies["int4_channel"] >= keras_accuracy - 0.05


def test_cli_export_then_generate(tmp_path, capsys):
    from gemma_keras.cli import main

    out = tmp_path / "tiny_int4.tflite"
    assert main(["export-tflite", "--model", TINY, "--out", str(out), "--quantize",
                 "int4_block32", "--kv-cache-max-len", "32", "--prefill-lens", "4,8",
                 "--quiet"]) == 0
    assert (tmp_path / "tokenizer.model").is_file()  # copied beside the file
    assert "wrote" in capsys.readouterr().out
    assert main(["export-tflite", "--model", TINY, "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "--tflite", str(out), "--chat", "reverse: red fish blue fish",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "fish blue fish red"
    # the console command prints the completion and nothing from LiteRT's logging
    result = subprocess.run([sys.executable, "-m", "gemma_keras.cli", "generate", "--tflite",
                             str(out), "--chat", "reverse: red fish blue fish",
                             "--max-new-tokens", "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "fish blue fish red"
    assert result.stderr.strip() == "", result.stderr
