"""A batching-ready export (`batching=True`) under TensorFlow Serving's batching session.

The server's `--enable_batching` merges concurrent requests: it concatenates their inputs
along dimension 0 (refusing rank-0 inputs and unequal dimension 0), runs once, and splits
every output back along dimension 0 (`gemma_keras.serving.session.batching_session_run`
follows its source). Each of 8 requests with different prompt lengths and sampling settings
must get exactly the completion it gets alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_saved_model import _trim, tiny_lm  # noqa: F401  (tiny_lm is a fixture)

MAX_LENGTH = 40
INPUT_DTYPES = {"prompts": object, "max_new_tokens": np.int32, "temperature": np.float32,
                "top_k": np.int32, "top_p": np.float32, "seed": np.int64}
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0)
# (prompts, per-prompt settings); 11 prompts in all, padded to a batch of 16.
REQUESTS = [
    (["hello"], dict(max_new_tokens=9, **GREEDY)),
    (["the cat sat on the mat and ran to the dog", "who is it? yes"],
     dict(max_new_tokens=6, **GREEDY)),
    (["a"], dict(max_new_tokens=3, **GREEDY)),
    (["the dog ran"], dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, seed=11)),
    (["is it the cat", "yes it is"], dict(max_new_tokens=7, temperature=1.3, top_k=0,
                                          top_p=1.0, seed=[5, 6])),
    (["who sat on the mat"], dict(max_new_tokens=9, temperature=0.8, top_k=3, top_p=1.0,
                                  seed=2)),
    (["the mat", "cat"], dict(max_new_tokens=[4, 9], temperature=[1.2, 0.0], top_k=0,
                              top_p=[0.7, 1.0], seed=[3, 4])),
    (["ran to the dog and the cat sat"], dict(max_new_tokens=5, temperature=0.9, top_k=5,
                                              top_p=0.8, seed=9)),
]


def as_feeds(prompts, settings):
    """A request's inputs, one value per prompt, typed as the signature wants."""
    n = len(prompts)
    feeds = {"prompts": np.array([p.encode() for p in prompts], object)}
    for name, value in settings.items():
        feeds[name] = np.broadcast_to(np.asarray(value, INPUT_DTYPES[name]), [n]).copy()
    return feeds


@pytest.fixture(scope="module")
def served(tiny_lm, tmp_path_factory):  # noqa: F811
    from gemma_keras.saved_model import export_saved_model
    from gemma_keras.serving.session import ServingSession

    path = export_saved_model(tiny_lm, tmp_path_factory.mktemp("batching"), version=1,
                              max_length=MAX_LENGTH, max_new_tokens=9, batching=True)
    served = ServingSession(path)
    yield served
    served.close()


def test_every_input_and_output_has_the_batch_dimension(served):
    signature = served.signature("serving_default")
    assert sorted(signature.inputs) == sorted(INPUT_DTYPES)
    for name, info in signature.inputs.items():
        assert [d.size for d in info.tensor_shape.dim] == [-1], name
    assert len(signature.defaults) == 0  # no default at all, so none is a scalar
    assert [d.size for d in signature.outputs["completions"].tensor_shape.dim] == [-1]
    assert [d.size for d in signature.outputs["token_ids"].tensor_shape.dim] == [-1, -1]


def test_batching_session_answers_each_request_as_alone(served, tiny_lm):  # noqa: F811
    from gemma_keras.serving.session import batching_session_run

    requests = [as_feeds(p, s) for p, s in REQUESTS]
    alone = [served.run("serving_default", r) for r in requests]
    merged = batching_session_run(served, "serving_default", requests,
                                  allowed_batch_sizes=(4, 8, 16))
    widths = []
    for r, (one, many) in enumerate(zip(alone, merged)):
        assert list(many["completions"]) == list(one["completions"]), r
        width = one["token_ids"].shape[1]
        np.testing.assert_array_equal(many["token_ids"][:, :width], one["token_ids"])
        assert not many["token_ids"][:, width:].any()  # padded to the merged batch's steps
        widths.append(width)
    assert max(widths) > min(widths)  # requests of different lengths really were merged

    # Greedy rows equal the Keras model's own generation; freely sampled ones differ from it.
    prompts = [p for ps, _ in REQUESTS for p in ps]
    keras_greedy = iter(tiny_lm.generate([tiny_lm.tokenizer.encode(p) for p in prompts],
                                         max_new_tokens=9))
    for (ps, settings), one in zip(REQUESTS, alone):
        per_row = {k: np.broadcast_to(np.asarray(v), len(ps)) for k, v in settings.items()}
        for b, row in enumerate(one["token_ids"]):
            want = next(keras_greedy)[:per_row["max_new_tokens"][b]]
            if per_row["temperature"][b] == 0:
                assert _trim(row) == want
            elif per_row["top_k"][b] == 0 and per_row["top_p"][b] == 1:
                assert _trim(row) != want


def test_batching_session_refuses_a_request_without_batch_dimension(served):
    import tensorflow as tf

    from gemma_keras.serving.session import batching_session_run

    good = as_feeds(*REQUESTS[0])
    scalar = {**good, "temperature": np.float32(0.0)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="at least one dimension"):
        batching_session_run(served, "serving_default", [good, scalar])
    ragged = {**good, "seed": np.zeros([2], np.int64)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="equal 0th-dimension size"):
        batching_session_run(served, "serving_default", [ragged])
    # Alone, the graph's own check names the input.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="seed must be a scalar or hold one value per prompt"):
        served.run("serving_default", ragged)
