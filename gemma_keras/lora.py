"""LoRA for Gemma 2: adapters on the projections, their file, and merging.

`enable_lora(model, rank)` adds a low-rank pair `A [rank, in]`, `B [out, rank]` (B starts at
zero; `gemma_keras.layers.Linear.enable_lora`) to each targeted projection, so the layer
computes `x @ W.T + alpha / rank * (x @ A.T) @ B.T`, and freezes every other weight. The
adapters save on their own, in PEFT's names and layout
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so a file holds only the
adapters. `merge_adapters(model)` folds them into the base kernels (`model.merge_lora()` also
dequantizes a quantized model), after which the model is a plain Gemma 2 again (and the
converters export the merged weights). `has_lora(model)` is the one test for adapters.

Example:
>>> model.enable_lora(rank=8)                     # q, k, v, o projections
>>> model.compile()                               # AdamW at the LoRA learning rate
>>> model.fit(train_ds, epochs=2)
>>> save_lora_weights(model, "adapter.safetensors")
>>> model.merge_lora()
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemma_keras.atomic_files import atomic_file, write_atomically
from gemma_keras.converters.weight_map import BLOCK_TENSORS

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_PEFT_PREFIX = "base_model.model.model.layers"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"

# projection name -> (HF module path inside a layer, Keras path inside a block), from the
# converters' weight table.
_PROJECTIONS = {
    suffix.split(".")[-2]: (suffix[: -len(".weight")], path[: -len(".kernel")])
    for suffix, path in BLOCK_TENSORS.items()
    if path.endswith(".kernel")
}


def resolve_targets(targets=None) -> tuple[str, ...]:
    """Projection names from `targets`: None or "attention" (q, k, v, o), "mlp", "all", or a
    list of names such as `["q_proj", "v_proj", "mlp"]`."""
    if targets is None:
        targets = ["attention"]
    elif isinstance(targets, str):
        targets = [targets]
    groups = {"attention": ATTENTION_TARGETS, "mlp": MLP_TARGETS, "all": ALL_TARGETS}
    names = []
    for target in targets:
        if target in groups:
            names += groups[target]
        elif target in ALL_TARGETS:
            names.append(target)
        else:
            raise ValueError(f"unknown LoRA target {target!r}; use 'attention', 'mlp', 'all' "
                             f"or projection names {list(ALL_TARGETS)}")
    return tuple(n for n in ALL_TARGETS if n in names)  # canonical order, no duplicates


def _layer(block, keras_path):
    obj = block
    for part in keras_path.split("."):
        obj = getattr(obj, part)
    return obj


def lora_layers(model, targets=None):
    """`[(peft_module_name, linear_layer)]` for the targeted projections of every block."""
    backbone = getattr(model, "backbone", model)
    out = []
    for i, block in enumerate(backbone.blocks):
        for name in resolve_targets(targets):
            hf_module, keras_path = _PROJECTIONS[name]
            out.append((f"{_PEFT_PREFIX}.{i}.{hf_module}", _layer(block, keras_path)))
    return out


def enabled_lora_layers(model):
    """The `lora_layers` that currently carry adapters."""
    return [(n, layer) for n, layer in lora_layers(model, "all") if layer.lora_enabled]


def has_lora(model) -> bool:
    """True if any projection of `model` carries LoRA adapters: the package's one test."""
    return any(getattr(layer, "lora_enabled", False) for layer in model._flatten_layers())


def lora_targets(model) -> tuple[str, ...]:
    return tuple(sorted({n.split(".")[-1] for n, _ in enabled_lora_layers(model)},
                        key=ALL_TARGETS.index))


def lora_spec(model) -> dict:
    """`enable_lora`'s arguments that recreate the model's adapters: rank, alpha, targets."""
    layers = enabled_lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters; call enable_lora first")
    first = layers[0][1]
    return {"rank": int(first.lora_rank), "alpha": float(first.lora_alpha),
            "targets": list(lora_targets(model))}


def enable_lora(model, rank, alpha=None, targets=None):
    """Add rank-`rank` adapters to the targeted projections and freeze all other weights.

    `alpha` scales the update by `alpha / rank` (default `rank`, i.e. 1). Returns `model`.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if has_lora(model):
        raise ValueError("LoRA is already enabled on this model; merge_lora() it first")
    layers = lora_layers(model, targets)
    for variable in model.variables:
        variable.trainable = False
    for _, layer in layers:
        layer.enable_lora(rank, lora_alpha=alpha if alpha is not None else rank)
    return model


def merge_adapters(model):
    """Fold every adapter into its kernel (`W + alpha / rank * B @ A`, in float32; a quantized
    kernel becomes a float one), remove the adapters and make all weights trainable again.
    `model.merge_lora()` also dequantizes the layers without adapters. Returns `model`."""
    layers = enabled_lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for _, layer in layers:
        layer.merge_lora()
    for variable in model.variables:
        variable.trainable = True
    return model


# ------------------------------------------------------------------ adapter files
def lora_state(model) -> tuple[dict, dict]:
    """`(tensors, config)`: the adapters in PEFT's names and layout, and PEFT's config."""
    layers = enabled_lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters; call enable_lora first")
    tensors = {}
    for name, layer in layers:
        tensors[f"{name}.lora_A.weight"] = np.asarray(layer.lora_a.numpy())
        tensors[f"{name}.lora_B.weight"] = np.asarray(layer.lora_b.numpy())
    spec = lora_spec(model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec["rank"],
              "lora_alpha": spec["alpha"], "target_modules": spec["targets"],
              "lora_dropout": 0.0, "bias": "none"}
    return tensors, config


def save_lora_weights(model, path) -> str:
    """Save only the adapters: to `path` if it ends in `.safetensors` (config in the file's
    metadata), else into directory `path` as PEFT's adapter_model.safetensors and
    adapter_config.json. Written to a temporary name and renamed. Returns the tensor file."""
    path = os.fspath(path)
    tensors, config = lora_state(model)
    if path.endswith(".safetensors"):
        target = path
    else:
        target = os.path.join(path, ADAPTER_FILE)
        write_atomically(os.path.join(path, ADAPTER_CONFIG), json.dumps(config, indent=2))
    with atomic_file(target) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "lora_config": json.dumps(config)})
    return target


def load_lora_weights(model, path):
    """Load adapters saved by `save_lora_weights` (a file or a PEFT adapter directory).

    LoRA is enabled with the file's rank, alpha and targets if the model has no adapters yet;
    otherwise every tensor must match the existing adapters. Returns `model`.
    """
    path = os.fspath(path)
    file = os.path.join(path, ADAPTER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no LoRA adapter file at {file}")
    with safe_open(file, framework="numpy") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_config" in metadata:
        config = json.loads(metadata["lora_config"])
    else:
        config_path = os.path.join(os.path.dirname(file), ADAPTER_CONFIG)
        if not os.path.isfile(config_path):
            raise ValueError(f"{file}: no LoRA config in its metadata and no {ADAPTER_CONFIG}")
        with open(config_path) as c:
            config = json.load(c)
    if not has_lora(model):
        enable_lora(model, int(config["r"]), alpha=config.get("lora_alpha"),
                    targets=list(config["target_modules"]))
    layers = dict(enabled_lora_layers(model))
    expected = {f"{n}.lora_{x}.weight" for n in layers for x in "AB"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(f"{file} does not match the model's adapters: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    for name, layer in layers.items():
        for letter, variable in (("A", layer.lora_a), ("B", layer.lora_b)):
            value = tensors[f"{name}.lora_{letter}.weight"]
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{file}: {name}.lora_{letter}.weight has shape "
                                 f"{value.shape}, expected {tuple(variable.shape)}")
            variable.assign(value.astype(variable.dtype))
    return model
