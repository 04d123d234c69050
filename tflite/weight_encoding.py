"""The arithmetic of the weight encodings the TFLite files store, value for value as the tools
that define them compute it:

- TensorFlow's converter's "dynamic_int8": one symmetric int8 step per tensor
  (`int8_step`, `quantize_int8_per_tensor`);
- ai-edge-quantizer's dynamic int4 blockwise (`quantize_int4_blockwise`) and per-channel int4
  or int8 (`channel_scales`, `quantize_channelwise`), with its own functions.

Pure NumPy on float32 rows [n, cols]; ai-edge-quantizer is imported only where used.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def int8_step(peak):
    """The converter's per-tensor int8 step for max |w| = `peak`, as it stores it (float32):
    (max - min) / 254."""
    return float(np.float32(2 * np.float64(peak) / 254))


def quantize_int8_per_tensor(values, peak):
    """The converter's int8 values of `values` for max |w| = `peak`: divided by the step in
    double precision (not by the stored float32 one), rounded half away from zero
    (its UniformQuantizedValueConverter)."""
    q = values.astype(np.float64) / (2 * np.float64(peak) / 254)
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)
    return np.clip(q, -127, 127).astype(np.int8)


def quantize_int4_blockwise(values, block):
    """ai-edge-quantizer's dynamic int4 blockwise quantization of float32 rows [n, cols]:
    returns (packed int4 bytes, float16 scales [n, cols / block]), as it stores them (float32
    scale rounded to bfloat16, then stored as float16)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
    from ai_edge_quantizer.transformations import transformation_utils

    granularity = qtyping.QuantGranularity[f"BLOCKWISE_{block}"]
    blocks = values.reshape(values.shape[0], -1, block)
    zero_point, scale = uqt.tensor_zp_scale_from_min_max(
        blocks.min(axis=2), blocks.max(axis=2), 4, True, granularity)
    params = qtyping.UniformQuantParams(num_bits=4, quantized_dimension=1, scale=scale,
                                        zero_point=zero_point, symmetric=True,
                                        block_size=block)
    q = uqt.uniform_quantize(values, params, is_blockwise_quant=True)
    packed = transformation_utils.pack_data(4, np.ravel(q).view(np.uint8))
    return packed, scale.astype(ml_dtypes.bfloat16).astype(np.float16)


def channel_scales(row_bounds, bits=4):
    """ai-edge-quantizer's symmetric scale of each row at `bits` (4 or 8), from each row's
    max |value|."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    bounds = np.asarray(row_bounds, np.float32)[:, None]
    _, scale = uqt.tensor_zp_scale_from_min_max(-bounds, bounds, bits, True,
                                                qtyping.QuantGranularity.CHANNELWISE)
    return np.asarray(scale, np.float32).reshape(-1)


def quantize_channelwise(values, scales, bits=4):
    """ai-edge-quantizer's dynamic per-channel quantization of float32 rows [n, cols] at
    `bits` (4 or 8) with one scale per row (`channel_scales`): returns the bytes as it stores
    them (int4 packed two per byte, low nibble first)."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt
    from ai_edge_quantizer.transformations import transformation_utils

    scale = np.asarray(scales, np.float32)[:, None]
    params = qtyping.UniformQuantParams(num_bits=bits, quantized_dimension=0, scale=scale,
                                        zero_point=np.zeros_like(scale, np.int32),
                                        symmetric=True)
    q = uqt.uniform_quantize(values, params)
    if bits == 8:
        return np.ravel(q).astype(np.int8)
    return transformation_utils.pack_data(4, np.ravel(q).view(np.uint8))


# |q * s - W| <= s / 2 times this when W rounds to q: the converter rounds W * (1 / s).
ROUNDING_TOLERANCE = 1.001


def int8_rounding_error(values, q, steps):
    """|values - q * steps| in half steps: at most `ROUNDING_TOLERANCE` where each value
    rounds to its int8 `q` with step (scale) `steps`."""
    return np.abs(values - q * steps) / np.maximum(steps / 2, 1e-30)
