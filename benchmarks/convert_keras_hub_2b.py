"""A random full-size Gemma 2 2B bfloat16 keras-hub preset -> gemma-keras -> keras-hub; print a
table.

Each phase runs in its own process so its peak resident memory (VmHWM) is its own:
  write     a gemma-keras 2B model with random bfloat16 weights written as a keras-hub preset
            (`write_preset`: what `gemma-keras convert --to keras-hub` runs after loading)
  to_keras  `convert_keras_hub_to_keras(preset, ...)` (`gemma-keras convert PRESET OUT`)
  to_hub    `convert_keras_to_keras_hub(...)` back (`gemma-keras convert --to keras-hub`)
  compare   every tensor of the round trip's model.weights.h5 against the preset's, bit for bit

Run alone (it needs ~8 GB of memory and ~16 GB of disk):
    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/convert_keras_hub_2b.py
"""

from __future__ import annotations

import json
import os
import time

from convert_2b import DTYPE, PRESET, phased_main

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def phase_write(work):
    import ml_dtypes
    import numpy as np

    from gemma_keras.config import Gemma2Config
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.converters.files import read_tokenizer
    from gemma_keras.converters.keras_hub import write_preset
    from gemma_keras.converters.streaming import assign_rows, rows_per_block

    model = Gemma2CausalLM.empty(Gemma2Config.preset(PRESET), dtype=DTYPE)
    # Normal values drawn once; each block is a slice at a random offset, so every tensor
    # differs (a mix-up shows in the comparison) at memcpy speed.
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(2**26, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    for variable in model.weights:
        shape = tuple(variable.shape)
        row = int(np.prod(shape[1:], dtype=np.int64))
        rows = rows_per_block(shape, 2)
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            offset = int(rng.integers(0, pool.size - n * row))
            assign_rows(variable, start, pool[offset:offset + n * row].reshape((n,) + shape[1:]))
    # the bundled tiny model's tokenizer stands in for Gemma's (only its file is copied)
    import gemma_keras

    model.tokenizer = read_tokenizer(os.path.join(os.path.dirname(gemma_keras.__file__), "assets",
                                                  "tiny"))
    out = os.path.join(work, "preset")
    os.makedirs(out)
    start = time.perf_counter()
    hub, notes, nbytes = write_preset(model, out)
    return {"tensors": len(model.weights), "bytes": nbytes,
            "write_seconds": time.perf_counter() - start}


def phase_to_keras(work):
    from gemma_keras.converters.keras_hub import convert_keras_hub_to_keras

    s = convert_keras_hub_to_keras(os.path.join(work, "preset"), os.path.join(work, "keras"))
    return {"tensors": s.tensors, "bytes": s.bytes}


def phase_to_hub(work):
    from gemma_keras.converters.keras_hub import convert_keras_to_keras_hub

    s = convert_keras_to_keras_hub(os.path.join(work, "keras"), os.path.join(work, "hub_back"))
    return {"tensors": s.tensors, "bytes": s.bytes}


def phase_compare(work):
    from gemma_keras.converters.keras_hub_layout import WeightsFile

    files = [os.path.join(work, d, "model.weights.h5") for d in ("preset", "hub_back")]
    with WeightsFile(files[0]) as a, WeightsFile(files[1]) as b:
        if sorted(a.datasets) != sorted(b.datasets):
            return {"identical": False, "why": "different tensors"}
        for layer in a.datasets:
            x, y = a.dataset(layer), b.dataset(layer)
            if x.shape != y.shape or dict(x.attrs) != dict(y.attrs):
                return {"identical": False, "why": layer}
            for start in range(0, x.shape[0], 4096):
                if x[start:start + 4096].tobytes() != y[start:start + 4096].tobytes():
                    return {"identical": False, "why": layer}
    for name in ("config.json", "task.json", "tokenizer.json", "preprocessor.json"):
        texts = [json.load(open(os.path.join(work, d, name))) for d in ("preset", "hub_back")]
        if texts[0] != texts[1]:
            return {"identical": False, "why": name}
    return {"identical": True, "tensors": len(a.datasets)}


PHASES = {"write": phase_write, "to_keras": phase_to_keras, "to_hub": phase_to_hub,
          "compare": phase_compare}


def main():
    def heading(model_bytes):
        return (f"{PRESET} as a keras-hub preset, {DTYPE}, model bytes "
                f"{model_bytes / 1e9:.2f} GB (target peak RSS of to_keras < 1.5x = "
                f"{1.5 * model_bytes / 1e9:.2f} GB)")

    def describe(name, r):
        if name == "compare":
            return ("bit-identical, JSON files equal" if r.get("identical")
                    else f"DIFFERENT ({r.get('why')})")
        text = f"{r['tensors']} tensors, {r['bytes'] / 1e9:.2f} GB"
        if name == "write":
            text += f" (random fill, then {r['write_seconds']:.1f} s writing the preset)"
        return text

    phased_main(__doc__, __file__, PHASES, heading, describe)


if __name__ == "__main__":
    main()
