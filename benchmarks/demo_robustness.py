"""How robust the demo's fine-tune is to the CPU's numerics: held-out accuracy under
perturbations.

Machines differ in floating-point rounding (AMD with AVX2 only, Intel with AVX-512 and AMX;
oneDNN on or off; thread counts), and a training trajectory amplifies rounding. This runs
`gemma_keras.demo.run_demo(exports=False)` once per perturbation, each in its own process, and
prints the held-out exact match before and after the LoRA fine-tune.

    .venv/bin/python benchmarks/demo_robustness.py [--perturbations default,seed1,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import machine

# name -> (environment, training seed)
PERTURBATIONS = {
    "default": ({}, 0),
    "onednn-off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 0),
    "one-thread": ({"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                    "OMP_NUM_THREADS": "1"}, 0),
    "seed1": ({}, 1),
    "seed2": ({}, 2),
    "all-three": ({"TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1",
                   "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}, 1),
}

CHILD = """
import json, sys
from gemma_keras.demo import run_demo
result = run_demo(sys.argv[1], exports=False, seed=int(sys.argv[2]), echo=lambda line: None)
print("RESULT" + json.dumps({k: result[k] for k in ("before", "after", "seconds")}))
"""


def run(name):
    env, seed = PERTURBATIONS[name]
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run([sys.executable, "-c", CHILD, work, str(seed)],
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
                              capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--perturbations", default=",".join(PERTURBATIONS),
                        help=f"comma-separated, from {', '.join(PERTURBATIONS)}")
    args = parser.parse_args()
    names = args.perturbations.split(",")
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        parser.error(f"unknown perturbations {unknown}")
    print(f"# {machine.describe()}")
    print("| perturbation | environment | seed | before | after | seconds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        env, seed = PERTURBATIONS[name]
        start = time.perf_counter()
        result = run(name)
        settings = " ".join(f"{k}={v}" for k, v in env.items()) or "-"
        if "error" in result:
            print(f"| {name} | {settings} | {seed} | - | - | failed: {result['error']} |")
        else:
            print(f"| {name} | {settings} | {seed} | {result['before']:.0%} | "
                  f"{result['after']:.0%} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
