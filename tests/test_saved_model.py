"""SavedModel export for TensorFlow Serving.

One tiny random model is exported once; the export is then loaded (1) in a fresh Python
process that imports only tensorflow and tensorflow_text, and (2) in this process the way the
model server does it (TF1 loader + Session), driven by a real `PredictRequest`. Both must
produce exactly the Keras model's greedy completions (`model.generate`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

PROMPTS = ["the cat sat on the mat and ran to the dog", "hello", "who is it? yes"]
MAX_NEW = 9
MAX_LENGTH = 40
SHARD = 16 * 1024  # bytes; small, so the tiny model's variables need several shards
VERSION = 3
STOP_IDS = (1, 107)
SENTENCEPIECE_OPS = {"SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceDetokenizeOp"}


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_lm(hf_checkpoint, tiny_tokenizer):
    from gemma_keras.converters import load_hf_checkpoint

    model = load_hf_checkpoint(hf_checkpoint)
    model.tokenizer = tiny_tokenizer
    return model


@pytest.fixture(scope="module")
def export_dir(tiny_lm, tmp_path_factory):
    from gemma_keras.saved_model import export_saved_model

    base = tmp_path_factory.mktemp("serving_base")
    return export_saved_model(tiny_lm, base, version=VERSION, max_length=MAX_LENGTH,
                              max_new_tokens=MAX_NEW, max_shard_size=SHARD)


@pytest.fixture(scope="module")
def expected(tiny_lm):
    """The Keras model's greedy completions: token ids (stop token left out) and text."""
    ids = [tiny_lm.tokenizer.encode(p) for p in PROMPTS]
    return {
        "prompt_ids": ids,
        "ids": tiny_lm.generate(ids, max_new_tokens=MAX_NEW),
        "text": tiny_lm.generate(PROMPTS, max_new_tokens=MAX_NEW),
    }


def _trim(row):
    """Generated ids up to (not including) the first stop token; asserts pad after it."""
    row = [int(t) for t in row]
    for i, t in enumerate(row):
        if t in STOP_IDS:
            assert all(x == 0 for x in row[i + 1:]), row
            return row[:i]
    return row


def _keras_log_probs(model, token_ids):
    ids = np.asarray(token_ids, "int32")
    mask = ids != 0
    logits = np.asarray(model({"token_ids": ids, "padding_mask": mask}), "float64")
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], -1)[..., 0]
    return np.where(mask, np.pad(picked, ((0, 0), (1, 0))), 0.0)


def _right_padded(rows):
    out = np.zeros((len(rows), max(map(len, rows))), "int32")
    for b, row in enumerate(rows):
        out[b, :len(row)] = row
    return out


# --------------------------------------------------------------------------- layout
def test_version_directory_layout(export_dir, tiny_lm):
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    assert export_dir.name == str(VERSION)
    assert [p.name for p in export_dir.parent.iterdir()] == [str(VERSION)]  # no temp left
    assert (export_dir / "assets" / "tokenizer.model").read_bytes() == \
        Path(tiny_lm.tokenizer.proto_path).read_bytes()

    # Weights are variables: the checkpoint holds every model weight, in bounded shards,
    # and no constant in the graph is weight-sized.
    shards = sorted((export_dir / "variables").glob("variables.data-*"))
    assert len(shards) > 1
    assert all(p.stat().st_size <= SHARD + 8192 for p in shards), \
        [p.stat().st_size for p in shards]
    reader = tf.train.load_checkpoint(str(export_dir / "variables" / "variables"))
    stored = sorted(reader.get_variable_to_shape_map().values(), key=str)
    weights = sorted((list(v.shape) for v in tiny_lm.weights), key=str)
    assert [s for s in stored if s] == weights  # plus scalar save counters, if any
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((export_dir / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    largest_const = max(n.attr["value"].tensor.ByteSize() for n in nodes if n.op == "Const")
    assert largest_const < 4096 + len(Path(tiny_lm.tokenizer.proto_path).read_bytes())


# ------------------------------------------------------------------- fresh process
FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.client import pywrap_tf_session as c_api

    def registered_ops():
        buf = c_api.TF_GetAllOpList()
        try:
            ops = op_def_pb2.OpList()
            ops.ParseFromString(c_api.TF_GetBuffer(buf))
        finally:
            c_api.TF_DeleteBuffer(buf)
        return {op.name for op in ops.op}

    export_dir, prompts, max_new, score_ids = json.loads(sys.argv[1])
    core_ops = registered_ops()
    import tensorflow_text  # registers the SentencePiece ops
    text_ops = registered_ops() - core_ops

    saved = saved_model_pb2.SavedModel()
    with open(export_dir + "/saved_model.pb", "rb") as f:
        saved.ParseFromString(f.read())
    graph = saved.meta_graphs[0].graph_def
    nodes = list(graph.node) + [n for fn in graph.library.function for n in fn.node_def]
    attrs = [a for n in nodes for a in n.attr.items()]
    attrs += [a for fn in graph.library.function for a in fn.attr.items()]
    xla_on = sorted({k for k, v in attrs if "xla" in k.lower() and v.b})  # e.g. _XlaMustCompile

    model = tf.saved_model.load(export_dir)
    generate = model.signatures["serving_default"]
    def run(prompts, **kw):
        args = dict(max_new_tokens=tf.constant(max_new), temperature=tf.constant(0.0),
                    top_k=tf.constant(0), top_p=tf.constant(1.0),
                    seed=tf.constant(0, tf.int64))
        args.update({k: tf.constant(v, args[k].dtype) for k, v in kw.items()})
        out = generate(prompts=tf.constant(prompts), **args)
        return {"ids": out["token_ids"].numpy().tolist(),
                "text": [t.decode("utf-8") for t in out["completions"].numpy()]}

    result = {
        "graph_ops": sorted({n.op for n in nodes}),
        "core_ops": sorted(core_ops),
        "text_ops": sorted(text_ops),
        "xla_on": xla_on,
        "signatures": sorted(model.signatures),
        "greedy": run(prompts),
        # The restored tf.function applies the defaults (the Python signature loader does not).
        "defaults": model.generate(tf.constant(prompts))["token_ids"].numpy().tolist(),
        # Per-prompt settings that all leave only the argmax: top-k 1, a tiny top-p, greedy.
        "restricted": run(prompts, temperature=[1.5, 1.5, 0.0], top_k=[1, 0, 0],
                          top_p=[1.0, 1e-6, 1.0], seed=[1, 2, 3]),
        "sampled": run(prompts, temperature=1.0, seed=[5, 6, 7]),
        "sampled_again": run(prompts, temperature=1.0, seed=[5, 6, 7]),
        "sampled_row_alone": run(prompts[1:2], temperature=1.0, seed=6),
        "sampled_one_seed": run(prompts, temperature=1.0, seed=5),
        "score": model.signatures["score"](
            token_ids=tf.constant(score_ids, tf.int32))["log_probs"].numpy().tolist(),
        "project_modules": sorted(m for m in sys.modules if m.split(".")[0] == "gemma_keras"),
    }
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def fresh_processes(export_dir, tiny_lm, tmp_path_factory):
    """Start FRESH_PROCESS on the export (a new interpreter, no project code imported) and,
    alongside it, `saved_model_cli show --all`."""
    workdir = tmp_path_factory.mktemp("fresh_process")
    script = workdir / "load_export.py"
    script.write_text(FRESH_PROCESS)
    score_ids = _right_padded([tiny_lm.tokenizer.encode(p) for p in PROMPTS]).tolist()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    args = json.dumps([str(export_dir), PROMPTS, MAX_NEW, score_ids])
    saved_model_cli = Path(sys.executable).with_name("saved_model_cli")
    procs = [
        subprocess.Popen([sys.executable, "-I", str(script), args], cwd=workdir, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([str(saved_model_cli), "show", "--dir", str(export_dir), "--all"],
                         cwd=workdir, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True),
    ]
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def fresh(fresh_processes, expected):
    """The fresh process's result (computed while `expected` runs here), with the
    saved_model_cli output under "saved_model_cli"."""
    script, cli = fresh_processes
    (out, err), (cli_out, cli_err) = [p.communicate(timeout=900) for p in (script, cli)]
    assert script.returncode == 0, err[-4000:]
    assert cli.returncode == 0, cli_err[-4000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "saved_model_cli": cli_out}


def test_fresh_process_imports_no_project_code(fresh):
    assert fresh["project_modules"] == []
    assert fresh["signatures"] == ["score", "serving_default"]


def test_fresh_process_greedy_completions_match_keras(fresh, expected):
    assert [_trim(row) for row in fresh["greedy"]["ids"]] == expected["ids"]
    assert fresh["greedy"]["text"] == expected["text"]
    assert fresh["defaults"] == fresh["greedy"]["ids"]  # default max_new_tokens = MAX_NEW


def test_fresh_process_sampling(fresh):
    greedy = fresh["greedy"]["ids"]
    assert fresh["restricted"]["ids"] == greedy
    assert fresh["sampled"] == fresh["sampled_again"]  # seeded: reproducible
    assert all(s != g for s, g in zip(fresh["sampled"]["ids"], greedy))
    # A row's sample depends on its prompt and seed, not on the rest of the batch.
    alone = fresh["sampled_row_alone"]["ids"][0]
    assert _trim(alone) == _trim(fresh["sampled"]["ids"][1])
    # One seed for several prompts: prompt b draws with seed + b (as model.generate does).
    assert fresh["sampled_one_seed"] == fresh["sampled"]


def test_fresh_process_score_matches_keras(fresh, expected, tiny_lm):
    ids = _right_padded(expected["prompt_ids"])
    np.testing.assert_allclose(np.array(fresh["score"]), _keras_log_probs(tiny_lm, ids),
                               atol=1e-4, rtol=0)


def test_graph_has_only_core_tf_and_tf_text_ops(fresh):
    ops, core = set(fresh["graph_ops"]), set(fresh["core_ops"])
    assert fresh["xla_on"] == []  # jit_compile is off everywhere
    assert not [op for op in ops if op.startswith("Xla")]
    assert ops - core == SENTENCEPIECE_OPS  # the rest is core TensorFlow
    assert SENTENCEPIECE_OPS <= set(fresh["text_ops"])


# ---------------------------------------------------------------- saved_model_cli
def test_saved_model_cli_lists_signatures(fresh):
    out = fresh["saved_model_cli"]
    for name in ("serving_default", "score"):
        assert f"signature_def['{name}']" in out
    for name in ("prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                 "completions", "token_ids", "log_probs"):
        assert f"['{name}'] tensor_info" in out, name
    assert "Method name is: tensorflow/serving/predict" in out


# ------------------------------------------------------- PredictRequest, in-process
def build_request(signature, signature_name="", **inputs):
    """A PredictRequest for model "gemma". Inputs given as Python values are typed by the
    SignatureDef; NumPy arrays are sent with their own dtype (as a careless client might)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "gemma"
    request.model_spec.signature_name = signature_name
    for alias, value in inputs.items():
        dtype = None if isinstance(value, np.ndarray) else \
            tf.as_dtype(signature.inputs[alias].dtype)
        request.inputs[alias].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return request


@pytest.fixture(scope="module")
def served(export_dir):
    """The export loaded as TensorFlow Serving loads it (`ServingSession`: TF1 loader and a
    session; a PredictRequest's missing inputs take the SignatureDef's defaults)."""
    from gemma_keras.serving.session import ServingSession

    served = ServingSession(export_dir)
    yield served
    served.close()


def test_predict_request_returns_keras_greedy_completions(served, expected):
    import tensorflow as tf

    signature = served.meta_graph.signature_def["serving_default"]
    request = build_request(signature, prompts=PROMPTS)  # other inputs: SignatureDef defaults
    response = served.predict(request)
    assert response.model_spec.signature_name == "serving_default"
    ids = tf.make_ndarray(response.outputs["token_ids"])
    text = [t.decode("utf-8") for t in tf.make_ndarray(response.outputs["completions"])]
    assert [_trim(row) for row in ids] == expected["ids"]
    assert text == expected["text"]

    # A per-prompt max_new_tokens (the REST "instances" form sends one value per prompt).
    request = build_request(signature, prompts=PROMPTS, max_new_tokens=[2, 3, 1])
    ids = tf.make_ndarray(served.predict(request).outputs["token_ids"])
    assert ids.shape == (3, 3)
    for row, budget, want in zip(ids, [2, 3, 1], expected["ids"]):
        assert _trim(row[:budget]) == want[:budget]
        assert not row[budget:].any()  # padding once a row's budget is spent


def test_predict_request_score(served, expected, tiny_lm):
    import tensorflow as tf

    ids = _right_padded(expected["prompt_ids"])
    signature = served.meta_graph.signature_def["score"]
    response = served.predict(build_request(signature, "score", token_ids=ids))
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["log_probs"]),
                               _keras_log_probs(tiny_lm, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("signature_name, inputs, message", [
    ("", {"prompts": []}, "prompts must hold at least one string"),
    ("", {"prompts": ["hello", ""]}, "prompts must not be empty strings; prompt(s) [1]"),
    ("", {"prompts": np.array([1, 2], "int32")}, "string"),
    ("", {"prompts": ["hello"], "max_new_tokens": MAX_LENGTH},
     f"tokens with max_new_tokens [{MAX_LENGTH}] exceed the {MAX_LENGTH} tokens (max_length)"),
    ("", {"prompts": ["hello"], "max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ("", {"prompts": ["a", "b", "c"], "top_k": [1, 2]},
     "top_k must be a scalar or hold one value per prompt; got 2 values for 3 prompts"),
    ("", {"prompts": ["hello"], "top_p": 0.0}, "top_p must be in (0, 1]"),
    ("", {"prompts": ["hello"], "temperature": -1.0}, "temperature must be >= 0"),
    ("score", {"token_ids": [[2, 500]]}, "token_ids must be in [0, 160)"),
    ("score", {"token_ids": [[2, 0, 5]]}, "token_ids must be right-padded"),
])
def test_bad_requests_are_invalid_argument(served, signature_name, inputs, message):
    import tensorflow as tf

    signature = served.meta_graph.signature_def[signature_name or "serving_default"]
    request = build_request(signature, signature_name, **inputs)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        served.predict(request)
    assert message in info.value.message


# ------------------------------------------------------- a trained model, end to end
def test_bundled_tiny_model_answers_its_task_through_the_export(tmp_path):
    """The bundled tiny model (trained to reverse word lists) behind the SavedModel: chat
    prompts in, its answers out, every row stopping at <end_of_turn> as `model.generate`."""
    import tensorflow as tf

    from gemma_keras import tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.saved_model import export_saved_model

    model = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir())
    examples = tiny_task.eval_examples()[:6]
    prompts = tiny_task.chat_prompts(model.tokenizer, [e["prompt"] for e in examples])
    path = export_saved_model(model, tmp_path, max_length=64, max_new_tokens=12)
    served = tf.saved_model.load(str(path))
    out = served.generate(tf.constant(prompts))  # with the defaults
    completions = [c.decode("utf-8") for c in out["completions"].numpy()]
    assert completions == model.generate(prompts, max_new_tokens=12)
    assert [tiny_task.normalise(c) for c in completions] == [e["response"] for e in examples]
    for row in out["token_ids"].numpy().tolist():
        assert row[len(_trim(row))] == 107  # <end_of_turn>, then padding (checked by _trim)


# ------------------------------------------------------------------ export errors
def test_export_refuses_bad_arguments(tiny_lm, export_dir, tmp_path):
    from gemma_keras.saved_model import export_saved_model, next_version

    base = export_dir.parent
    assert next_version(base) == VERSION + 1
    assert next_version(tmp_path / "missing") == 1
    with pytest.raises(TypeError, match="takes a Gemma2CausalLM, got Gemma2Backbone"):
        export_saved_model(tiny_lm.backbone, tmp_path, version=1)
    with pytest.raises(FileExistsError, match=f"{VERSION} already exists"):
        export_saved_model(tiny_lm, base, version=VERSION)
    for version in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match="version must be a positive integer"):
            export_saved_model(tiny_lm, tmp_path, version=version)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 128\]"):
        export_saved_model(tiny_lm, tmp_path, version=1, max_length=129)
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 16\)"):
        export_saved_model(tiny_lm, tmp_path, version=1, max_length=16, max_new_tokens=16)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        export_saved_model(tiny_lm, tmp_path, version=1, tokenizer_path=tmp_path / "nope.model")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------- CLI
def test_cli_passes_arguments_to_export(hf_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    """The command loads the model directory and calls `export_saved_model` (whose work is
    tested above) with the parsed options; an existing version fails with exit status 1."""
    import gemma_keras.saved_model as saved_model
    from gemma_keras.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(hf_checkpoint, model_dir)
    shutil.copy(tiny_tokenizer.proto_path, model_dir / "tokenizer.model")
    base = tmp_path / "serving"
    (base / "1").mkdir(parents=True)
    assert main(["export-saved-model", "--model", str(model_dir), "--out", str(base),
                 "--version", "1"]) == 1  # the real function refuses before any work

    calls = []
    monkeypatch.setattr(saved_model, "export_saved_model",
                        lambda model, base_dir, **kw: calls.append((model, base_dir, kw)))
    assert main(["export-saved-model", "--model", str(model_dir), "--out", str(base),
                 "--version", "7", "--max-length", "24", "--max-new-tokens", "4",
                 "--max-shard-size", "64KB"]) == 0
    (model, base_dir, kw), = calls
    assert model.config.vocab_size == 160 and base_dir == str(base)
    assert Path(model.tokenizer.proto_path) == model_dir / "tokenizer.model"
    assert kw == {"version": 7, "tokenizer_path": None, "max_length": 24,
                  "max_new_tokens": 4, "max_shard_size": 64_000}

    from gemma_keras.serving.batching import InGraphBatching

    calls.clear()
    assert main(["export-saved-model", "--model", str(model_dir), "--out", str(base),
                 "--batching", "--xla", "--in-graph-batching", "--max-batch-size", "4",
                 "--allowed-batch-sizes", "2,4", "--batch-timeout-micros", "500"]) == 0
    (_, _, kw), = calls
    assert kw["batching"] is True and kw["xla"] is True
    assert kw["in_graph_batching"] == InGraphBatching(
        max_batch_size=4, batch_timeout_micros=500, allowed_batch_sizes=(2, 4))
    assert main(["export-saved-model", "--model", str(model_dir), "--out", str(base),
                 "--in-graph-batching", "--max-batch-size", "4",
                 "--allowed-batch-sizes", "2,3"]) == 1  # must end with max_batch_size
