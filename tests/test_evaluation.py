"""gemma_keras.evaluation and `gemma-keras eval` on a random tiny Gemma 2 (conftest).

References: transformers' Gemma2ForCausalLM on the same checkpoint (perplexity, the strided
windows of Hugging Face's perplexity guide, choice scores), the Keras model against its own
float32 TFLite export and SavedModel, a hand-computed KL divergence, and lm-evaluation-harness
run offline on a task written here.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import tiny_corpus

CACHE_LEN, PREFILL_LENS, SCORE_LENS = 64, (8,), (16,)


# ------------------------------------------------------------------------ helpers
def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def run_cli(capsys, *argv):
    """`gemma-keras eval ARGV --json --quiet` in process: (exit code, parsed stdout, stderr)."""
    from gemma_keras.cli import main

    code = main(["eval", *map(str, argv), "--json", "--quiet"])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else None), err


def torch_log_probs(hf_model, ids):
    """float64 log P(ids[t] | ids[:t]) for t >= 1 from transformers."""
    import torch

    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], -1)
    return log_probs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


DOCUMENTS = [" ".join(tiny_corpus(n=3, seed=s)) for s in range(5)] + ["the cat sat."]
QUESTIONS = [
    {"prompt": "the cat sat on the", "choices": [" mat", " dog ran", " two"], "answer": 0},
    {"prompt": "hello", "choices": [" world", " who is it", " yes no"], "answer": 2},
    {"prompt": "what is", "choices": [" this?", " that.", " big red"], "answer": 1},
    {"prompt": "", "choices": ["one two", "the a"], "answer": 0},
]


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tiny_tokenizer, tmp_path_factory):
    """The random tiny checkpoint with the tiny tokenizer beside it (`--model` reads it)."""
    directory = tmp_path_factory.mktemp("eval_model") / "model"
    shutil.copytree(hf_checkpoint, directory)
    shutil.copyfile(tiny_tokenizer.proto_path, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval_data")
    write_jsonl(directory / "docs.jsonl", [{"text": t} for t in DOCUMENTS])
    (directory / "long.txt").write_text(" ".join(DOCUMENTS), encoding="utf-8")
    write_jsonl(directory / "questions.jsonl", QUESTIONS)
    return directory


@pytest.fixture(scope="module")
def keras_scorer(model_dir):
    from gemma_keras.evaluation.scorers import open_scorer

    return open_scorer("model", model_dir, batch_size=4)


@pytest.fixture(scope="module")
def exports(keras_scorer, model_dir, tmp_path_factory):
    """float32 and dynamic_int8 TFLite files with score signatures, and a SavedModel."""
    from gemma_keras.saved_model import export_saved_model
    from gemma_keras.tflite.export import export_tflite_variants

    out = tmp_path_factory.mktemp("eval_exports")
    model = keras_scorer.model
    files = export_tflite_variants(
        model, {q: out / f"tiny_{q}.tflite" for q in ("none", "dynamic_int8")},
        kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS, score_lens=SCORE_LENS,
        progress=False)
    shutil.copyfile(model_dir / "tokenizer.model", out / "tokenizer.model")
    saved = export_saved_model(model, out / "serving", version=1, max_length=CACHE_LEN,
                               max_new_tokens=8)
    return {**files, "saved_model": saved}


# -------------------------------------------------------------- exactness (Keras)
def test_perplexity_of_jsonl_documents_matches_transformers(capsys, model_dir, data_dir,
                                                            hf_model, tiny_tokenizer):
    code, report, err = run_cli(capsys, "--model", model_dir, "--data",
                                data_dir / "docs.jsonl", "--batch-size", 4)
    assert code == 0, err
    log_probs = np.concatenate([torch_log_probs(hf_model, tiny_tokenizer.encode(t))
                                for t in DOCUMENTS])
    nll = -log_probs.sum() / len(log_probs)
    assert report["tokens"] == len(log_probs)
    assert report["nll"] == pytest.approx(nll, rel=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    n_bytes = sum(len(t.encode("utf-8")) for t in DOCUMENTS)
    assert report["bits_per_byte"] == pytest.approx(-log_probs.sum() / math.log(2) / n_bytes,
                                                    rel=1e-4)


def test_strided_text_matches_the_hugging_face_guide(keras_scorer, data_dir, hf_model,
                                                     tiny_tokenizer):
    """A .txt file (one document) in windows of 24 tokens every 10, against the loop of
    Hugging Face's "perplexity of fixed-length models" guide run on transformers."""
    import torch

    from gemma_keras.evaluation.data import read_documents
    from gemma_keras.evaluation.perplexity import perplexity

    context, stride = 24, 10
    report = perplexity(keras_scorer, read_documents(data_dir / "long.txt"), context, stride)
    ids = torch.tensor([tiny_tokenizer.encode((data_dir / "long.txt").read_text())])
    seq_len, prev_end, nll_sum, n_tokens = ids.size(1), 0, 0.0, 0
    for begin in range(0, seq_len, stride):  # the guide's loop
        end = min(begin + context, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf_model(input_ids).logits.double()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], target_ids[0, 1:],
                                                 ignore_index=-100, reduction="sum")
        nll_sum += float(loss)
        n_tokens += int((target_ids[0, 1:] != -100).sum())
        prev_end = end
        if end == seq_len:
            break
    assert report["tokens"] == n_tokens == seq_len - 1
    assert report["windows"] > 3
    assert report["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)


def test_choice_scores_match_transformers(capsys, model_dir, data_dir, hf_model,
                                          tiny_tokenizer, tmp_path):
    output = tmp_path / "choices.jsonl"
    code, report, err = run_cli(capsys, "--model", model_dir, "--task", "choice", "--data",
                                data_dir / "questions.jsonl", "--output", output)
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert report["count"] == len(rows) == len(QUESTIONS)
    for question, row in zip(QUESTIONS, rows):
        context = tiny_tokenizer.encode(question["prompt"])
        expected = []
        for choice in question["choices"]:
            continuation = tiny_tokenizer.encode(choice, add_bos=False)
            log_probs = torch_log_probs(hf_model, context + continuation)
            expected.append(log_probs[-len(continuation):].sum())
        np.testing.assert_allclose(row["scores"], expected, rtol=1e-4, atol=1e-5)
        assert row["pred"] == int(np.argmax(row["scores"]))
        lengths = [len(c.encode("utf-8")) for c in question["choices"]]
        assert row["pred_norm"] == int(np.argmax(np.array(row["scores"]) / lengths))
    assert report["accuracy"] == np.mean([r["pred"] == r["answer"] for r in rows])
    assert report["accuracy_norm"] == np.mean([r["pred_norm"] == r["answer"] for r in rows])


# ------------------------------------------------------------------ other runtimes
def test_tflite_and_saved_model_perplexity_agree_with_keras(keras_scorer, exports, data_dir):
    from gemma_keras.evaluation.data import read_documents
    from gemma_keras.evaluation.perplexity import perplexity
    from gemma_keras.evaluation.scorers import open_scorer

    documents = read_documents(data_dir / "docs.jsonl")
    expected = perplexity(keras_scorer, documents, context=CACHE_LEN)
    for kind, path in (("tflite", exports["none"]), ("saved_model", exports["saved_model"])):
        got = perplexity(open_scorer(kind, path), documents, context=CACHE_LEN)
        assert got["tokens"] == expected["tokens"]
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-3), kind


def test_quantized_export_diverges_more_than_float32(capsys, exports, model_dir, data_dir,
                                                     keras_scorer):
    from gemma_keras.evaluation.agreement import agreement
    from gemma_keras.evaluation.data import read_documents
    from gemma_keras.evaluation.scorers import open_scorer

    code, int8, err = run_cli(capsys, "--tflite", exports["dynamic_int8"], "--reference",
                              model_dir, "--data", data_dir / "long.txt", "--context", 40,
                              "--stride", 20)
    assert code == 0, err
    exact = agreement(open_scorer("tflite", exports["none"]), keras_scorer,
                      read_documents(data_dir / "long.txt"), context=40, stride=20)
    assert exact["tokens"] == int8["tokens"] > 100
    # float32 logits agree within ~1e-5, so their KL is of that order squared.
    assert 0 <= exact["kl_mean"] < 1e-6
    assert int8["kl_mean"] > 10 * exact["kl_mean"]
    assert int8["kl_p99"] >= int8["kl_median"]
    assert exact["perplexity"] == pytest.approx(exact["reference_perplexity"], rel=1e-3)
    # the same float32 reference (run in other batches: float32 rounding only)
    assert int8["reference_perplexity"] == pytest.approx(exact["reference_perplexity"],
                                                         rel=1e-5)
    assert 0 <= int8["top1_agreement"] <= 1


def test_saved_model_agreement_reports_what_it_cannot_compute(exports, keras_scorer,
                                                              data_dir):
    from gemma_keras.evaluation.agreement import agreement
    from gemma_keras.evaluation.data import read_documents
    from gemma_keras.evaluation.scorers import open_scorer

    report = agreement(open_scorer("saved_model", exports["saved_model"]), keras_scorer,
                       read_documents(data_dir / "docs.jsonl"), context=CACHE_LEN)
    assert report["kl_mean"] is None and report["top1_agreement"] is None
    assert "kl_mean" in report["unavailable"]["fields"]
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"], rel=1e-3)
    assert report["log_prob_abs_diff_p99"] < 1e-3


def test_kl_divergence_of_known_distributions():
    """KL(P_ref || P) for P_ref = (0.5, 0.5), P = (0.9, 0.1): 0.5 ln(0.5/0.9) + 0.5 ln 5."""
    from gemma_keras.evaluation.agreement import _compare_logits

    logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1]], np.float32))
    reference = np.log(np.array([[0.5, 0.5], [0.5, 0.5]], np.float32))
    kl, top1, log_p, ref_log_p = _compare_logits(logits, reference, [0, 1], 1)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(5), rel=1e-6)
    assert log_p[0] == pytest.approx(math.log(0.1), rel=1e-6)
    assert ref_log_p[0] == pytest.approx(math.log(0.5), rel=1e-6)


# ---------------------------------------------------------- lm-evaluation-harness
def test_harness_accuracy_equals_the_choice_task(capsys, model_dir, data_dir, tmp_path,
                                                 monkeypatch, keras_scorer):
    from gemma_keras.evaluation.choice import evaluate_choice
    from gemma_keras.evaluation.data import read_questions

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gk_choice.yaml").write_text(
        "task: gk_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_dir / 'questions.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    code, harness, err = run_cli(capsys, "--model", model_dir, "--tasks", "gk_choice",
                                 "--include-path", tasks)
    assert code == 0, err
    choice = evaluate_choice(keras_scorer, read_questions(data_dir / "questions.jsonl"))
    result = harness["results"]["gk_choice"]
    assert result["sample_len"] == len(QUESTIONS)
    assert result["acc,none"] == pytest.approx(choice["accuracy"])


def test_harness_rolling_and_generation_match_the_runtimes(keras_scorer, exports, data_dir):
    from lm_eval.api.instance import Instance

    from gemma_keras.evaluation.data import read_documents
    from gemma_keras.evaluation.harness import GemmaLM
    from gemma_keras.evaluation.perplexity import perplexity

    lm = GemmaLM(keras_scorer, max_length=CACHE_LEN)
    texts = DOCUMENTS[:3]
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    docs = [d for d in read_documents(data_dir / "docs.jsonl")][:3]
    expected = perplexity(keras_scorer, docs, context=CACHE_LEN)  # each fits one window
    assert sum(rolling) == pytest.approx(-expected["nll"] * expected["tokens"], rel=1e-6)

    # generate_until: the runtime's greedy text, cut before the first stop string.
    from gemma_keras.evaluation.scorers import open_scorer

    tflite = open_scorer("tflite", exports["none"])
    greedy = tflite.runtime.generate("the cat", max_new_tokens=8)
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 2]
    requests = [Instance("generate_until", {}, ("the cat", {"until": [stop],
                                                            "max_gen_toks": 8}), 0),
                Instance("generate_until", {}, ("the cat", {"max_gen_toks": 8}), 1)]
    assert GemmaLM(tflite).generate_until(requests) == [greedy[:greedy.index(stop)], greedy]


# --------------------------------------------------------------------- bad input
BAD_DATA = {
    "empty": ("perplexity", "", "the file has no records"),
    "no_text": ("perplexity", '{"text": "a"}\n{"body": "b"}\n', "no 'text' field"),
    "not_json": ("perplexity", '{"text": "a"}\n\n{"text": \n', "not valid JSON"),
    "answer_out_of_range": ("choice", json.dumps({"prompt": "p", "choices": ["a", "b"],
                                                  "answer": 2}) + "\n", "out of range"),
    "choices_not_a_list": ("choice", json.dumps({"prompt": "p", "choices": "ab",
                                                 "answer": 0}) + "\n", "'choices' must be"),
}
BAD_LINE = {"empty": None, "no_text": 2, "not_json": 3, "answer_out_of_range": 1,
            "choices_not_a_list": 1}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_with_file_and_line_before_loading_a_model(capsys, tmp_path,
                                                                       tiny_tokenizer, case):
    task, content, message = BAD_DATA[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    no_weights = tmp_path / "no_weights"  # loading this "model" would fail: it has no weights
    no_weights.mkdir()
    shutil.copyfile(tiny_tokenizer.proto_path, no_weights / "tokenizer.model")
    code, _, err = run_cli(capsys, "--model", no_weights, "--task", task, "--data", data)
    assert code == 1
    where = f"{data} line {BAD_LINE[case]}:" if BAD_LINE[case] else f"{data}:"
    assert where in err and message in err, err


def test_long_document_is_refused_without_stride(capsys, model_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the cat"}, {"text": DOCUMENTS[0]}])
    code, _, err = run_cli(capsys, "--model", model_dir, "--data", data, "--context", 16)
    assert code == 1
    assert f"{data} line 2:" in err and "--stride" in err, err


def test_reference_with_another_tokenizer_is_refused(capsys, model_dir, data_dir):
    from gemma_keras.tiny_task import tiny_model_dir

    code, _, err = run_cli(capsys, "--model", model_dir, "--reference", tiny_model_dir(),
                           "--data", data_dir / "docs.jsonl")
    assert code == 1
    assert "tokenizers differ" in err
    assert str(model_dir / "tokenizer.model") in err and "tiny/tokenizer.model" in err, err


def test_tflite_evaluation_imports_neither_tensorflow_nor_keras(exports, data_dir):
    import subprocess
    import sys

    code = f"""
import json, sys
from gemma_keras.evaluation.evaluate import evaluate
report = evaluate(data={str(data_dir / 'docs.jsonl')!r}, tflite={str(exports['none'])!r})
heavy = sorted(m for m in ("tensorflow", "keras", "tf_keras") if m in sys.modules)
print(json.dumps({{"tokens": report["tokens"], "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["tokens"] > 0


def test_export_check_on_the_builtin_text(exports, model_dir, tiny_tokenizer):
    from gemma_keras.evaluation.export_check import (
        KL_WARN,
        TOP1_WARN,
        check_export,
        quantization_warnings,
    )
    from gemma_keras.evaluation.heldout import HELDOUT_TEXT

    report = check_export(exports["none"], model_dir, context=CACHE_LEN)
    assert report["data"] == "built-in held-out text"
    n = len(tiny_tokenizer.encode(HELDOUT_TEXT))  # disjoint windows: each one's first token
    assert report["tokens"] == n - math.ceil(n / CACHE_LEN)  # (but <bos>) is not predicted
    assert report["kl_mean"] < 1e-6 and report["warnings"] == []
    far = {**report, "kl_mean": 2 * KL_WARN, "top1_agreement": TOP1_WARN / 2}
    assert [w.split()[0] for w in quantization_warnings(far)] == ["mean", "top-1"]
