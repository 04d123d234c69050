"""In-graph batching (`InGraphBatching`: a `BatchFunction` op) under concurrent load.

The export is loaded once in a TF1 session; client threads call `Session::Run` on it at the
same time, as a model server's request threads do. Every answer must equal the request's
answer alone; a malformed request among valid ones must fail alone with INVALID_ARGUMENT.
Throughput and latency are recorded (`record_property`), never asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_saved_model import tiny_lm  # noqa: F401  (a fixture)
from test_serving_batching import as_feeds

MAX_LENGTH = 40
MAX_BATCH = 8
PROMPTS = ["hello", "the cat sat on the mat and ran to the dog", "who is it? yes", "a",
           "the dog ran", "is it the cat", "yes it is", "ran to the dog and the cat sat"]


def request(i):
    """Request i: one prompt, its own max_new_tokens and settings (greedy or sampled)."""
    settings = dict(max_new_tokens=3 + i % 6, temperature=0.0 if i % 3 == 0 else 1.1,
                    top_k=i % 4, top_p=1.0 if i % 2 else 0.9, seed=i)
    return as_feeds([PROMPTS[i % len(PROMPTS)]], settings)


REQUESTS = [request(i) for i in range(16)]


@pytest.fixture(scope="module")
def served(tiny_lm, tmp_path_factory):  # noqa: F811
    from gemma_keras.saved_model import export_saved_model
    from gemma_keras.serving.batching import InGraphBatching
    from gemma_keras.serving.session import ServingSession

    options = InGraphBatching(max_batch_size=MAX_BATCH, batch_timeout_micros=100_000)
    path = export_saved_model(tiny_lm, tmp_path_factory.mktemp("in_graph"), version=1,
                              max_length=MAX_LENGTH, max_new_tokens=9,
                              in_graph_batching=options)
    served = ServingSession(path)
    yield served
    served.close()


@pytest.fixture(scope="module")
def alone(served):
    """Each request's answer when it runs alone (one at a time: batches of one)."""
    return [served.run("serving_default", r) for r in REQUESTS]


def _generate(served):
    return lambda feeds: served.run("serving_default", feeds)


def _assert_same_answer(got, want):
    assert list(got["completions"]) == list(want["completions"])
    width = want["token_ids"].shape[1]
    np.testing.assert_array_equal(got["token_ids"][:, :width], want["token_ids"])
    assert not got["token_ids"][:, width:].any()


def test_graph_batches_with_the_batch_function_op(served):
    ops = {n.op for f in served.meta_graph.graph_def.library.function for n in f.node_def}
    assert "BatchFunction" in ops


@pytest.mark.parametrize("clients", [1, 4, 8])
def test_concurrent_clients_each_get_their_own_answer(served, alone, clients,
                                                      record_property):
    from gemma_keras.serving.load import run_load

    result = run_load(_generate(served), REQUESTS, clients)
    assert result.errors == [None] * len(REQUESTS)
    for got, want in zip(result.outputs, alone):
        _assert_same_answer(got, want)
    if clients == 8:  # merged with a longer request, an answer comes back wider
        assert any(got["token_ids"].shape[1] > want["token_ids"].shape[1]
                   for got, want in zip(result.outputs, alone))
    tokens = [int((o["token_ids"] != 0).sum()) for o in result.outputs]
    summary = result.summary(tokens)
    for key in ("requests_per_s", "tokens_per_s", "p50_s", "p99_s"):
        record_property(key, summary[key])
    print(summary)


def test_malformed_requests_fail_alone_under_load(served, alone):
    import tensorflow as tf

    from gemma_keras.serving.load import run_load

    bad = {
        3: ({**REQUESTS[3], "temperature": np.array([-1.0], np.float32)},
            "temperature must be >= 0"),
        6: ({**REQUESTS[6], "max_new_tokens": np.array([MAX_LENGTH], np.int32)},
            f"exceed the {MAX_LENGTH} tokens (max_length)"),
        9: ({**REQUESTS[9], "prompts": np.array([b""], object)},
            "prompts must not be empty strings"),
        12: (as_feeds((PROMPTS * 2)[:MAX_BATCH + 1], dict(max_new_tokens=2)),
             f"at most {MAX_BATCH} prompts (max_batch_size)"),
    }
    requests = [bad[i][0] if i in bad else r for i, r in enumerate(REQUESTS)]
    result = run_load(_generate(served), requests, clients=8)
    for i, (got, error, want) in enumerate(zip(result.outputs, result.errors, alone)):
        if i in bad:
            assert isinstance(error, tf.errors.InvalidArgumentError), (i, error)
            assert bad[i][1] in error.message
        else:
            assert error is None, (i, error)
            _assert_same_answer(got, want)
