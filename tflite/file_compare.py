"""Tensor-by-tensor comparison of two `.tflite` files: the same graph holding the same data.

Two files are equal here when every signature has the same inputs and outputs, every
subgraph runs the same operators in the same order (builtin, version, options), and every
operator reads and writes tensors of the same type, shape and quantization, stored tensors
holding the same bytes. Tensor names, the order of the tensor and buffer lists and where the
bytes sit in the file are not compared (they change nothing the runtime computes).

Example:
>>> graph_differences("converter.tflite", "lean.tflite")  # [] when equal
"""

from __future__ import annotations

import hashlib

import numpy as np

from gemma_keras.tflite.flatbuffer import OP_NAMES, TFLiteFile, builtin


def graph_differences(path_a, path_b, limit=20):
    """A list of (at most `limit`) differences between two files; empty when equal.

    Operators are compared as a set per signature: an activation is named by a hash of the
    operator that computes it (and, through it, of everything before), so two files that
    order independent operators differently still compare equal."""
    a, b = _describe(path_a), _describe(path_b)
    if sorted(a) != sorted(b):
        return [f"signatures differ: {sorted(a)} != {sorted(b)}"]
    out = []
    for name in sorted(a):
        only_a = sorted(set(a[name]) - set(b[name]))
        only_b = sorted(set(b[name]) - set(a[name]))
        if len(a[name]) != len(b[name]):
            out.append(f"{name}: {len(a[name])} operators != {len(b[name])}")
        for x in only_a[:limit]:
            out.append(f"{name}: only in {path_a}: {a[name][x]}")
        for x in only_b[:limit]:
            out.append(f"{name}: only in {path_b}: {b[name][x]}")
    return out[:limit]


def _describe(path):
    """`{signature: {operator hash: description}}`, tensors described by content."""
    with TFLiteFile(path) as file:
        model = file.unpack()
        return _describe_model(file, model)


def _describe_model(file, model):
    signatures = {s.subgraphIndex: s for s in model.signatureDefs or []}
    out = {}
    for s, subgraph in enumerate(model.subgraphs):
        signature = signatures.get(s)
        made = {int(t): f"input{i}" for i, t in enumerate(subgraph.inputs)}
        if signature is not None:
            made = {int(e.tensorIndex): f"input {e.name.decode()}" for e in signature.inputs}

        def tensor(t):
            if t < 0:
                return None
            stored = subgraph.tensors[t]
            size = file.span(stored.buffer)[1] if stored.buffer > 0 else 0
            raw = file.buffer_bytes(stored.buffer) if size else None
            content = hashlib.sha256(raw).hexdigest()[:16] if raw is not None else \
                made.get(t, "unset")
            quantization = _quantization(stored)
            details = getattr(stored.quantization, "details", None)
            if details is not None and getattr(details, "scales", -1) >= 0:
                quantization = (quantization, tensor(int(details.scales)))
            return (stored.type, tuple(int(d) for d in stored.shape), quantization, content)

        ops = {}
        for op in subgraph.operators:
            code = builtin(model, op)
            description = (OP_NAMES.get(code, code), model.operatorCodes[op.opcodeIndex].version,
                           repr(_fields(op.builtinOptions)),
                           tuple(tensor(int(t)) for t in op.inputs))
            key = hashlib.sha256(repr(description).encode()).hexdigest()[:16]
            ops[key] = description
            for slot, t in enumerate(op.outputs):
                made[int(t)] = f"{key}:{slot}"
        if signature is not None:
            outputs = tuple(sorted((e.name.decode(), tensor(int(e.tensorIndex)))
                                   for e in signature.outputs))
            ops[hashlib.sha256(repr(outputs).encode()).hexdigest()[:16]] = ("outputs", outputs)
        out[signature.signatureKey.decode() if signature is not None else str(s)] = ops
    return out


def _fields(obj):
    if obj is None:
        return None
    return {k: _fields(v) if hasattr(v, "__dict__") else
            (np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v)
            for k, v in vars(obj).items()}


def _quantization(tensor):
    q = tensor.quantization
    if q is None or (q.scale is None and q.details is None):
        return None
    details = None
    if q.details is not None:
        details = (q.detailsType, getattr(q.details, "blockSize", None))
    return (None if q.scale is None else np.asarray(q.scale, np.float32).tobytes(),
            None if q.zeroPoint is None else np.asarray(q.zeroPoint).tolist(),
            q.quantizedDimension, details)
