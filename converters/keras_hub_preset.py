"""Writing a keras-hub preset directory without building the full-size keras-hub model.

keras-hub's `save_to_preset` needs the model built in memory (a second copy of every
weight). Here keras-hub saves a one-unit-wide `GemmaCausalLM` of the same depth and flags
instead (`scaffold_preset`): its JSON files and assets are kept with the real sizes put in,
and its `model.weights.h5` gives the file layout (Keras' group names and attributes) into
which `write_weights` streams the real tensors one at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from gemma_keras.converters.keras_hub_config import from_hub_config
from gemma_keras.converters.keras_hub_layout import WeightsFile
from gemma_keras.converters.streaming import rows_per_block

_WEIGHTS = "model.weights.h5"
_TINY = dict(vocabulary_size=4, hidden_dim=2, intermediate_dim=2, head_dim=2,
             num_query_heads=1, num_key_value_heads=1)


def scaffold_preset(hub: dict, preprocessor, directory) -> Path:
    """Save keras-hub's preset of a tiny model shaped like `hub` (a `GemmaBackbone` config),
    with `preprocessor` (a `GemmaCausalLMPreprocessor` or None), into a scratch directory inside `directory`; copy its files other than the weights into
    `directory` with `hub`'s sizes; return the scratch directory (holding the tiny weights)."""
    from keras_hub.models import GemmaBackbone, GemmaCausalLM

    directory = Path(directory)
    scratch = Path(tempfile.mkdtemp(prefix=".scaffold.", dir=directory))
    try:
        tiny = GemmaBackbone.from_config({**hub, **_TINY, "dtype": "float32"})
        GemmaCausalLM(backbone=tiny, preprocessor=preprocessor, name="gemma_causal_lm"
                      ).save_to_preset(str(scratch))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    for path in scratch.rglob("*"):
        relative = path.relative_to(scratch)
        if path.is_dir() or relative.name == _WEIGHTS:
            continue
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative.name in ("config.json", "task.json", "metadata.json"):
            data = json.loads(path.read_text())
            target.write_text(json.dumps(_with_sizes(relative.name, data, hub), indent=4))
        else:
            shutil.copyfile(path, target)
    return scratch


def _with_sizes(name: str, data: dict, hub: dict) -> dict:
    if name == "config.json":
        data["config"] = hub
    elif name == "task.json":
        data["config"]["backbone"]["config"] = hub
    else:  # metadata.json
        data["parameter_count"] = from_hub_config(hub)[0].num_parameters()
    return data


def write_weights(scaffold_weights, out_path, arrays, progress=False) -> int:
    """Write a Keras weights file laid out as `scaffold_weights`, each tensor from `arrays`
    (`(HubTensor, array or rows(start, stop) function)` pairs); return the bytes written."""
    total = 0
    with WeightsFile(scaffold_weights) as layout, h5py.File(scaffold_weights, "r") as src, \
            h5py.File(out_path, "w") as out:
        _copy_groups(src, out)
        written = set()
        for tensor, source in tqdm(arrays, desc="Keras -> keras-hub", unit="tensor",
                                   total=len(layout.datasets), disable=not progress):
            _, name = layout.datasets[tensor.layer]["0"]
            if callable(source):
                sample = source(0, 1)
                dataset = out.create_dataset(name, shape=tensor.shape, dtype=sample.dtype)
                rows = rows_per_block(tensor.shape, sample.itemsize)
                for start in range(0, tensor.shape[0], rows):
                    stop = min(start + rows, tensor.shape[0])
                    dataset[start:stop] = source(start, stop)
            else:
                sample = source
                dataset = out.create_dataset(name, data=source)
            if sample.dtype.name == "bfloat16":
                dataset.attrs["dtype"] = "bfloat16"  # as Keras marks it
            total += int(np.prod(tensor.shape)) * sample.itemsize
            written.add(tensor.layer)
        if written != set(layout.datasets):  # keras-hub's layout has a tensor we do not know
            raise ValueError(f"keras-hub's GemmaBackbone file has tensors this converter does "
                             f"not write: {sorted(set(layout.datasets) - written)}")
    return total


def _copy_groups(src: h5py.File, out: h5py.File):
    """Every group of `src` with its attributes, no datasets."""
    out.attrs.update(src.attrs)

    def visit(name, obj):
        if isinstance(obj, h5py.Group):
            out.require_group(name).attrs.update(obj.attrs)

    src.visititems(visit)
