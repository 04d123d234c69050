"""Gemma 2's building blocks: projections, RMSNorm, rotary embedding, tied embedding, soft-cap."""

from __future__ import annotations

import keras
from keras import ops

from gemma_keras import quantization
from gemma_keras.matmul import matmul_transposed

_PACKAGE = "gemma_keras"


def soft_cap(x, cap):
    """Gemma 2's logit soft-cap: `cap * tanh(x / cap)` (identity when cap is None)."""
    if cap is None:
        return x
    return ops.tanh(x / cap) * cap


def apply_rope(x, positions, theta):
    """Rotate `x` [batch, seq, heads, head_dim] by RoPE at integer `positions` [batch, seq].

    The angles are computed in float32 (as transformers does) and the rotation pairs the
    first and second halves of each head ("rotate_half" layout).
    """
    head_dim = x.shape[-1]
    exponents = ops.arange(0, head_dim, 2, dtype="float32") / head_dim
    inverse_freq = 1.0 / ops.power(ops.cast(theta, "float32"), exponents)
    angles = ops.cast(positions, "float32")[..., None] * inverse_freq  # [b, s, d/2]
    angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, d]
    cos = ops.cast(ops.cos(angles), x.dtype)
    sin = ops.cast(ops.sin(angles), x.dtype)
    first, second = ops.split(x, 2, axis=-1)
    rotated = ops.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Linear(keras.layers.Layer):
    """A bias-free projection `x @ kernel.T`, `kernel` [out, in] as in torch and the checkpoints.

    Keras' `Dense` stores [in, out]; [out, in] reads each output's weights contiguously, which
    XLA's CPU matrix-vector product (one decode step) runs about 1.4x faster, and which TFLite's
    FULLY_CONNECTED stores as it is.

    `enable_lora(rank, alpha)` adds PEFT's adapters `lora_a` [rank, in] (random) and `lora_b`
    [out, rank] (zeros); the layer then returns `x @ kernel.T + alpha / rank * (x @ lora_a.T)
    @ lora_b.T`, never forming the full-size update. `merge_lora()` folds them in.

    `quantize("int8" | "int4")` (Keras' API; `model.quantize` calls it) stores the kernel as
    integers with one scale per output row; see `gemma_keras.quantization`.
    """

    def __init__(self, units, kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None
        self.input_dim = None

    def build(self, input_shape):
        self.input_dim = input_shape[-1]
        if self.quantization_mode:  # loading a quantized model: no float kernel at all
            self.quantized_build((self.units, self.input_dim), self.quantization_mode)
        else:
            self._kernel = self.add_weight(name="kernel", shape=(self.units, self.input_dim),
                                           initializer=self.kernel_initializer)
        self.built = True

    @property
    def kernel(self):
        """The float kernel variable [out, in] (an error once the layer is quantized)."""
        if self.quantization_mode is not None:
            raise quantization.quantized_error(self, "kernel")
        return self._kernel

    def call(self, x):
        return self._add_lora(x, matmul_transposed(x, ops.cast(self.kernel, x.dtype)))

    def _add_lora(self, x, y):
        if self.lora_enabled:
            a = ops.cast(self.lora_a, x.dtype)
            b = ops.cast(self.lora_b, x.dtype)
            scale = self.lora_alpha / self.lora_rank
            y = y + matmul_transposed(matmul_transposed(x, a), b) * scale
        return y

    def enable_lora(self, rank, lora_alpha=None):
        """Add rank-`rank` adapters (float32, scaled by `lora_alpha / rank`)."""
        if not self.built:
            raise ValueError(f"{self.name}: build the layer before enabling LoRA")
        if self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is already enabled")
        self._tracker.unlock()
        out_dim, in_dim = self.units, self.input_dim
        self.lora_a = self.add_weight(name="lora_a", shape=(rank, in_dim), dtype="float32",
                                      initializer="he_uniform")
        self.lora_b = self.add_weight(name="lora_b", shape=(out_dim, rank), dtype="float32",
                                      initializer="zeros")
        self._tracker.lock()
        self.lora_enabled, self.lora_rank = True, rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    def float_kernel(self):
        """The kernel [out, in] as a float32 NumPy array (dequantized if quantized)."""
        if self.quantization_mode is None:
            return ops.convert_to_numpy(self.kernel).astype("float32")
        q = quantization.unpack(self._kernel, self.quantization_mode, self.input_dim)
        return quantization.dequantize_rows(ops.convert_to_numpy(q),
                                            ops.convert_to_numpy(self.kernel_scale))

    def merged_kernel(self):
        """The kernel with the adapters folded in (`kernel + alpha / rank * lora_b @ lora_a`),
        as a float32 NumPy array [out, in]; the plain kernel without adapters."""
        kernel = self.float_kernel()
        if not self.lora_enabled:
            return kernel
        a = ops.convert_to_numpy(self.lora_a).astype("float32")
        b = ops.convert_to_numpy(self.lora_b).astype("float32")
        return kernel + (self.lora_alpha / self.lora_rank) * (b @ a)

    def merge_lora(self):
        """Fold the adapters into `kernel` (in float32) and remove them. A quantized kernel
        becomes a float one (`dequantize` first)."""
        if not self.lora_enabled:
            raise ValueError(f"{self.name}: LoRA is not enabled")
        if self.quantization_mode is not None:
            self.dequantize(trainable=False)
        self.kernel.assign(self.merged_kernel().astype(self.kernel.dtype))
        self._remove("lora_a", "lora_b")
        self.lora_enabled, self.lora_rank, self.lora_alpha = False, None, None

    def _remove(self, *names):
        for name in names:
            # what `del self.<name>` does, without its gc.collect() per variable (0.4 s each)
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)

    # ------------------------------------------------------------ quantization
    def quantize(self, mode=None, type_check=True, config=None):
        """Store the kernel as `mode` integers, one scale per output row (Keras' hook)."""
        quantization.check_mode(self, mode, config)
        q, scale = quantization.quantize_rows(self._kernel, mode, config)
        self._remove("_kernel")
        self.quantized_build((self.units, self.input_dim), mode, config)
        self._kernel.assign(quantization.pack(q, mode))
        self.kernel_scale.assign(scale)
        self.dtype_policy = quantization.quantized_policy(self, mode)

    def quantized_build(self, kernel_shape, mode, config=None):
        quantization.check_mode(self, mode, config)
        out_dim, in_dim = kernel_shape
        stored_cols = in_dim if mode == "int8" else (in_dim + 1) // 2
        self.inputs_quantizer = quantization.activation_quantizer(config, mode)
        self._kernel = self.add_weight(name="kernel", shape=(out_dim, stored_cols), dtype="int8",
                                       initializer="zeros", trainable=False)
        self.kernel_scale = self.add_weight(name="kernel_scale", shape=(out_dim,),
                                            initializer="ones", trainable=False)
        self._is_quantized = True

    @property
    def float_shape(self):
        """The float kernel's shape, [out, in], also once quantized."""
        return (self.units, self.input_dim)

    def quantized_weights(self):
        """`(integers, scales)`: the variables the quantized kernel is stored in."""
        return self._kernel, self.kernel_scale

    def _quantized_call(self, x):
        q = quantization.unpack(self._kernel, self.quantization_mode, self.input_dim)
        y = quantization.quantized_matmul_transposed(x, q, self.kernel_scale,
                                                     self.inputs_quantizer)
        return self._add_lora(x, y)

    _int8_call = _int4_call = _quantized_call

    def dequantize(self, trainable=True):
        """Replace the quantized kernel by a float one holding `q / scale`."""
        values = self.float_kernel()
        policy = quantization.source_policy(self)
        self._tracker.unlock()
        self._remove("_kernel", "kernel_scale")
        self.dtype_policy = policy
        self._is_quantized = False
        self._kernel = self.add_weight(name="kernel", shape=values.shape, trainable=trainable,
                                       initializer="zeros")
        self._tracker.lock()
        self._kernel.assign(values.astype(self._kernel.dtype))

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSNorm(keras.layers.Layer):
    """Gemma's RMSNorm: computed in float32 and scaled by `(1 + weight)`, weight starting at 0."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        normed = x32 * ops.rsqrt(variance + self.epsilon)
        return ops.cast(normed * (1.0 + ops.cast(self.scale, "float32")), x.dtype)

    def quantize(self, mode=None, type_check=True, config=None):
        """`model.quantize` leaves the norm scales in float (no warning per norm)."""

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TiedEmbedding(keras.layers.Embedding):
    """Token embedding whose matrix also serves as the output head (`attend`).

    `quantize("int8" | "int4")` is Keras' `Embedding` quantization (one scale per vocabulary
    row), which is also per output channel of `attend`."""

    @property
    def embeddings(self):
        """The float embedding variable [vocab, hidden] (an error once quantized)."""
        if self.built and self.quantization_mode is not None:
            raise quantization.quantized_error(self, "embedding")
        return super().embeddings

    def attend(self, x):
        """Project hidden states [..., hidden] onto the vocabulary: `x @ embeddings.T`."""
        mode = self.quantization_mode
        if mode is None:
            return matmul_transposed(x, ops.cast(self.embeddings, x.dtype))
        q = quantization.unpack(self._embeddings, mode, self.output_dim)
        return quantization.quantized_matmul_transposed(x, q, self.embeddings_scale,
                                                        self.inputs_quantizer)

    def quantize(self, mode=None, type_check=True, config=None):
        """Keras' `Embedding.quantize`, per vocabulary row (Keras' hook)."""
        quantization.check_mode(self, mode, config)
        super().quantize(mode, type_check=False, config=config)

    def quantized_build(self, embeddings_shape, mode, config=None):
        quantization.check_mode(self, mode, config)
        super().quantized_build(embeddings_shape, mode, config)
        self.inputs_quantizer = quantization.activation_quantizer(config, mode)

    @property
    def float_shape(self):
        """The float matrix's shape, [vocab, hidden], also once quantized."""
        return (self.input_dim, self.output_dim)

    def quantized_weights(self):
        """`(integers, scales)`: the variables the quantized matrix is stored in."""
        return self._embeddings, self.embeddings_scale

    def _get_embeddings_with_merged_lora(self):
        # Keras' saving reads this; it asks the policy object, which is a DTypePolicyMap
        # (not the layer's own mode) in a model loaded quantized. No LoRA on the embedding.
        if self.quantization_mode is None:
            return self.embeddings, None, None
        return (*self.quantized_weights(), None)

    def dequantize(self, trainable=True):
        """Replace the quantized matrix by a float one holding `q / scale`."""
        q = quantization.unpack(self._embeddings, self.quantization_mode, self.output_dim)
        values = quantization.dequantize_rows(ops.convert_to_numpy(q),
                                              ops.convert_to_numpy(self.embeddings_scale))
        policy = quantization.source_policy(self)
        self._tracker.unlock()
        for name in ("_embeddings", "embeddings_scale"):
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        self.dtype_policy = policy
        self._is_quantized = False
        self._embeddings = self.add_weight(name="embeddings", shape=values.shape,
                                           initializer="zeros", trainable=trainable)
        self._tracker.lock()
        self._embeddings.assign(values.astype(self._embeddings.dtype))
