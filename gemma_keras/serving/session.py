"""Run an exported SavedModel in-process the way TensorFlow Serving runs it.

`ServingSession` loads the SavedModel with the TF1 loader (graph, variables restored, init op
run, one `Session`, as the model server does) and answers `PredictRequest`s like the
server's Predict handler: inputs missing from the request take the SignatureDef's defaults,
unknown input names are refused, tensors are fed as given (no dtype coercion, like the C++
`Session::Run`), and every output is returned. `Session.run` releases the GIL, so threads
can call it concurrently, as the server's request threads do.

`batching_session_run` merges several requests the way the server's batching session
(`--enable_batching`) does. Only TensorFlow (and tensorflow-text, whose ops the graph uses)
is needed; `predict` also needs `tensorflow-serving-api`.

Example:
>>> served = ServingSession("/models/gemma/1")
>>> served.run("serving_default", {"prompts": np.array([b"Hello"])})["completions"]
"""

from __future__ import annotations

import threading

import numpy as np


class ServingSession:
    """A SavedModel loaded in a TF1 session, with one callable per signature."""

    def __init__(self, export_dir, tags=("serve",)):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the SentencePiece ops the graph uses)

        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        self._callables = {}  # one per signature, as the server keeps its session warm
        self._lock = threading.Lock()
        with self.graph.as_default():
            self.meta_graph = tf.compat.v1.saved_model.loader.load(
                self.session, list(tags), str(export_dir))

    def signature(self, name="serving_default"):
        return self.meta_graph.signature_def[name]

    def run(self, name, inputs):
        """Run signature `name` on `inputs` ({alias: array}); missing inputs take the
        SignatureDef's defaults. Returns {alias: array} with every output."""
        import tensorflow as tf

        signature = self.signature(name)
        unknown = set(inputs) - set(signature.inputs)
        if unknown:
            raise tf.errors.InvalidArgumentError(
                None, None, f"Inputs contains invalid name: {sorted(unknown)}")
        values = []
        for alias in sorted(signature.inputs):
            if alias in inputs:
                values.append(np.asarray(inputs[alias]))
            elif alias in signature.defaults:
                values.append(tf.make_ndarray(signature.defaults[alias]))
            else:
                raise tf.errors.InvalidArgumentError(
                    None, None, f"input {alias} not found in request and no default value")
        aliases = sorted(signature.outputs)
        return dict(zip(aliases, self._callable(name)(*values)))

    def _callable(self, name):
        from tensorflow.core.protobuf import config_pb2

        with self._lock:
            if name not in self._callables:  # typed feeds, no coercion (C++ Session::Run)
                signature = self.signature(name)
                self._callables[name] = self.session._make_callable_from_options(
                    config_pb2.CallableOptions(
                        feed=[signature.inputs[a].name for a in sorted(signature.inputs)],
                        fetch=[signature.outputs[a].name for a in sorted(signature.outputs)]))
            return self._callables[name]

    def predict(self, request):
        """A `PredictResponse` for a `PredictRequest` (tensorflow-serving-api protos)."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        name = request.model_spec.signature_name or "serving_default"
        outputs = self.run(name, {alias: tf.make_ndarray(proto)
                                  for alias, proto in request.inputs.items()})
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.model_spec.signature_name = name
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response

    def close(self):
        self.session.close()


def batching_session_run(served, name, requests, allowed_batch_sizes=()):
    """Run `requests` (a list of {alias: array}) as TensorFlow Serving's batching session
    runs the requests it merged into one batch, and return one output dict per request.

    Its rules: every input of a request must have at least one dimension and all must have
    the same size on dimension 0 (the request's batch size); the inputs of all requests are
    concatenated along dimension 0, padded up to the smallest allowed batch size by repeating
    the last request's first row, run once (an error fails every merged request), and every output (which must have the merged batch size on
    dimension 0) is split back along dimension 0. Inputs are fed as sent: no defaults.
    """
    import tensorflow as tf

    signature = served.signature(name)
    aliases = sorted(signature.inputs)
    sizes = []
    for r, request in enumerate(requests):
        if set(request) != set(aliases):
            raise tf.errors.InvalidArgumentError(
                None, None, f"request {r} has inputs {sorted(request)}; the batching "
                f"session feeds exactly the signature's {aliases}")
        arrays = [np.asarray(request[a]) for a in aliases]
        if any(a.ndim == 0 for a in arrays):
            raise tf.errors.InvalidArgumentError(
                None, None, "Batching session Run() input tensors must have at least one "
                "dimension")
        if len({a.shape[0] for a in arrays}) != 1:
            raise tf.errors.InvalidArgumentError(
                None, None, "Batching session Run() input tensors must have equal 0th-dimension "
                "size")
        sizes.append(arrays[0].shape[0])
    total = sum(sizes)
    padded = min((s for s in allowed_batch_sizes if s >= total), default=total)
    merged = {}
    for a in aliases:
        parts = [np.asarray(request[a]) for request in requests]
        pad = [parts[-1][:1]] * (padded - total)
        merged[a] = np.concatenate(parts + pad, axis=0)
    outputs = served.run(name, merged)
    for alias, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != padded:
            raise tf.errors.FailedPreconditionError(
                None, None, f"Batched output tensor {alias} has 0th-dimension size "
                f"{value.shape[:1]}, expected {padded}")
    bounds = np.cumsum([0, *sizes])
    return [{alias: value[lo:hi] for alias, value in outputs.items()}
            for lo, hi in zip(bounds[:-1], bounds[1:])]
