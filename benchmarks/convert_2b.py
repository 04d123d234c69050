"""Convert a random full-size Gemma 2 2B bfloat16 checkpoint HF -> Keras -> HF; print a table.

Each phase runs in its own process so its peak resident memory (VmHWM) is its own:
  write     a random bfloat16 HF checkpoint (5.2 GB, two safetensors shards), written tensor
            by tensor in blocks with the converters' streaming writer (no torch)
  to_keras  `convert_hf_to_keras(..., dtype="bfloat16")` (what `gemma-keras convert` runs)
  to_hf     `convert_keras_to_hf(...)` back to bfloat16 safetensors
  compare   every tensor of the round trip against the source, bit for bit, one at a time
  load_int8 `Gemma2CausalLM.from_pretrained(hf_dir, quantize="int8")`, each tensor quantized
            as it is read (the int8 model is 2.6 GB; the float32 one would be 10.5)

Run alone (it needs ~8 GB and ~16 GB of disk):
    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/convert_2b.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PRESET = "gemma2_2b"
DTYPE = "bfloat16"


def phase_write(work):
    """A random bfloat16 checkpoint, streamed block by block."""
    import ml_dtypes
    import numpy as np

    from gemma_keras.config import Gemma2Config
    from gemma_keras.converters.hf_export import hf_config_dict
    from gemma_keras.converters.safetensors_io import TensorEntry, write_sharded
    from gemma_keras.converters.streaming import BLOCK_BYTES
    from gemma_keras.converters.weight_map import weight_specs

    config = Gemma2Config.preset(PRESET)
    # The table needs a backbone for its shapes; a 1-layer, 256-token one has the same
    # per-block shapes, so the full-size names and shapes follow from it.
    small = Gemma2Config(**{**config.to_dict(), "num_hidden_layers": 1, "vocab_size": 256,
                            "layer_types": None})
    from gemma_keras.causal_lm import Gemma2CausalLM

    specs = weight_specs(Gemma2CausalLM.empty(small, dtype=DTYPE).backbone)
    # Normal values drawn once (64 Mi of them); each block is a slice at a random offset, so
    # every tensor differs (a mix-up shows in the bit-for-bit comparison) at memcpy speed.
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(2**26, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def random_blocks(shape):
        row = int(np.prod(shape[1:], dtype=np.int64))
        rows = max(1, BLOCK_BYTES // (2 * row))

        def blocks():
            for start in range(0, shape[0], rows):
                n = min(rows, shape[0] - start) * row
                offset = int(rng.integers(0, pool.size - n))
                yield pool[offset:offset + n].reshape((-1,) + tuple(shape[1:]))
        return blocks

    def entry(name, shape):
        return TensorEntry(name, shape, DTYPE, random_blocks(shape))

    layer0 = [s for s in specs if s.hf_name.startswith("model.layers.0.")]
    embed = next(s for s in specs if s.hf_name == "model.embed_tokens.weight")
    entries = [entry(embed.hf_name, (config.vocab_size,) + embed.hf_shape[1:])]
    entries += [entry(s.hf_name, s.hf_shape) for s in specs
                if s not in layer0 and s is not embed]
    for i in range(config.num_hidden_layers):
        entries += [entry(s.hf_name.replace("model.layers.0.", f"model.layers.{i}."), s.hf_shape)
                    for s in layer0]
    out = os.path.join(work, "hf")
    os.makedirs(out)
    write_sharded(out, entries, max_shard_bytes=5 * 10**9)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, DTYPE), f, indent=2)
    return {"tensors": len(entries), "bytes": sum(e.nbytes for e in entries)}


def phase_to_keras(work):
    from gemma_keras.converters.convert import convert_hf_to_keras

    s = convert_hf_to_keras(os.path.join(work, "hf"), os.path.join(work, "keras"), dtype=DTYPE)
    return {"tensors": s.tensors, "bytes": s.bytes, "parameters": s.parameters}


def phase_to_hf(work):
    from gemma_keras.converters.convert import convert_keras_to_hf

    s = convert_keras_to_hf(os.path.join(work, "keras"), os.path.join(work, "hf_back"))
    return {"tensors": s.tensors, "bytes": s.bytes, "parameters": s.parameters}


def phase_compare(work):
    from gemma_keras.converters.safetensors_io import SafetensorsCheckpoint

    a = SafetensorsCheckpoint(os.path.join(work, "hf"))
    b = SafetensorsCheckpoint(os.path.join(work, "hf_back"))
    if sorted(a.names) != sorted(b.names):
        return {"identical": False, "why": "different tensor names"}
    for name in a.names:
        if a.read(name).tobytes() != b.read(name).tobytes():
            return {"identical": False, "why": name}
    return {"identical": True, "tensors": len(a.names)}


def phase_load_int8(work):
    """`from_pretrained(hf_dir, quantize="int8")`: every tensor quantized as it streams in."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.quantization import quantized_layers, weight_bytes

    model = Gemma2CausalLM.from_pretrained(os.path.join(work, "hf"), quantize="int8")
    return {"tensors": len(quantized_layers(model)), "bytes": weight_bytes(model),
            "what": "int8 layers"}


PHASES = {"write": phase_write, "to_keras": phase_to_keras, "to_hf": phase_to_hf,
          "compare": phase_compare, "load_int8": phase_load_int8}


def run_phase(name, work, script=__file__) -> dict:
    """Run one phase of `script` in a fresh interpreter; its last stdout line is a JSON result."""
    proc = subprocess.run([sys.executable, script, "--phase", name, "--work", work],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"phase {name} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phased_main(doc, script, phases, heading, describe):
    """The command line of a phased benchmark: `--phase NAME --work DIR` runs one phase and
    prints its JSON result (with seconds and peak RSS); without `--phase` every phase runs in
    order, each in its own process, and a Markdown table is printed. `heading(model_bytes)`
    is the line under the machine; `describe(name, result)` the table's last column."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(phases))
    parser.add_argument("--work", help="working directory (default: a new temp dir)")
    args = parser.parse_args()
    if args.phase:
        start = time.perf_counter()
        result = phases[args.phase](args.work)
        result.update(seconds=time.perf_counter() - start, peak_rss=machine.peak_rss_bytes())
        print(json.dumps(result))
        return

    from gemma_keras.config import Gemma2Config

    model_bytes = Gemma2Config.preset(PRESET).num_parameters() * 2
    name = os.path.splitext(os.path.basename(script))[0]
    work = args.work or tempfile.mkdtemp(prefix=f"{name}.", dir=os.environ.get("TMPDIR"))
    rows = []
    try:
        for phase in phases:
            r = run_phase(phase, work, script)
            rows.append((phase, r))
            print(f"{phase}: {r}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n# {machine.describe()}")
    print(f"\n{heading(model_bytes)}\n")
    print("| phase | seconds | peak RSS GB | peak / model bytes | result |")
    print("| --- | --- | --- | --- | --- |")
    for phase, r in rows:
        print(f"| {phase} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{r['peak_rss'] / model_bytes:.2f} | {describe(phase, r)} |")


def main():
    def heading(model_bytes):
        return (f"{PRESET}, {DTYPE}, model bytes {model_bytes / 1e9:.2f} GB "
                f"(target peak RSS < 1.5x = {1.5 * model_bytes / 1e9:.2f} GB)")

    def describe(name, r):
        if name == "compare":
            return "bit-identical" if r.get("identical") else f"DIFFERENT ({r.get('why')})"
        return f"{r['tensors']} {r.get('what', 'tensors')}, {r['bytes'] / 1e9:.2f} GB"

    phased_main(__doc__, __file__, PHASES, heading, describe)


if __name__ == "__main__":
    main()
