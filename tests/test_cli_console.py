"""The console command: quiet stderr by default, --verbose, and defaults derived from a model
with a short context (64 positions)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_model, save_hf_checkpoint_dir
from gemma_keras.cli import main
from gemma_keras.console_logs import NOISE

# Lines these libraries print on stderr when TensorFlow starts (seen on AMD and Intel CPUs).
NATIVE_LOG_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796126988.036316    5539 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796126993.414488    5539 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796126995.567028    5539 service.cc:153] XLA service 0x5616e50f14b0 "
    "initialized for platform Host (this does not guarantee that XLA will be used). Devices:",
    "I0000 00:00:1733059200.123456   12345 cpu_feature_guard.cc:210] This TensorFlow binary "
    "is optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    "with the appropriate compiler flags.",
    "I0000 00:00:1733059200.223456   12345 util.cc:111] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors.",
    "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
]
KEPT_LINES = [
    "gemma-keras generate: error: model directory not found: /nothere",
    "Traceback (most recent call last):",
    "/x/y.py:3: UserWarning: something this package warns about",
    "note: prefill lengths default to 8,64: the cache has 64 slots",
    "export-tflite:  50%|#####     | 2/4 [00:10<00:09,  4.70s/step]",
    "F0000 00:00:1796126995.567028    5539 check.cc:1] Check failed: a crash is kept",
]


def console(*argv, env=None, timeout=300):
    """Run the `gemma-keras` console entry point (gemma_keras.cli:run) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "gemma_keras.cli", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_noise_pattern_drops_native_logs_and_keeps_everything_else():
    for line in NATIVE_LOG_LINES:
        assert NOISE.match(line.encode()), line
    for line in KEPT_LINES:
        assert not NOISE.match(line.encode()), line


def test_console_command_is_quiet_unless_verbose():
    quiet = console("generate", "--chat", "reverse: red fish blue fish")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "fish blue fish red"
    assert quiet.stderr.strip() == "", quiet.stderr  # TensorFlow was imported and ran
    for how in (["--verbose"], []):
        env = {} if how else {"GEMMA_KERAS_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
        loud = console(*how, "generate", "--chat", "reverse: red fish blue fish", env=env)
        assert loud.returncode == 0 and loud.stdout == quiet.stdout
        assert any(NOISE.match(line.encode()) for line in loud.stderr.splitlines()), loud.stderr
    failed = console("generate", "--model", "/nothere", "hi")
    assert failed.returncode == 1
    assert failed.stderr.strip() == ("gemma-keras generate: error: model directory not "
                                     "found: /nothere")


def test_console_command_turns_onednn_on_unless_told_not_to(monkeypatch):
    """TensorFlow's oneDNN ops (which it leaves off on AVX2-only CPUs) are on in the command's
    process, and an explicit TF_ENABLE_ONEDNN_OPTS=0 is respected."""
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    verbose = {"GEMMA_KERAS_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    message = "oneDNN custom operations are on"
    for value, expected in ((None, True), ("0", False)):
        env = {**verbose, **({"TF_ENABLE_ONEDNN_OPTS": value} if value else {})}
        run = console("generate", "--chat", "reverse: red fish", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert (message in run.stderr) == expected, (value, run.stderr[-2000:])


@pytest.fixture(scope="module")
def short_context_model(tiny_tokenizer, tmp_path_factory):
    """A random HF checkpoint whose context is 64 positions, with a tokenizer."""
    directory = tmp_path_factory.mktemp("short_context")
    save_hf_checkpoint_dir(make_hf_model(seed=5, max_position_embeddings=64), directory)
    shutil.copy(tiny_tokenizer.proto_path, directory / "tokenizer.model")
    return directory


def test_export_tflite_defaults_to_per_channel_int8():
    """The command's default quantization is int8 with one scale per row."""
    from gemma_keras.cli import build_parser

    args = build_parser().parse_args(["export-tflite", "--out", "x.tflite"])
    assert args.quantize == "int8_channel"


def test_defaults_fit_a_model_with_a_short_context(short_context_model, tmp_path, capsys):
    """Every default that depends on the model is derived from it: the commands succeed on a
    64-position model without length options, and say what they clamped."""
    from gemma_keras.tflite import GemmaTFLite

    model = str(short_context_model)
    tflite = tmp_path / "short.tflite"
    assert main(["export-tflite", "--model", model, "--out", str(tflite), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "kv_cache_max_len defaults to the model's context, 64" in err
    assert "prefill lengths default to 8,64" in err
    with GemmaTFLite(tflite) as runtime:
        assert runtime.cache_len == 64
        prompt = "hello the cat sat on the mat"
        ids = runtime.tokenizer.encode(prompt)
        tokens = list(runtime.generate_ids(ids, stop_token_ids=()))
        assert len(tokens) == 64 - len(ids)  # clamped to the room the prompt leaves

    assert main(["export-saved-model", "--model", model, "--out", str(tmp_path / "sm")]) == 0
    assert "max_new_tokens defaults to 63" in capsys.readouterr().err

    assert main(["generate", "--model", model, "hello the cat"]) == 0
    assert main(["generate", "--tflite", str(tflite), "hello the cat"]) == 0
    capsys.readouterr()
    # a value the user gives is checked, not clamped
    assert main(["generate", "--tflite", str(tflite), "--max-new-tokens", "64", "hi"]) == 1
    assert "exported with a cache of 64" in capsys.readouterr().err


def test_keras_generate_default_clamps_to_the_context(short_context_model):
    from gemma_keras.causal_lm import Gemma2CausalLM

    lm = Gemma2CausalLM.from_pretrained(short_context_model)
    ids = [2] + list(np.arange(10, 40))
    out = lm.generate([ids], stop_token_ids=())[0]
    assert len(out) == 64 - len(ids)
