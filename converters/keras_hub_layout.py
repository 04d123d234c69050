"""keras-hub's `GemmaBackbone` weights beside the Hugging Face names of `weight_map`.

keras-hub names a variable by its layer path (`decoder_block_3/attention/query/kernel`) and
stores its projections as `EinsumDense` kernels: queries, keys and values [heads, hidden,
head_dim], the attention output [heads, head_dim, hidden], the MLP kernels [in, out]. This
package stores every projection [out, in] as torch does, so each tensor has one of four
layouts (`Layout`), and a conversion is a transpose or a reshape: exact, bit for bit.

Both the in-memory converters (variables of a live `GemmaBackbone`) and the file converters
(datasets of a preset's `model.weights.h5`) key tensors by the keras-hub layer path, so this
module is the one table either reads.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np

from gemma_keras.converters.safetensors_io import CheckpointError


class Layout(enum.Enum):
    SAME = "same"  # norms, the embedding
    TRANSPOSE = "transpose"  # MLP kernels: keras-hub [in, out], here [out, in]
    HEADS_IN = "heads_in"  # q/k/v: keras-hub [heads, hidden, head_dim], here [heads*head_dim, hidden]
    HEADS_OUT = "heads_out"  # attention output: [heads, head_dim, hidden], here [hidden, heads*head_dim]


# keras-hub layer path inside a decoder block -> (Hugging Face suffix, layout). `pre_ffw_norm`
# and friends are what keras-hub's own Hugging Face converter maps them to.
BLOCK_LAYERS = {
    "pre_attention_norm": ("input_layernorm.weight", Layout.SAME),
    "post_attention_norm": ("post_attention_layernorm.weight", Layout.SAME),
    "pre_ffw_norm": ("pre_feedforward_layernorm.weight", Layout.SAME),
    "post_ffw_norm": ("post_feedforward_layernorm.weight", Layout.SAME),
    "attention/query": ("self_attn.q_proj.weight", Layout.HEADS_IN),
    "attention/key": ("self_attn.k_proj.weight", Layout.HEADS_IN),
    "attention/value": ("self_attn.v_proj.weight", Layout.HEADS_IN),
    "attention/attention_output": ("self_attn.o_proj.weight", Layout.HEADS_OUT),
    "ffw_gating": ("mlp.gate_proj.weight", Layout.TRANSPOSE),
    "ffw_gating_2": ("mlp.up_proj.weight", Layout.TRANSPOSE),
    "ffw_linear": ("mlp.down_proj.weight", Layout.TRANSPOSE),
}
GLOBAL_LAYERS = {
    "token_embedding": ("model.embed_tokens.weight", Layout.SAME),
    "final_normalization": ("model.norm.weight", Layout.SAME),
}
EMBEDDING = "token_embedding"


@dataclasses.dataclass(frozen=True)
class HubTensor:
    """One keras-hub tensor: its layer path, the HF name of the same weights, its layout and
    its shape in keras-hub."""

    layer: str
    hf_name: str
    layout: Layout
    shape: tuple

    def to_gemma_keras(self, array: np.ndarray) -> np.ndarray:
        """keras-hub's array -> this package's layout (a C-contiguous copy when moved)."""
        if self.layout is Layout.TRANSPOSE:
            array = array.T
        elif self.layout is Layout.HEADS_IN:  # [n, h, d] -> [n*d, h]
            array = array.transpose(0, 2, 1).reshape(-1, array.shape[1])
        elif self.layout is Layout.HEADS_OUT:  # [n, d, h] -> [h, n*d]
            array = array.reshape(-1, array.shape[2]).T
        return np.ascontiguousarray(array)

    def to_keras_hub(self, array: np.ndarray) -> np.ndarray:
        """This package's array -> keras-hub's layout."""
        if self.layout is Layout.TRANSPOSE:
            array = array.T
        elif self.layout is Layout.HEADS_IN:  # [n*d, h] -> [n, h, d]
            n, h, d = self.shape
            array = array.reshape(n, d, h).transpose(0, 2, 1)
        elif self.layout is Layout.HEADS_OUT:  # [h, n*d] -> [n, d, h]
            array = array.T.reshape(self.shape)
        return np.ascontiguousarray(array)


def hub_tensors(config) -> list[HubTensor]:
    """Every tensor of a keras-hub Gemma 2 backbone of `config` (a `Gemma2Config`)."""
    c = config
    h, d, f = c.hidden_size, c.head_dim, c.intermediate_size
    n, kv = c.num_attention_heads, c.num_key_value_heads
    shapes = {
        "pre_attention_norm": (h,), "post_attention_norm": (h,), "pre_ffw_norm": (h,),
        "post_ffw_norm": (h,), "attention/query": (n, h, d), "attention/key": (kv, h, d),
        "attention/value": (kv, h, d), "attention/attention_output": (n, d, h),
        "ffw_gating": (h, f), "ffw_gating_2": (h, f), "ffw_linear": (f, h),
    }
    tensors = [HubTensor(EMBEDDING, *GLOBAL_LAYERS[EMBEDDING], (c.vocab_size, h))]
    for i in range(c.num_hidden_layers):
        for layer, (suffix, layout) in BLOCK_LAYERS.items():
            tensors.append(HubTensor(f"decoder_block_{i}/{layer}", f"model.layers.{i}.{suffix}",
                                     layout, shapes[layer]))
    tensors.append(HubTensor("final_normalization", *GLOBAL_LAYERS["final_normalization"], (h,)))
    return tensors


def variable_layer(variable_path: str) -> str:
    """`decoder_block_0/attention/query/kernel` -> `decoder_block_0/attention/query`."""
    return variable_path.rsplit("/", 1)[0]


# ----------------------------------------------------------------- Keras .weights.h5 files
class WeightsFile:
    """The datasets of a Keras `.weights.h5` file (or a sharded `.weights.json` index), keyed
    by keras-hub layer path, read lazily.

    Keras' file groups are named after layer classes (`gemma_decoder_block_1/attention/
    query_dense/vars`); each `vars` group carries its layer's name, so the keras-hub path
    (`decoder_block_1/attention/query`) is the chain of names above a dataset.
    """

    def __init__(self, path):
        self.path = Path(path)
        files = self._shards()
        self._files = []
        names, datasets = {}, {}
        try:
            for file in files:
                handle = h5py.File(file, "r")
                self._files.append(handle)

                def visit(name, obj, handle=handle):
                    if isinstance(obj, h5py.Group) and name.split("/")[-1] == "vars":
                        if "name" in obj.attrs:  # a shard may repeat a group without it
                            names[obj.parent.name] = obj.attrs["name"]
                        for key in obj.keys():
                            datasets[(obj.parent.name, key)] = (handle, f"{name}/{key}")

                handle.visititems(visit)
        except OSError as e:  # truncated or not HDF5
            self.close()
            raise CheckpointError(f"{self.path}: cannot read Keras weights ({e})") from None
        self.datasets = {}  # layer path -> {variable index: (file, dataset path)}
        for (group, key), where in datasets.items():
            self.datasets.setdefault(self._layer_path(group, names), {})[key] = where

    def _shards(self):
        if self.path.suffix != ".json":
            return [self.path]
        try:
            index = json.loads(self.path.read_text())
            return [self.path.parent / f for f in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: not a Keras sharded weights index ({e})") from None

    @staticmethod
    def _layer_path(group: str, names: dict) -> str:
        parts, path = [], group
        while path not in ("", "/"):
            if path in names:
                parts.append(names[path])
            elif path.rsplit("/", 1)[-1] != "layers":  # Keras' list of a model's layers
                raise CheckpointError(f"{group}: no layer name recorded for {path}")
            path = path.rsplit("/", 1)[0] or "/"
        return "/".join(reversed(parts))

    def dataset(self, layer: str):
        """The h5py dataset of `layer`'s only variable."""
        handle, name = self.datasets[layer]["0"]
        return handle[name]

    def read(self, tensor: HubTensor, start=None, stop=None) -> np.ndarray:
        """`tensor`'s array (rows `start:stop` when given), bfloat16 as `ml_dtypes.bfloat16`."""
        dataset = self.dataset(tensor.layer)
        try:
            array = dataset[()] if start is None else dataset[start:stop]
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read {tensor.layer} ({e})") from None
        if dataset.attrs.get("dtype") == "bfloat16":
            array = array.view(ml_dtypes.bfloat16)
        return array

    def float_dtype(self, layer: str):
        dataset = self.dataset(layer)
        if dataset.attrs.get("dtype") == "bfloat16":
            return "bfloat16"
        return dataset.dtype.name if dataset.dtype.name in ("float32", "float16") else None

    def check(self, tensors) -> None:
        """Raise CheckpointError listing every missing, unexpected or misshapen tensor."""
        expected = {t.layer: t for t in tensors}
        problems = []
        missing = sorted(set(expected) - set(self.datasets))
        extra = sorted(f"{layer}/vars/{key}" for layer, keys in self.datasets.items()
                       for key in keys if layer not in expected or key != "0")
        if missing:
            problems.append(f"missing tensors: {missing}")
        if extra:
            problems.append(f"unexpected tensors (a quantized model? another architecture?): "
                            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
        for layer, tensor in expected.items():
            if layer not in self.datasets or "0" not in self.datasets[layer]:
                continue
            shape = tuple(self.dataset(layer).shape)
            if shape != tensor.shape:
                problems.append(f"{layer} has shape {shape}, expected {tensor.shape}")
            elif self.float_dtype(layer) is None:
                problems.append(f"{layer} has dtype {self.dataset(layer).dtype}, expected a float")
        if problems:
            raise CheckpointError(f"{self.path}: weights do not match config.json: "
                                  + "; ".join(problems))

    def close(self):
        for handle in self._files:
            handle.close()
        self._files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

