"""Scaling Gemma 2 past one device with Keras' distribution API (JAX backend).

`layout_map(mesh)` shards the weights Megatron-style over the mesh's "model" axis: the
tied embedding over the hidden size (vocabularies such as the tiny model's 286 do not divide
evenly, hidden sizes do), q/k/v and gate/up projections over their outputs (heads,
intermediate units), o and down projections over their inputs, so each block needs one
all-reduce after attention and one after the MLP. With `fsdp=True` the other dimension is also
split over the "batch" axis (weights gathered when used). Norm scales stay replicated.

Example (8 devices, 2-way data x 4-way model parallel):
>>> import keras
>>> distribution = model_parallel(batch=2, model=4)
>>> keras.distribution.set_distribution(distribution)
>>> model = Gemma2CausalLM.from_pretrained(...)     # weights are created sharded
>>> model.compile(); model.fit(dataset)              # the batch is split over "batch"

Data parallelism alone is `keras.distribution.DataParallel()`; the model needs nothing more.
"""

from __future__ import annotations

import keras

BATCH_AXIS, MODEL_AXIS = "batch", "model"


def layout_map(mesh, model_axis=MODEL_AXIS, batch_axis=BATCH_AXIS, fsdp=False):
    """A `keras.distribution.LayoutMap` for `Gemma2CausalLM` variables on `mesh`."""
    other = batch_axis if fsdp else None
    column = (model_axis, other)   # kernel [out, in], split over out
    row = (other, model_axis)      # kernel [out, in], split over in
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[r".*embed_tokens/embeddings"] = (other, model_axis)  # [vocab, hidden]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        layouts[rf".*{name}/kernel"] = column
        layouts[rf".*{name}/lora_b"] = (model_axis, None)  # [out, rank]
    for name in ("o_proj", "down_proj"):
        layouts[rf".*{name}/kernel"] = row
        layouts[rf".*{name}/lora_a"] = (None, model_axis)  # [rank, in]
    return layouts


def device_mesh(batch=None, model=1, devices=None):
    """A 2-D `keras.distribution.DeviceMesh` ("batch", "model"); `batch` defaults to all
    devices not used by `model`."""
    devices = devices or keras.distribution.list_devices()
    if batch is None:
        if len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices")
        batch = len(devices) // model
    if batch * model != len(devices):
        raise ValueError(f"a {batch} x {model} mesh needs {batch * model} devices, "
                         f"{len(devices)} are available")
    return keras.distribution.DeviceMesh((batch, model), (BATCH_AXIS, MODEL_AXIS), devices)


def model_parallel(batch=None, model=1, devices=None, fsdp=False):
    """`keras.distribution.ModelParallel` over a ("batch", "model") mesh with Gemma's layouts."""
    mesh = device_mesh(batch, model, devices)
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh, fsdp=fsdp),
                                            batch_dim_name=BATCH_AXIS)
