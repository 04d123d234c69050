"""Keras distribution API on JAX with 8 virtual CPU devices: sharded steps match unsharded."""

from __future__ import annotations

import textwrap

from conftest import run_script

SCRIPT = textwrap.dedent("""
    import json
    import keras
    import numpy as np
    from gemma_keras import distribution as dist, tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.data import encode_records
    from gemma_keras.training import adamw

    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    reference = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir())
    weights = reference.get_weights()
    data = encode_records(tiny_task.training_examples(16, task="repeat"),
                          reference.tokenizer, 32)
    x = {"token_ids": data.token_ids, "padding_mask": data.padding_mask}

    def two_steps(model):
        model.compile(optimizer=adamw(model, learning_rate=1e-2))
        return [float(model.train_on_batch(x, data.labels, data.sample_weight,
                                           return_dict=True)["loss"]) for _ in range(2)]

    out = {"unsharded": two_steps(reference)}
    for name, distribution in (
            ("data_parallel", keras.distribution.DataParallel(devices=devices)),
            ("model_parallel", dist.model_parallel(batch=2, model=4)),
            ("fsdp", dist.model_parallel(batch=2, model=4, fsdp=True))):
        keras.distribution.set_distribution(distribution)
        model = Gemma2CausalLM(reference.config)
        model.set_weights(weights)
        q = model.backbone.blocks[0].self_attn.q_proj.kernel
        out[name] = two_steps(model)
        out[name + "_q_sharding"] = list(q.value.sharding.spec)
        keras.distribution.set_distribution(None)
    print("RESULT" + json.dumps(out))
""")


def test_sharded_training_steps_match_unsharded():
    out = run_script(SCRIPT, backend="jax", timeout=900,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    reference = out["unsharded"]
    assert reference[1] < reference[0]  # the first step changed the weights
    for name in ("data_parallel", "model_parallel", "fsdp"):
        for step, (sharded, plain) in enumerate(zip(out[name], reference)):
            assert abs(sharded - plain) <= 1e-5, (name, step, sharded, plain)
    assert out["model_parallel_q_sharding"] == ["model", None]  # q kernel [out, in]: heads
    assert out["fsdp_q_sharding"] == ["model", "batch"]
    assert out["data_parallel_q_sharding"] in ([], [None, None])  # replicated
