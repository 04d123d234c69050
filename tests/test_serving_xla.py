"""An XLA export (`xla=True`): prefill chunks and the decode step are XLA-compiled functions.

Run in a TF1 session as TensorFlow Serving runs it, it must give `Gemma2CausalLM.generate`'s
greedy completions. The graph's cache update is XLA's own `XlaDynamicUpdateSlice`, which has
no kernel outside XLA, so a successful run shows the compiled path ran. With XLA compilation
disabled process-wide (what `tensorflow_model_server` does unless started with
`--xla_cpu_compilation_enabled=true`), every request fails with "XLA compilation disabled".
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from test_saved_model import PROMPTS, _trim, tiny_lm  # noqa: F401  (tiny_lm is a fixture)

MAX_NEW = 9
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def xla_export(tiny_lm, tmp_path_factory):  # noqa: F811
    from gemma_keras.saved_model import export_saved_model

    return export_saved_model(tiny_lm, tmp_path_factory.mktemp("xla"), version=1,
                              max_length=MAX_LENGTH, max_new_tokens=MAX_NEW, xla=True)


def _feeds(prompts):
    return {"prompts": np.array([p.encode() for p in prompts], object)}


def test_xla_export_gives_keras_greedy_completions(xla_export, tiny_lm):  # noqa: F811
    from gemma_keras.serving.session import ServingSession

    served = ServingSession(xla_export)
    try:
        graph = served.meta_graph.graph_def
        nodes = [n for f in graph.library.function for n in f.node_def]
        assert "XlaDynamicUpdateSlice" in {n.op for n in nodes}
        assert any(n.attr["_XlaMustCompile"].b for n in nodes)  # jit_compile=True calls
        out = served.run("serving_default", _feeds(PROMPTS))  # default max_new_tokens
    finally:
        served.close()
    ids = [tiny_lm.tokenizer.encode(p) for p in PROMPTS]
    assert [_trim(row) for row in out["token_ids"]] == tiny_lm.generate(
        ids, max_new_tokens=MAX_NEW)
    assert [t.decode() for t in out["completions"]] == tiny_lm.generate(
        PROMPTS, max_new_tokens=MAX_NEW)


def test_without_xla_compilation_requests_fail(xla_export):
    """TensorFlow Serving calls tensorflow::DisableXlaCompilation() at start unless
    --xla_cpu_compilation_enabled=true; the same call here makes the request fail."""
    import tensorflow as tf

    from gemma_keras.serving.session import ServingSession

    library = ctypes.CDLL(str(Path(tf.__file__).parent / "libtensorflow_cc.so.2"))
    served = ServingSession(xla_export)
    library._ZN10tensorflow21DisableXlaCompilationEv()
    try:
        with pytest.raises(tf.errors.InternalError, match="XLA compilation disabled"):
            served.run("serving_default", _feeds(PROMPTS[:1]))
    finally:
        library._ZN10tensorflow20EnableXlaCompilationEv()
        served.close()


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 100, 4096, 4097, 5000, 8192, 8193])
def test_in_graph_cache_slots_follow_the_convention(n):
    from gemma_keras.conventions import cache_slots_for
    from gemma_keras.serving import module

    assert int(module.cache_slots_for(np.int32(n))) == cache_slots_for(n)
