"""int8 / int4 weights for Gemma 2, through Keras' own `model.quantize(mode)`.

`model.quantize("int8")` (Keras 3's API) stores every projection (`gemma_keras.layers.Linear`,
kernel [out, in]) and the tied embedding (`TiedEmbedding`, [vocab, hidden]) as int8 with one
float scale per output row (per-channel abs-max, Keras' `AbsMaxQuantizer`): `w = q / scale`.
The RMSNorm scales stay float. `"int4"` stores the same rows in 4 bits, packed two to a byte
(per-channel only: `keras.quantizers.Int4QuantizationConfig(block_size=-1)`).

The layers compute as Keras' `Dense` does in int8 mode: activations are quantized per token
(unless the config's `activation_quantizer` is None, which keeps them float), the product
runs in integers and is rescaled; the input gradient uses the dequantized weights, a block of
rows at a time so that the 256000-row embedding never exists in float. The int8 weights are
frozen: train LoRA adapters on top (`model.enable_lora`).

A quantized model saves and loads as a `.keras` file, generates, and fits. For the float
exports (Hugging Face, TFLite, SavedModel) turn it back into a float model:
`model.merge_lora()` (which also folds the adapters in) or `dequantize(model)`.

Example:
>>> model = Gemma2CausalLM.from_pretrained(directory)
>>> model.quantize("int8")           # 2B: 10.5 GB of float32 weights -> 2.6 GB
>>> model.enable_lora(rank=8)
>>> model.compile(); model.fit(train.tf_dataset(8))
>>> model.merge_lora()               # a float model again, adapters folded in
"""

from __future__ import annotations

import keras
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for weight_bytes)
import numpy as np
from keras import ops
from keras.dtype_policies import DTypePolicyMap
from keras.quantizers import AbsMaxQuantizer, QuantizationConfig, pack_int4, unpack_int4

from gemma_keras.lora import has_lora
from gemma_keras.matmul import matmul_transposed, read_after

MODES = ("int8", "int4")
VALUE_RANGES = {"int8": (-127, 127), "int4": (-8, 7)}
# Products with larger weight matrices go a block of rows at a time, each block at most this
# many weights (128 MB in float32): the input gradient, and the int8 product on TensorFlow.
BACKWARD_BLOCK_ELEMENTS = 1 << 25


def check_mode(what, mode, config=None):
    """Raise ValueError unless `mode` (with `config`) is one this package stores; `what` (a
    layer, or a name) leads the message."""
    name = what.name if isinstance(what, keras.layers.Layer) else str(what)
    if mode not in MODES:
        raise ValueError(f"{name}: quantization mode {mode!r} is not supported; "
                         f"use one of {list(MODES)}")
    block_size = getattr(config, "block_size", None)
    if mode == "int4" and block_size not in (None, -1):
        raise ValueError(
            f"{name}: int4 is stored per channel here (one scale per row); pass "
            "config=keras.quantizers.Int4QuantizationConfig(block_size=-1) "
            f"instead of block_size={block_size}")


def quantize_rows(values, mode, config=None):
    """`(q, scale)`: `values` [rows, cols] as integers in the mode's range (int8 dtype,
    unpacked) and one float32 scale per row, `values ~= q / scale[:, None]` (NumPy)."""
    default = AbsMaxQuantizer(axis=-1, value_range=VALUE_RANGES[mode], output_dtype="int8")
    quantizer = QuantizationConfig.weight_quantizer_or_default(config, default)
    q, scale = quantizer(values, axis=-1, to_numpy=True)  # rows are output channels here
    return np.asarray(q, np.int8), np.asarray(scale, np.float32).reshape(-1)


def pack(q, mode):
    """The stored form of `q` [rows, cols]: as it is for int8, two values a byte for int4."""
    if mode == "int4":
        return pack_int4(q, axis=-1)[0]
    return q


def unpack(stored, mode, cols):
    """`q` [rows, cols] int8 from its stored form."""
    if mode == "int4":
        return unpack_int4(stored, cols, axis=-1)
    return stored


def dequantize_rows(q, scale) -> np.ndarray:
    """`q / scale[:, None]` in float32 (NumPy)."""
    return np.asarray(q, np.float32) / np.asarray(scale, np.float32)[:, None]


def activation_quantizer(config, mode):
    """The activations' quantizer: the config's, else Keras' default for `mode` (per-token
    abs-max for int8, none for int4, as Keras' `Dense`)."""
    default = AbsMaxQuantizer() if mode == "int8" else None
    return QuantizationConfig.activation_quantizer_or_default(config, default)


def _block_rows(rows, cols):
    """Rows per block of the input gradient: all of them for a small matrix, else the largest
    divisor of `rows` whose block holds at most BACKWARD_BLOCK_ELEMENTS weights."""
    if rows * cols <= BACKWARD_BLOCK_ELEMENTS:
        return rows
    limit = max(1, BACKWARD_BLOCK_ELEMENTS // cols)
    return max(d for d in range(1, limit + 1) if rows % d == 0)


def _blocked_int_product(xq, q):
    """`xq @ q.T` in int32, a block of rows of `q` at a time: TensorFlow's CPU
    int8 matmul widens its operands first (a 2.4 GB int32 copy of the 2B's embedding)."""
    rows, cols = q.shape
    block = _block_rows(rows, cols)
    if block == rows:
        return matmul_transposed(xq, q, output_type="int32")
    flat = ops.reshape(xq, (-1, cols))
    n = ops.shape(flat)[0]

    def body(i, out):
        start = i * block
        rows_q = ops.slice(read_after(q, out), (start, 0), (block, cols))
        part = matmul_transposed(flat, rows_q, output_type="int32")
        return ops.slice_update(out, (0, start), part)

    out = ops.fori_loop(0, rows // block, body, ops.zeros((n, rows), "int32"))
    return ops.reshape(out, (*ops.shape(xq)[:-1], rows))


def _dequantized_product(g, q):
    """`g @ float(q)` for `g` [..., out] and `q` [out, in], dequantizing a block of rows of
    `q` at a time (a loop, so one block is alive at once)."""
    rows, cols = q.shape
    block = _block_rows(rows, cols)
    if block == rows:
        return ops.matmul(g, ops.cast(read_after(q, g), g.dtype))
    flat = ops.reshape(g, (-1, rows))
    n = ops.shape(flat)[0]

    def body(i, total):
        start = i * block
        part = ops.slice(flat, (0, start), (n, block))
        weights = ops.cast(ops.slice(read_after(q, total), (start, 0), (block, cols)), g.dtype)
        return total + ops.matmul(part, weights)

    total = ops.fori_loop(0, rows // block, body, ops.zeros((n, cols), g.dtype))
    return ops.reshape(total, (*ops.shape(g)[:-1], cols))


def quantized_matmul_transposed(x, q, scale, inputs_quantizer=None):
    """`x @ (q / scale[:, None]).T` for `x` [..., in], `q` [out, in] int8 (unpacked) and
    `scale` [out], in `x`'s dtype. With `inputs_quantizer`, `x` is quantized per token and the
    product runs in int32 (no float copy of `q`). Only `x` gets a gradient."""
    dtype = x.dtype

    @ops.custom_gradient
    def product(x, q, scale):
        scale = ops.cast(scale, dtype)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            upstream = ops.cast(upstream, dtype)
            return _dequantized_product(upstream / scale, q), None, None

        if inputs_quantizer:
            xq, x_scale = inputs_quantizer(x, axis=-1)
            y = ops.cast(_blocked_int_product(xq, q), dtype) / (ops.cast(x_scale, dtype) * scale)
        else:
            y = matmul_transposed(x, ops.cast(read_after(q, x), dtype)) / scale
        return y, grad

    return product(x, ops.convert_to_tensor(q), ops.convert_to_tensor(scale))


# ------------------------------------------------------------------ whole models
def quantized_layers(model):
    """The layers of `model` whose weights are quantized."""
    return [layer for layer in model._flatten_layers()
            if getattr(layer, "quantization_mode", None) is not None
            and getattr(layer, "_is_quantized", False)]


def is_quantized(model) -> bool:
    return bool(quantized_layers(model))


def source_policy(layer):
    """The float policy a quantized layer came from (`int8_from_float32` -> `float32`)."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    return keras.dtype_policies.get(getattr(policy, "_source_name", policy.name))


def quantized_policy(layer, mode):
    """`{mode}_from_{float policy}` for `layer`."""
    return keras.dtype_policies.get(f"{mode}_from_{source_policy(layer).name}")


def policy_map(model):
    """A `DTypePolicyMap` naming each quantized layer's policy by its path (the backbone's
    saved `dtype`, so that loading builds those layers quantized), or None."""
    layers = quantized_layers(model)
    if not layers:
        return None
    default = model.dtype_policy
    if isinstance(default, DTypePolicyMap):
        default = default.default_policy
    return DTypePolicyMap(default_policy=default,
                          policy_map={layer.path: quantized_policy(layer, layer.quantization_mode)
                                      for layer in layers})


def quantized_dtype(mode="int8", source="float32"):
    """A dtype policy that builds a `Gemma2CausalLM` with its projections and embedding
    quantized from the start (zero weights, no float copy ever made): the way to measure or
    fill a quantized model in the memory it will use (int4 is per channel here)."""
    policy = keras.dtype_policies.get(f"{mode}_from_{source}")
    return DTypePolicyMap(default_policy=source,
                          policy_map={".*_proj": policy, "embed_tokens": policy})


def quantize_model(model, mode):
    """`model.quantize(mode)`, int4 per channel (the only int4 layout stored here)."""
    config = keras.quantizers.Int4QuantizationConfig(block_size=-1) if mode == "int4" else None
    model.quantize(mode, config=config)
    return model


def dequantize(model):
    """Turn every quantized weight of `model` back into a float variable (`q / scale`), so
    that the model is a plain float Gemma 2 again (the exports need one). Frozen if the model
    carries LoRA adapters, else trainable. Returns `model`."""
    trainable = not has_lora(model)
    for layer in quantized_layers(model):
        layer.dequantize(trainable=trainable)
    model.train_function = model.test_function = model.predict_function = None
    return model


def quantized_error(layer, what):
    """The error for reading a quantized layer's float `what`."""
    return ValueError(
        f"{layer.path or layer.name}: the {what} is {layer.quantization_mode}-quantized; the "
        "float exports need a float model: call model.merge_lora() or "
        "gemma_keras.quantization.dequantize(model) first")


def weight_bytes(model) -> int:
    """Bytes held by `model`'s variables (int8 and packed int4 count as stored)."""
    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
               for v in model.variables)
