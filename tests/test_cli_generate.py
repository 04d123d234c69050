"""`gemma-keras generate` and `gemma-keras chat`, checked against transformers and the
bundled tiny model's known answers."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from gemma_keras import cli
from gemma_keras.tiny_task import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tiny_tokenizer, tmp_path_factory):
    """The tiny random HF checkpoint with the tiny tokenizer beside it."""
    directory = tmp_path_factory.mktemp("cli_model")
    for name in os.listdir(hf_checkpoint):
        shutil.copy(os.path.join(hf_checkpoint, name), directory)
    shutil.copy(tiny_tokenizer.proto_path, directory / "tokenizer.model")
    return directory


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_transformers_greedy_completion(model_dir, hf_model, tiny_tokenizer,
                                                         capsys):
    prompt = "hello the cat"
    ids = torch.tensor([tiny_tokenizer.encode(prompt)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=12, do_sample=False, eos_token_id=[1, 107],
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
    finally:
        torch.set_num_threads(threads)
    expected = tiny_tokenizer.decode([t for t in out if t not in (1, 107)][:12])
    code, stdout, _ = run_cli(capsys, "generate", "--model", str(model_dir),
                              "--max-new-tokens", "12", prompt)
    assert code == 0 and stdout == expected + "\n"


def test_generate_errors_are_clear(model_dir, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir / "nothere"), "hi")
    assert code == 1 and "model directory not found" in err and "nothere" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir),
                           "--max-new-tokens", "0", "hi")
    assert code == 1 and "max_new_tokens must be a positive integer, got 0" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "--sampler", "top_p",
                           "--top-p", "1.5", "hi")
    assert code == 1 and "top_p must be in (0, 1]" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), "")
    assert code == 1 and "the prompt is empty" in err


@pytest.mark.parametrize("command, words", [
    ("generate", ["--max-new-tokens", "--sampler", "--seed", "--tflite", "--chat", "example"]),
    ("chat", ["--max-new-tokens", "/reset", "/exit", "template", "example"]),
])
def test_help_is_useful(capsys, command, words):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(w in text for w in words), text


def test_generate_tflite_delegates_to_gemma_tflite(monkeypatch, capsys, tmp_path):
    calls = {}

    class FakeTFLite:
        def __init__(self, path, tokenizer_path):
            calls["init"] = (path, tokenizer_path)
            self.tokenizer = None

        def stream(self, prompt, **kwargs):
            calls["stream"] = (prompt, kwargs)
            yield from ["one", " two"]

    import gemma_keras.tflite

    monkeypatch.setattr(gemma_keras.tflite, "GemmaTFLite", FakeTFLite, raising=False)
    code, out, _ = run_cli(capsys, "generate", "--tflite", "m.tflite", "--tokenizer", "t.model",
                           "--max-new-tokens", "5", "--sampler", "top_k", "--top-k", "3",
                           "--seed", "4", "hi")
    assert code == 0 and out == "one two\n"
    assert calls["init"] == ("m.tflite", "t.model")
    assert calls["stream"] == ("hi", dict(max_new_tokens=5, seed=4, sampler="top_k",
                                          temperature=None, top_k=3, top_p=None))


def test_chat_on_the_bundled_tiny_model_answers_each_turn():
    """The tiny model was trained to reverse word lists in Gemma's chat format: piping two
    turns (and a /reset) into the default model must give the known answers."""
    assert os.path.isfile(os.path.join(tiny_model_dir(), "model.safetensors"))
    turns = "reverse: cat dog sun\nreverse: red blue\n/reset\nreverse: one two six ten\n"
    result = subprocess.run(
        [sys.executable, "-m", "gemma_keras.cli", "chat", "--max-new-tokens", "8"],
        input=turns, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["sun dog cat", "blue red", "ten six two one"]
