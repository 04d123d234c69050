"""Full-size TFLite: export the random Gemma 2 2B at int8 / int4, and how fast it decodes.

Every stage runs in its own subprocess (so each peak RSS is its own) with a timeout, and
appends one JSON line to `<out-dir>/results.jsonl`; `report` prints the Markdown tables.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/tflite_2b.py all --out-dir DIR
    .venv/bin/python benchmarks/tflite_2b.py report --out-dir DIR

Stages (each also callable alone; `--layers N` builds the 2B's width with N of its 26 layers,
`--small` a tiny config, for dry runs):

  checkpoint    a random bfloat16 Hugging Face directory of the full 2B (`convert_2b.py`'s
                streaming writer) in <out-dir>/hf, with a padded SentencePiece tokenizer.
  export        `gemma_keras.tflite.export_tflite` (--quantize) from --model-dir (what
                `gemma-keras export-tflite --model DIR` runs), or from a random float32 Keras
                model built in this process: export seconds (wall and CPU), peak RSS per
                phase, file size against the weights' bytes.
  requantize    `requantize_tflite` of --tflite (a dynamic_int8 export of this config's random
                model) to --quantize (int4), the float weights regenerated one at a time.
  litert        ai_edge_litert at --threads (XNNPACK): decode tokens/s at depth 0, prefill of
                --prefill tokens, decode tokens/s after it (and CPU seconds per decode
                step, less sensitive to other jobs), and RSS after load and after
                decoding, for each of --runtimes (the classic Interpreter's signature runners,
                `GemmaTFLite` without, writing, or loading the XNNPACK weight cache), each in
                its own process.
  engine        bundle with `write_litertlm` and run LiteRT-LM's `litert_lm.Benchmark` on it.
  llamacpp      the same checkpoint in llama.cpp (--llama-cpp: a source tree with build/bin):
                `convert_hf_to_gguf.py`, `llama-quantize` to --llama-quants (only GGUFs not
                yet in --out-dir), `llama-bench` with the same threads and prompt length,
                decode at depth 0 and at depth --prefill.
  transformers  transformers' Gemma2ForCausalLM, float32, random 2B: prefill and decode tok/s.
  bandwidth     the memory bound in this run: float32 matrix-vector products and an integer
                OR-reduce at --threads over 2 GiB; GB/s, and tokens/s = GB/s / file bytes.
  quant-sim     logit error of int8 per tensor / per channel and int4 block 32 on the random
                model, weights fake-quantized in Keras.
  quant-error   logit error of each of --modes (real .tflite files, teacher-forced through the
                interpreter) against the Keras float32 logits; every mode is exported first,
                then the Keras model is released before the files run.

Memory: the export converts a template of the graph (weights as splat placeholders) and
streams the real weights into the file tensor by tensor from the checkpoint, so every mode of
the full 2B (4 signatures, cache 1280) peaks at 1.8-1.9 GiB resident (benchmarks/README.md),
where TensorFlow's converter on the real weights needed about 21 GiB. A Keras model built in
process adds its own 10.5 GB of float32 weights. Timing the 2B: run `litert --runtimes
cache_build` once per file (it writes the XNNPACK weight cache into --out-dir), then
`--runtimes cached`; without the weight cache LiteRT packs the weights once per signature
(over 10 GiB for an int8 2B). `all` refuses to start a full-size export with less than
--min-free-gib available; use --layers N, or run the stages alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma_keras.conventions import (  # noqa: E402
    DECODE,
    LOGITS,
    MASK,
    MASK_HIDDEN,
    cache_names,
    prefill_name,
)

GIB = 2**30

SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             query_pre_attn_scalar=64, sliding_window=32, max_position_embeddings=2048)


# ------------------------------------------------------------------ helpers
def proc_status():
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in GiB."""
    import machine

    status = machine.proc_status()
    return {key: status[key] / GIB for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


class RssSampler:
    """Samples VmRSS every `period` s in a thread; `mark(label)` tags the phase, so the
    report says in which phase the peak happened.

    The thread needs the GIL, which long C++ calls (TensorFlow's converter) hold, so its
    samples can miss a phase's peak. With `exact_phases`, each `mark` also reads the kernel's
    VmHWM and resets it (`/proc/self/clear_refs`), which gives each phase its true peak; read
    the run's peak as `max(stop().values())`, not VmHWM, then."""

    def __init__(self, period=0.5, exact_phases=False):
        self.period, self.label, self.peak, self.peak_label = period, "start", 0.0, "start"
        self.phase_peaks = {}
        self.exact = exact_phases and self._reset_peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self):
        rss = proc_status()["VmRSS"]
        self.phase_peaks[self.label] = max(self.phase_peaks.get(self.label, 0.0), rss)
        if rss > self.peak:
            self.peak, self.peak_label = rss, self.label

    @staticmethod
    def _reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            return True
        except OSError:
            return False

    def _end_phase(self):
        self.sample()
        if self.exact:
            hwm = proc_status()["VmHWM"]
            self.phase_peaks[self.label] = max(self.phase_peaks.get(self.label, 0.0), hwm)
            if hwm > self.peak:
                self.peak, self.peak_label = hwm, self.label
            self._reset_peak()

    def mark(self, label):
        self._end_phase()
        self.label = label

    def stop(self):
        self._end_phase()
        self._stop.set()
        self._thread.join()
        return {k: round(v, 2) for k, v in self.phase_peaks.items()}


def record(args, stage, **fields):
    """Append one result line (with the time, load average, CPU model and flags)."""
    import machine

    fields = {"stage": stage, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "loadavg": [round(x, 2) for x in os.getloadavg()],
              "cpu": " ".join([machine.cpu_model_and_flags()[0],
                               *machine.cpu_model_and_flags()[1]]), **fields}
    line = json.dumps(fields)
    print(line, flush=True)
    with open(Path(args.out_dir) / "results.jsonl", "a") as f:
        f.write(line + "\n")


def model_config(args):
    from gemma_keras.config import Gemma2Config

    if args.small:
        return Gemma2Config(**SMALL)
    cfg = Gemma2Config.preset("gemma2_2b")
    if args.layers:
        cfg = Gemma2Config(**{**cfg.to_dict(), "num_hidden_layers": args.layers,
                              "layer_types": None})
    return cfg


def config_name(args):
    if args.small:
        return "small"
    return "gemma2_2b" if not args.layers else f"2b_width_{args.layers}_layers"


def _original_chunks(variable, index, seed):
    """The random values `random_causal_lm` puts in `variable` (the model's `index`-th), as
    `(start_row, block)` chunks of about 64 MB: regenerated identically on every call."""
    import numpy as np

    shape = tuple(variable.shape)
    scale = np.float32(0.1 if len(shape) == 1 else 0.02)
    rng = np.random.default_rng([seed, index])
    rows = max(1, (64 << 20) // (4 * int(np.prod(shape[1:], dtype=np.int64) or 1)))
    if len(shape) == 2 and shape[0] % 32 == 0:
        rows = max(32, rows // 32 * 32)  # whole int4 blocks along the input axis
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        block = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
        block *= scale
        yield start, block


def random_causal_lm(config, seed=0):
    """A float32 Gemma2CausalLM of `config` with random weights (N(0, 0.02) matrices,
    N(0, 0.1) norm scales), filled chunk by chunk with NumPy: much faster than Keras'
    initializers, with no full-size temporaries, and reproducible variable by variable."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.converters.streaming import assign_rows

    model = Gemma2CausalLM.empty(config, dtype="float32")
    for index, variable in enumerate(model.variables):
        for start, block in _original_chunks(variable, index, seed):
            assign_rows(variable, start, block)
    return model


def padded_tokenizer(vocab_size, out_path):
    """A SentencePiece model with exactly `vocab_size` pieces, for a random model's bundle:
    the tiny test tokenizer (Gemma's special ids) padded with pieces no text produces."""
    from sentencepiece import sentencepiece_model_pb2

    from gemma_keras.tokenizer import train_sentencepiece

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_corpus

    base = train_sentencepiece(tiny_corpus(), str(out_path) + ".base", vocab_size=160)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(base).read_bytes())
    for i in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<pad_piece_{i}>", -1e9
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = vocab_size
    Path(out_path).write_bytes(proto.SerializeToString())
    return str(out_path)


def cache_name_set(most_layers):
    """The cache tensors' names of a file with up to `most_layers` layers."""
    k_names, v_names = cache_names(most_layers)
    return set(k_names) | set(v_names)


def causal_mask(positions, cache_len):
    import numpy as np

    mask = np.full((1, 1, len(positions), cache_len), MASK_HIDDEN, np.float32)
    for row, pos in enumerate(positions):
        mask[0, 0, row, : pos + 1] = 0.0
    return mask


# ------------------------------------------------------------------ stages
def expected_weight_bytes(config, quantize):
    """The weights' bytes at `quantize` (tied embedding once): the exporter's own count when
    it has one, else parameters x bits."""
    try:
        from gemma_keras.tflite.quantize import weight_bytes

        return int(weight_bytes(config, quantize))
    except (ImportError, TypeError, ValueError):
        bits = {"none": 32, "fp16": 16, "dynamic_int8": 8, "weight_only_int8": 8,
                "int4_block32": 4, "int4_block128": 4, "int4_channel": 4}[quantize]
        return int(config.num_parameters() * bits / 8)


def _weights_restored(model, seed=0):
    """Whether every weight of `random_causal_lm(config, seed)` is back after the export
    (compares the first chunk of each variable with its regenerated values)."""
    import numpy as np

    for index, variable in enumerate(model.variables):
        start, block = next(_original_chunks(variable, index, seed))
        got = np.asarray(variable.value[start:start + len(block)])
        if tuple(variable.value.shape) != tuple(variable.shape) or not np.array_equal(got, block):
            return False
    return True


def _cpu_seconds():
    """User + system CPU seconds of this process: the export's cost on a shared machine,
    where wall time depends on what else runs."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_phase(sampler, seconds, owner, name, label, after=None):
    """Wrap `owner.name` so that each call marks phase `label` on `sampler` (and `after`
    when it returns) and adds its seconds to `seconds[label]`."""
    real = getattr(owner, name)

    def wrapped(*a, **k):
        sampler.mark(label)
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            seconds[label] = round(seconds.get(label, 0) + time.perf_counter() - t, 1)
            if after:
                sampler.mark(after)

    setattr(owner, name, wrapped)


def stage_export(args):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    import gemma_keras.tflite.export as export_lib
    from gemma_keras.tflite import export_tflite
    from gemma_keras.tflite.file_info import TFLiteFileInfo

    from gemma_keras.tflite import export_graph, lean_export, requantize, template, weight_writer

    sampler = RssSampler(exact_phases=True)
    config = model_config(args)
    sampler.mark("build")
    t0 = time.perf_counter()
    # From a checkpoint directory (what `gemma-keras export-tflite --model DIR` runs), or
    # from a random model built in this process.
    model = args.model_dir or random_causal_lm(config)
    build_s = time.perf_counter() - t0

    # Tag the exporter's phases: each wrapped call marks the phase it starts (and, for some,
    # the one after it), and records how long it took.
    seconds = {}

    def phase(owner, name, label, after=None):
        time_phase(sampler, seconds, owner, name, label, after)

    phase(lean_export, "model_and_source", "open the checkpoint")
    phase(template, "convert_template", "trace + convert the template", after="write")
    phase(weight_writer, "write_weights", "stream the weights", after="after")
    phase(requantize, "requantize_tflite", "requantize", after="after")
    phase(export_lib._ExportWeights, "__enter__", "trace")
    phase(tf.saved_model, "save", "save SavedModel")
    phase(export_lib._ExportWeights, "release", "release weights")
    phase(export_graph, "convert", "TF converter", after="quantize+write")
    phase(export_lib._ExportWeights, "__exit__", "restore Keras weights", after="cleanup")
    out = Path(args.out_dir) / f"{config_name(args)}_{args.quantize}.tflite"
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    export_tflite(model, out, quantize=args.quantize, kv_cache_max_len=args.cache_len,
                  prefill_lens=[int(t) for t in args.prefill_lens.split(",")], progress=False)
    export_s, export_cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0
    phases = sampler.stop()
    peak = round(sampler.peak if sampler.exact else proc_status()["VmHWM"], 2)
    restored = _weights_restored(model) if not args.model_dir else None
    size = out.stat().st_size
    expected = expected_weight_bytes(config, args.quantize)
    info = TFLiteFileInfo(out)
    record(args, "export", config=config_name(args), quantize=args.quantize,
           source=args.model_dir or "random Keras model in process",
           cache_len=args.cache_len, prefill_lens=args.prefill_lens, path=str(out),
           build_s=round(build_s, 1), export_s=round(export_s, 1),
           export_cpu_s=round(export_cpu_s, 1), loadavg_1min=os.getloadavg()[0], phase_s=seconds,
           file_bytes=size, weight_bytes=expected, size_ratio=round(size / expected, 4),
           embedding_buffers=len(info.buffers_of_shape((config.vocab_size,
                                                        config.hidden_size))),
           peak_rss_gib=peak, phase_peak_rss_gib=phases, keras_weights_restored=restored,
           params=config.num_parameters())


def variable_specs(config):
    """(path, shape) of `random_causal_lm(config).variables`, in order, from the config alone
    (no weights allocated); projections [out, in]."""
    h, i = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim

    def kernel(n_in, n_out):
        return (n_out, n_in)

    block = [("input_layernorm/scale", (h,)), ("self_attn/q_proj/kernel", kernel(h, q)),
             ("self_attn/k_proj/kernel", kernel(h, kv)), ("self_attn/v_proj/kernel", kernel(h, kv)),
             ("self_attn/o_proj/kernel", kernel(q, h)), ("post_attention_layernorm/scale", (h,)),
             ("pre_feedforward_layernorm/scale", (h,)), ("gate_proj/kernel", kernel(h, i)),
             ("up_proj/kernel", kernel(h, i)), ("down_proj/kernel", kernel(i, h)),
             ("post_feedforward_layernorm/scale", (h,))]
    specs = [("embed_tokens/embeddings", (config.vocab_size, h))]
    for b in range(config.num_hidden_layers):
        specs += [(f"decoder_block_{b}/{name}", shape) for name, shape in block]
    return specs + [("final_norm/scale", (h,))]


def _hf_name(path):
    """The checkpoint (Hugging Face) name of a `variable_specs` path."""
    from gemma_keras.converters.weight_map import BLOCK_TENSORS

    if path == "embed_tokens/embeddings":
        return "model.embed_tokens.weight"
    if path == "final_norm/scale":
        return "model.norm.weight"
    block, name = path.split("/", 1)
    suffix = {v: k for k, v in BLOCK_TENSORS.items()}[name.replace("/", ".")]
    return f"model.layers.{block.rsplit('_', 1)[1]}.{suffix}"


def random_checkpoint_weights(config, seed=0):
    """`{checkpoint tensor name: loader}` of `random_causal_lm(config, seed)`'s weights in the
    checkpoint's layout ([out, in] projections), each regenerated when loaded: the float
    source for `requantize_tflite`, with no model in memory."""
    import types

    import numpy as np

    def loader(index, shape):
        def load():
            out = np.empty(shape, np.float32)
            variable = types.SimpleNamespace(shape=shape)
            for start, block in _original_chunks(variable, index, seed):
                out[start:start + len(block)] = block
            return out

        return load

    return {_hf_name(path): loader(i, shape)
            for i, (path, shape) in enumerate(variable_specs(config))}


def stage_requantize(args):
    """`requantize_tflite` of --tflite (a dynamic_int8 export of the random model of this
    config) to --quantize, the float weights regenerated: seconds, peak RSS, size."""
    from gemma_keras.tflite import requantize as requantize_lib
    from gemma_keras.tflite import requantize_plan, requantize_write
    from gemma_keras.tflite.file_info import TFLiteFileInfo

    sampler = RssSampler()
    config = model_config(args)
    seconds = {}
    time_phase(sampler, seconds, requantize_plan, "plan", "plan (weight map, row scales)")
    time_phase(sampler, seconds, requantize_write, "write", "write (load, verify, quantize)")
    out = Path(args.out_dir) / f"{config_name(args)}_{args.quantize}.tflite"
    t0 = time.perf_counter()
    weights = random_checkpoint_weights(config)
    requantize_lib.requantize_tflite(args.tflite, weights, args.quantize, out)
    total_s = time.perf_counter() - t0
    phases = sampler.stop()
    info = TFLiteFileInfo(out)
    expected = expected_weight_bytes(config, args.quantize)
    record(args, "requantize", config=config_name(args), quantize=args.quantize,
           input=args.tflite,
           input_bytes=os.path.getsize(args.tflite), path=str(out),
           seconds=round(total_s, 1), phase_s=seconds, file_bytes=info.size,
           weight_bytes=expected, size_ratio=round(info.size / expected, 4),
           embedding_buffers=len(info.buffers_of_shape((config.vocab_size,
                                                        config.hidden_size))),
           peak_rss_gib=round(proc_status()["VmHWM"], 2), phase_peak_rss_gib=phases,
           rss_end_gib={k: round(v, 2) for k, v in proc_status().items()})


def stage_checkpoint(args):
    """A random bfloat16 Hugging Face checkpoint of the full 2B (`convert_2b.py`'s streaming
    writer) in <out-dir>/hf, with a SentencePiece tokenizer of its 256000 pieces (llama.cpp's
    converter needs one)."""
    import convert_2b

    if args.small or args.layers:
        raise SystemExit("checkpoint: the full 2B only (convert_2b's writer)")
    hf = Path(args.out_dir) / "hf"
    if (hf / "config.json").exists():
        print(f"{hf} exists", flush=True)
    else:
        t0 = time.perf_counter()
        convert_2b.phase_write(args.out_dir)
        record(args, "checkpoint", path=str(hf), seconds=round(time.perf_counter() - t0, 1),
               peak_rss_gib=round(proc_status()["VmHWM"], 2))
    if not (hf / "tokenizer.model").exists():
        padded_tokenizer(model_config(args).vocab_size, hf / "tokenizer.model")


def _timed_child(cmd, env=None, timeout=3600):
    """Run `cmd` under /usr/bin/time; returns (stdout, seconds, peak RSS GiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib=%M", *map(str, cmd)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    kib = [int(line.split("=")[1]) for line in proc.stderr.splitlines()
           if line.startswith("maxrss_kib=")]
    return proc.stdout, seconds, (kib[-1] * 1024 / GIB if kib else None)


LLAMA_QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")


def stage_llamacpp(args):
    """The same checkpoint in llama.cpp: `convert_hf_to_gguf.py` (bf16 GGUF), `llama-quantize`
    to Q8_0, Q4_0 and Q4_K_M, and `llama-bench` at --threads: prefill of --prefill tokens,
    decode of --decode-steps tokens at depth 0 and at depth --prefill. --llama-cpp is a
    llama.cpp source tree with `build/bin/llama-quantize` and `build/bin/llama-bench` (e.g.
    the one vendored in llama-cpp-python's source distribution, built with cmake)."""
    root = Path(args.llama_cpp)
    hf = Path(args.model_dir or Path(args.out_dir) / "hf")
    bf16 = Path(args.out_dir) / "gemma2_2b_bf16.gguf"
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    ggufs = {q: Path(args.out_dir) / f"gemma2_2b_{q}.gguf" for q in args.llama_quants.split(",")}
    if not bf16.exists() and not all(g.exists() for g in ggufs.values()):
        _, seconds, peak = _timed_child([sys.executable, root / "convert_hf_to_gguf.py", hf,
                                         "--outtype", "bf16", "--outfile", bf16], env)
        record(args, "gguf", quant="bf16", path=str(bf16), seconds=round(seconds, 1),
               peak_rss_gib=peak and round(peak, 2), file_bytes=bf16.stat().st_size)
    for quant, gguf in ggufs.items():
        if not gguf.exists():
            _, seconds, peak = _timed_child([root / "build/bin/llama-quantize", bf16, gguf,
                                             quant, args.threads])
            record(args, "gguf", quant=quant, path=str(gguf), seconds=round(seconds, 1),
                   peak_rss_gib=peak and round(peak, 2), file_bytes=gguf.stat().st_size)
        out, seconds, peak = _timed_child(
            [root / "build/bin/llama-bench", "-m", gguf, "-t", args.threads, "-p", args.prefill,
             "-n", args.decode_steps, "-d", f"0,{args.prefill}", "-r", "2", "-o", "json"])
        tests = json.loads(out)
        speed, samples = {}, {}
        for t in tests:
            key = f"{'prefill' if t['n_prompt'] else 'decode'}@{t.get('n_depth', 0)}"
            speed[key] = round(t["avg_ts"], 2)
            samples[key] = [round(x, 2) for x in t.get("samples_ts", [])]
        record(args, "llamacpp", quant=quant, path=str(gguf), file_bytes=gguf.stat().st_size,
               threads=args.threads, prefill_tokens=args.prefill, decode_steps=args.decode_steps,
               prefill_tok_s=speed.get("prefill@0"), decode_tok_s=speed.get("decode@0"),
               decode_at_depth_tok_s=speed.get(f"decode@{args.prefill}"), speeds=speed,
               samples_tok_s=samples,
               bench_peak_rss_gib=peak and round(peak, 2), bench_s=round(seconds, 1),
               build_info=tests[0].get("build_commit"), cpu=tests[0].get("cpu_info"))


LITERT_RUNTIMES = {
    "interpreter": "ai_edge_litert Interpreter, signature runners (caches copied in and out)",
    "compiled": "GemmaTFLite: CompiledModel, caches in place, no weight cache file",
    "cache_build": "GemmaTFLite: CompiledModel, caches in place, first load (writes the "
                   "XNNPACK weight cache)",
    "cached": "GemmaTFLite: CompiledModel, caches in place, XNNPACK weight cache loaded",
}


def stage_litert(args):
    """Prefill and decode speed and resident memory of each of --runtimes, each in its own
    process (so its RSS is its own), one `litert` line each."""
    runtimes = args.runtimes.split(",")
    if len(runtimes) > 1:
        common = ["--out-dir", args.out_dir, "--threads", str(args.threads), "--tflite",
                  args.tflite, "--prefill", str(args.prefill), "--decode-steps",
                  str(args.decode_steps)]
        for runtime in runtimes:
            run_stage(["litert", *common, "--runtimes", runtime], 1800)
        return
    import numpy as np

    from gemma_keras.tflite.litertlm import inspect_tflite

    runtime = runtimes[0]
    if runtime not in LITERT_RUNTIMES:
        raise SystemExit(f"unknown runtime {runtime!r}; one of {sorted(LITERT_RUNTIMES)}")
    info = inspect_tflite(args.tflite)
    size = os.path.getsize(args.tflite)
    prefill_t = args.prefill if args.prefill in info.prefill_lens else max(info.prefill_lens)
    prompt = np.random.default_rng(0).integers(3, info.vocab_size, prefill_t).astype(np.int32)
    weight_cache = Path(args.out_dir) / (Path(args.tflite).name + ".xnnpack_cache")
    if runtime == "cache_build":
        weight_cache.unlink(missing_ok=True)
    elif runtime == "cached" and not weight_cache.exists():
        raise SystemExit(f"{weight_cache} does not exist: run the cache_build runtime first")

    t0 = time.perf_counter()
    if runtime == "interpreter":
        model = _InterpreterSteps(args.tflite, args.threads, prefill_t)
    else:
        from gemma_keras.tflite import GemmaTFLite

        model = GemmaTFLite(args.tflite, num_threads=args.threads,
                            weight_cache=str(weight_cache) if runtime != "compiled" else False)
    load_s = time.perf_counter() - t0
    rss_after_load = {k: round(v, 3) for k, v in proc_status().items()}

    cpu_per_step = {}

    def decode(depth, token):
        """Seconds of each of 1 + --decode-steps greedy steps from position `depth` (the
        first step also does one-off work and is not timed), and the tokens; the process's
        CPU seconds per timed step (all threads) go to `cpu_per_step[depth]`, a figure less
        sensitive than wall time to other jobs on a shared machine."""
        model._pos, times, tokens = depth, [], []
        for _ in range(args.decode_steps + 1):
            t0 = time.perf_counter()
            logits = model.step(token)
            times.append(time.perf_counter() - t0)
            token = int(np.argmax(logits))
            tokens.append(token)
            if len(times) == 1:
                cpu0 = _cpu_seconds()
        cpu_per_step[depth] = (_cpu_seconds() - cpu0) / args.decode_steps
        return times, tokens

    # Decode at depth 0 first (as llama-bench's tg test), then the prompt (which overwrites
    # those positions) and decode after it, at depth = prompt length.
    times0, _ = decode(0, int(prompt[0]))
    prefill_times = []
    for _ in range(2):  # the first run also does one-off work (XNNPACK packing, allocation)
        t0 = time.perf_counter()
        model._run(prefill_t, prompt, 0)
        prefill_times.append(time.perf_counter() - t0)
    times, tokens = decode(prefill_t, int(prompt[-1]))
    decode_s = float(np.median(times[1:]))
    results = dict(
        runtime=runtime, label=LITERT_RUNTIMES[runtime], tflite=args.tflite, file_bytes=size,
        threads=args.threads, cache_len=info.cache_len, prefill_tokens=prefill_t,
        decode_steps=args.decode_steps, load_s=round(load_s, 2),
        first_prefill_s=round(prefill_times[0], 2),
        prefill_tok_s=round(prefill_t / prefill_times[1], 2),
        first_decode_s=round(times0[0], 3), decode_tok_s=round(1 / decode_s, 3),
        decode_at_0_tok_s=round(1 / float(np.median(times0[1:])), 3),
        decode_ms=[round(1e3 * t, 1) for t in times[1:]],
        decode_at_0_ms=[round(1e3 * t, 1) for t in times0[1:]],
        decode_cpu_ms={str(d): round(1e3 * c, 1) for d, c in cpu_per_step.items()},
        file_gb_s=round(size / decode_s / 1e9, 2), tokens=tokens,
        rss_after_load_gib=rss_after_load,
        rss_after_decode_gib={k: round(v, 3) for k, v in proc_status().items()})
    if runtime != "interpreter":
        results["weight_cache_bytes"] = (weight_cache.stat().st_size if runtime != "compiled"
                                         else 0)
    else:
        # What the runner's copies cost on their own: every cache copied in and out per step.
        cache = model.cache
        dst = {n: np.empty_like(a) for n, a in cache.items()}
        t0 = time.perf_counter()
        for _ in range(3):
            for n, a in cache.items():
                np.copyto(dst[n], a)
        copy_s = (time.perf_counter() - t0) / 3 * 2
        results.update(cache_bytes=sum(a.nbytes for a in cache.values()),
                       cache_copy_in_out_s=round(copy_s, 4),
                       cache_copy_share_of_decode=round(copy_s / decode_s, 3))
    record(args, "litert", **results)


class _InterpreterSteps:
    """The classic Interpreter's signature runners with `GemmaTFLite`'s `_run` / `step`
    interface: the caches are NumPy arrays, copied into the runner and out of it every call."""

    def __init__(self, path, threads, prefill_t):
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=path, num_threads=threads)
        self.runners = {1: self.interp.get_signature_runner(DECODE),
                        prefill_t: self.interp.get_signature_runner(
                            prefill_name(prefill_t))}
        details = self.runners[1].get_input_details()
        self.cache_len = int(details[MASK]["shape"][-1])
        self.cache = {n: np.zeros(d["shape"], np.float32) for n, d in details.items()
                      if n in cache_name_set(len(details))}
        self._pos = 0

    def _run(self, seq_len, tokens, start):
        import numpy as np

        positions = np.arange(start, start + seq_len, dtype=np.int32)
        out = self.runners[seq_len](tokens=np.asarray(tokens, np.int32).reshape(1, seq_len),
                                    input_pos=positions,
                                    mask=causal_mask(positions, self.cache_len), **self.cache)
        self.cache = {n: out[n] for n in self.cache}
        return out

    def step(self, token):
        out = self._run(1, [token], self._pos)
        self._pos += 1
        return out[LOGITS].reshape(-1)


def stage_engine(args):
    import litert_lm

    from gemma_keras.tflite.litertlm import inspect_tflite, write_litertlm

    info = inspect_tflite(args.tflite)
    tok = padded_tokenizer(info.vocab_size, Path(args.out_dir) / f"tokenizer_{info.vocab_size}.model")
    out = Path(args.out_dir) / Path(args.tflite).with_suffix(".litertlm").name
    t0 = time.perf_counter()
    write_litertlm(args.tflite, tok, out, max_num_tokens=info.cache_len)
    bundle_s = time.perf_counter() - t0
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    prefill = min(args.prefill, info.cache_len - args.decode_steps - 1)
    bench = litert_lm.Benchmark(
        model_path=str(out), backend=litert_lm.Backend.CPU(thread_count=args.threads),
        prefill_tokens=prefill, decode_tokens=args.decode_steps,
        max_num_tokens=info.cache_len, cache_dir=str(Path(args.out_dir) / "litertlm_cache"))
    (Path(args.out_dir) / "litertlm_cache").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    result = bench.run()
    run_s = time.perf_counter() - t0
    record(args, "engine", litertlm=str(out), litertlm_bytes=out.stat().st_size,
           bundle_s=round(bundle_s, 2), threads=args.threads, run_s=round(run_s, 1),
           init_s=round(result.init_time_in_second, 2),
           ttft_s=round(result.time_to_first_token_in_second, 2),
           prefill_tokens=result.last_prefill_token_count,
           prefill_tok_s=round(result.last_prefill_tokens_per_second, 2),
           decode_tokens=result.last_decode_token_count,
           decode_tok_s=round(result.last_decode_tokens_per_second, 3),
           file_gb_s=round(info.cache_len and os.path.getsize(args.tflite)
                           * result.last_decode_tokens_per_second / 1e9, 2),
           peak_rss_gib=round(proc_status()["VmHWM"], 2))


def stage_transformers(args):
    import numpy as np
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.set_num_threads(args.threads)
    cfg = model_config(args).to_hf_dict()
    cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = Gemma2ForCausalLM(Gemma2Config(**cfg, attn_implementation="eager")).eval()
    build_s = time.perf_counter() - t0
    prompt = torch.tensor(np.random.default_rng(0).integers(3, cfg["vocab_size"],
                                                            (1, args.prefill)))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.decode_steps):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            times.append(time.perf_counter() - t0)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode_s = float(np.median(times))
    record(args, "transformers", config=config_name(args), dtype="float32",
           threads=args.threads, build_s=round(build_s, 1), prefill_tokens=args.prefill,
           prefill_tok_s=round(args.prefill / prefill_s, 2), decode_steps=args.decode_steps,
           decode_tok_s=round(1 / decode_s, 3),
           weight_gb_s=round(4 * model_config(args).num_parameters() / decode_s / 1e9, 2),
           peak_rss_gib=round(proc_status()["VmHWM"], 2))


def stage_bandwidth(args):
    """Streaming-read bandwidth with --threads threads over 2 GiB, three ways; the best is
    the bound (every decode step reads the file's weights once)."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rows, cols = 8192, 65536  # 2 GiB of float32: far beyond any cache
    a = np.empty((rows, cols), np.float32)
    for r in range(0, rows, 512):
        a[r:r + 512] = 0.001
    x = np.ones(cols, np.float32)
    ta, tx = torch.from_numpy(a), torch.from_numpy(x)
    words = a.reshape(-1).view(np.uint64)

    def or_reduce():  # integer OR over all words, split across threads (no FLOPs to speak of)
        parts = np.array_split(words, args.threads)
        threads = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    probes = {"numpy sgemv (OpenBLAS)": lambda: a @ x, "torch.mv": lambda: torch.mv(ta, tx),
              "uint64 OR-reduce": or_reduce}
    found = {}
    for name, fn in probes.items():
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        found[name] = dict(best_gb_s=round(a.nbytes / min(times[1:]) / 1e9, 2),
                           median_gb_s=round(a.nbytes / float(np.median(times[1:])) / 1e9, 2))
    gb_s = max(v["best_gb_s"] for v in found.values())
    bound = {}
    for line in _read_results(args):
        if line["stage"] == "export":
            bound[Path(line["path"]).name] = dict(
                file_bytes=line["file_bytes"],
                bound_tok_s=round(gb_s * 1e9 / line["file_bytes"], 3))
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    record(args, "bandwidth", threads=args.threads, bytes=a.nbytes, gb_s=gb_s, probes=found,
           loadavg_1min=float(load), bound=bound)


def stage_quant_error(args):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import numpy as np

    from gemma_keras.tflite import export_tflite, export_tflite_variants

    sampler = RssSampler()
    prefill_t, steps, cache_len = 8, 8, 32
    if args.tiny_model:
        # The bundled trained tiny model, on a held-out prompt and its answer (chat format).
        from gemma_keras.pretrained import load_hf_checkpoint
        from gemma_keras.tiny_task import eval_examples, tiny_model_dir
        from gemma_keras.tokenizer import GemmaTokenizer

        model = load_hf_checkpoint(tiny_model_dir(), dtype="float32")
        config, name = model.config, "bundled_tiny_trained"
        tok = GemmaTokenizer(os.path.join(tiny_model_dir(), "tokenizer.model"))
        ex = eval_examples()[0]
        text = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}])
        seq = np.array(tok.encode(text + ex["response"]), np.int32)
        prefill_t, steps = 8, len(seq) - 8
        cache_len = 32 if len(seq) <= 32 else 64
    else:
        config = model_config(args)
        model = random_causal_lm(config, seed=1)
        name = config_name(args)
        rng = np.random.default_rng(1)
        seq = rng.integers(3, config.vocab_size, prefill_t + steps).astype(np.int32)
    ref = np.asarray(model({"token_ids": seq[None], "padding_mask": np.ones((1, len(seq)))}))
    ref = ref[0, prefill_t:]  # the logits decode produces at positions prefill_t, ...
    # Export every mode first, then let the Keras model go (10.5 GB at full size) before the
    # interpreter runs the files.
    outputs = {q: Path(args.out_dir) / f"qerr_{name}_{q}.tflite" for q in args.modes.split(",")}
    rows = []
    sampler.mark("export")
    t0 = time.perf_counter()
    try:  # every mode from one trace and template conversion
        export_tflite_variants(model, outputs, kv_cache_max_len=cache_len,
                               prefill_lens=(prefill_t,), progress=False)
    except Exception:  # one at a time, so that a mode the model cannot take is an error row
        for quantize, out in list(outputs.items()):
            try:
                export_tflite(model, out, quantize=quantize, kv_cache_max_len=cache_len,
                              prefill_lens=(prefill_t,), progress=False)
            except Exception as e:  # e.g. a block size the model's widths do not divide
                rows.append(dict(quantize=quantize, error=f"{type(e).__name__}: {e}"))
                print(rows[-1], flush=True)
                del outputs[quantize]
    export_s = round(time.perf_counter() - t0, 1)
    sampler.mark("release the model")
    del model
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()
    rss_without_model = round(proc_status()["VmRSS"], 2)
    print(f"RSS without the Keras model: {rss_without_model} GiB", flush=True)
    for quantize, out in outputs.items():
        sampler.mark(f"run {quantize}")
        got = _teacher_forced_logits(out, seq, prefill_t, steps, cache_len, args.threads)
        err = got - ref
        rows.append(dict(quantize=quantize, file_bytes=out.stat().st_size,
                         max_abs=float(np.abs(err).max()), mean_abs=float(np.abs(err).mean()),
                         rel_rms=float(np.sqrt((err**2).mean() / (ref**2).mean())),
                         top1_agree=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                         finite=bool(np.isfinite(got).all())))
        print(rows[-1], flush=True)
        out.unlink()
    phases = sampler.stop()
    record(args, "quant_error", config=name, logit_rms=float(np.sqrt((ref**2).mean())),
           rows=rows, export_s=export_s, peak_rss_gib=round(proc_status()["VmHWM"], 2),
           phase_peak_rss_gib=phases, rss_without_model_gib=rss_without_model)


def _teacher_forced_logits(path, seq, prefill_t, steps, cache_len, threads):
    """Logits [steps, vocab] of the .tflite file at `path` at positions prefill_t, ...:
    `seq[:prefill_t]` through the prefill signature, then each next token of `seq` through
    decode (teacher-forced), with the classic Interpreter's signature runners."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    prefill = interp.get_signature_runner(prefill_name(prefill_t))
    decode = interp.get_signature_runner(DECODE)
    details = decode.get_input_details()
    names = [n for n in details if n in cache_name_set(len(details))]
    cache = {n: np.zeros(details[n]["shape"], np.float32) for n in names}
    o = prefill(tokens=seq[None, :prefill_t], input_pos=np.arange(prefill_t, dtype=np.int32),
                mask=causal_mask(range(prefill_t), cache_len), **cache)
    cache = {n: o[n] for n in names}
    got = []
    for i in range(steps):
        pos = prefill_t + i
        o = decode(tokens=seq[None, pos:pos + 1], input_pos=np.array([pos], np.int32),
                   mask=causal_mask([pos], cache_len), **cache)
        cache = {n: o[n] for n in names}
        got.append(o[LOGITS][0, -1])
    return np.stack(got)


def _fake_quant(block, mode, is_embedding, stat):
    """Symmetric fake quantization of one row chunk (kernels are [in, out]; the embedding
    [vocab, hidden] is also the head, whose output channels are its rows)."""
    import numpy as np

    if mode == "int8_per_tensor":
        scale = stat / 127
        return np.clip(np.round(block / scale), -127, 127) * scale
    if mode == "int8_per_channel":
        peak = np.abs(block).max(axis=1, keepdims=True) if is_embedding else stat[None]
        scale = np.maximum(peak, 1e-30) / 127
        return np.clip(np.round(block / scale), -127, 127) * scale
    if mode == "int4_block32":  # blocks of 32 along the input axis, one scale each
        if is_embedding:
            b = block.reshape(block.shape[0], -1, 32)
            scale = np.maximum(np.abs(b).max(axis=2, keepdims=True), 1e-30) / 7
        else:
            b = block.reshape(-1, 32, block.shape[1])
            scale = np.maximum(np.abs(b).max(axis=1, keepdims=True), 1e-30) / 7
        return (np.clip(np.round(b / scale), -8, 7) * scale).reshape(block.shape)
    raise ValueError(mode)


def stage_quant_sim(args):
    """Weight quantization error on the full random 2B, simulated in Keras (the converter
    cannot export a per-channel 2B in this memory): every matrix is fake-quantized in place
    (regenerated from its seed, so no second copy is held), then the float32 logits of a
    32-token sequence are compared with the unquantized model's."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import numpy as np

    from gemma_keras.converters.streaming import assign_rows

    sampler = RssSampler()
    config = model_config(args)
    seed = 1
    t0 = time.perf_counter()
    model = random_causal_lm(config, seed=seed)
    build_s = time.perf_counter() - t0
    seq = np.random.default_rng(2).integers(3, config.vocab_size, 32).astype(np.int32)

    def logits():
        return np.asarray(model({"token_ids": seq[None],
                                 "padding_mask": np.ones((1, len(seq)), np.int32)}))[0]

    ref = logits()
    rows = []
    for mode in ("int8_per_tensor", "int8_per_channel", "int4_block32"):
        sampler.mark(mode)
        t0 = time.perf_counter()
        for index, variable in enumerate(model.variables):
            chunks = lambda: _original_chunks(variable, index, seed)  # noqa: E731
            if len(variable.shape) != 2:
                for start, block in chunks():  # restore (norm scales stay float32)
                    assign_rows(variable, start, block)
                continue
            is_embedding = "embed" in variable.path
            stat = None
            if mode == "int8_per_tensor":
                stat = max(float(np.abs(b).max()) for _, b in chunks())
            elif mode == "int8_per_channel" and not is_embedding:
                stat = np.zeros(variable.shape[1], np.float32)
                for _, b in chunks():
                    np.maximum(stat, np.abs(b).max(axis=0), out=stat)
            for start, block in chunks():
                assign_rows(variable, start, _fake_quant(block, mode, is_embedding, stat))
        got = logits()
        err = got - ref
        rows.append(dict(quantize=mode, seconds=round(time.perf_counter() - t0, 1),
                         max_abs=float(np.abs(err).max()), mean_abs=float(np.abs(err).mean()),
                         rel_rms=float(np.sqrt((err**2).mean() / (ref**2).mean())),
                         top1_agree=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                         file_bytes=0))
        print(rows[-1], flush=True)
    phases = sampler.stop()
    record(args, "quant_error", config=f"{config_name(args)} (weights fake-quantized in Keras)",
           logit_rms=float(np.sqrt((ref**2).mean())), rows=rows, build_s=round(build_s, 1),
           peak_rss_gib=round(proc_status()["VmHWM"], 2), phase_peak_rss_gib=phases)


# ------------------------------------------------------------------ driver
def _read_results(args):
    path = Path(args.out_dir) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def run_stage(argv, timeout):
    """Run one stage in a child process; returns True on success."""
    cmd = [sys.executable, __file__, *argv]
    print(f"$ {' '.join(cmd)}  (timeout {timeout} s, {free_gib():.1f} GiB available)",
          flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    try:
        proc = subprocess.run(cmd, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"!! timed out after {timeout} s: {argv[0]}", flush=True)
        return False
    if proc.returncode:
        print(f"!! {argv[0]} failed with exit code {proc.returncode}", flush=True)
    return proc.returncode == 0


def stage_all(args):
    common = ["--out-dir", args.out_dir, "--threads", str(args.threads)]
    if args.small:
        common.append("--small")
    if args.layers:
        common += ["--layers", str(args.layers)]
    name = config_name(args)
    if args.model_dir:
        common += ["--model-dir", args.model_dir]
    need = 0 if (args.small or args.layers or args.model_dir) else args.min_free_gib
    int8 = Path(args.out_dir) / f"{name}_dynamic_int8.tflite"
    run_stage(["bandwidth", *common], 300)
    for quantize in args.modes.split(","):
        if quantize.startswith("int4") and int8.exists():
            # What export_tflite does for int4, from the int8 file already converted.
            ok = run_stage(["requantize", *common, "--quantize", quantize, "--tflite",
                            str(int8)], args.export_timeout)
        elif free_gib() < need:
            print(f"!! skipping the {quantize} export: {free_gib():.1f} GiB available, "
                  f"{need} needed", flush=True)
            continue
        else:
            ok = run_stage(["export", *common, "--quantize", quantize, "--cache-len",
                            str(args.cache_len), "--prefill-lens", args.prefill_lens],
                           args.export_timeout)
        tflite = str(Path(args.out_dir) / f"{name}_{quantize}.tflite")
        if not ok or not Path(tflite).exists():
            continue
        run_stage(["litert", *common, "--tflite", tflite, "--prefill", str(args.prefill),
                   "--decode-steps", str(args.decode_steps)], 1800)
        run_stage(["engine", *common, "--tflite", tflite, "--prefill", str(args.prefill),
                   "--decode-steps", str(args.decode_steps)], 1800)
    run_stage(["bandwidth", *common], 300)
    if args.llama_cpp:
        run_stage(["llamacpp", *common, "--llama-cpp", args.llama_cpp, "--prefill",
                   str(args.prefill), "--decode-steps", str(args.decode_steps)], 3600)
    if not args.skip_transformers:
        run_stage(["transformers", *common, "--prefill", "64", "--decode-steps", "8"], 1200)
    stage_report(args)


def stage_report(args):
    import machine

    print(machine.describe())
    lines = _read_results(args)
    exports = [r for r in lines if r["stage"] == "export"]
    bws = [r for r in lines if r["stage"] == "bandwidth"]
    gb_s = max((r["gb_s"] for r in bws), default=None)
    runs = ", ".join(f"{r['gb_s']} (1-min load {r.get('loadavg_1min')})" for r in bws)
    print(f"\nMeasured memory bandwidth ({args.threads} threads, best of sgemv / torch.mv / "
          f"OR-reduce over 2 GiB): {runs} GB/s; the bound uses the best, {gb_s} GB/s\n")
    print("| file | quantize | cache | file bytes | weights at precision | ratio | build s "
          "| export s (CPU s, 1-min load) | peak RSS GiB | peak in phase |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in exports:
        phases = r.get("phase_peak_rss_gib", {})
        print(f"| {Path(r['path']).name} | {r['quantize']} | {r['cache_len']} | "
              f"{r['file_bytes']:,} | {r['weight_bytes']:,} | {r['size_ratio']} | "
              f"{r['build_s']} | {r['export_s']} ({r.get('export_cpu_s')}, "
              f"{r.get('loadavg_1min')}) | {r['peak_rss_gib']} | "
              f"{', '.join(f'{k} {v}' for k, v in phases.items())} |")
    print("\n| runtime | file | cache | threads | prefill tok/s | decode tok/s | file GB/s "
          "| bound tok/s | % of bound | RSS GiB (anon + file) | RSS / file |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in lines:
        if r["stage"] == "litert" and "runtime" in r:
            size, dec = r["file_bytes"], r["decode_tok_s"]
            bound = gb_s * 1e9 / size if gb_s else None
            rss = r["rss_after_decode_gib"]
            print(f"| {r['label']} | {Path(r['tflite']).name} | {r['cache_len']} | "
                  f"{r['threads']} | {r['prefill_tok_s']} | {dec} | {r['file_gb_s']} | "
                  f"{bound and round(bound, 2)} | {bound and round(100 * dec / bound)} | "
                  f"{rss['RssAnon']:.2f} + {rss['RssFile']:.2f} | "
                  f"{rss['VmRSS'] * GIB / size:.2f} |")
        elif r["stage"] == "engine":
            size = os.path.getsize(r["litertlm"]) if os.path.exists(r["litertlm"]) else \
                r["litertlm_bytes"]
            bound = gb_s * 1e9 / size if gb_s else None
            print(f"| LiteRT-LM engine (litert_lm.Benchmark) | {Path(r['litertlm']).name} | "
                  f"- | {r['threads']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | "
                  f"{r['file_gb_s']} | {bound and round(bound, 2)} | "
                  f"{bound and round(100 * r['decode_tok_s'] / bound)} | peak "
                  f"{r['peak_rss_gib']} | {r['peak_rss_gib'] * GIB / size:.2f} (peak) |")
        elif r["stage"] == "transformers":
            size = 4 * 2_614_341_888 if r["config"] == "gemma2_2b" else None
            bound = gb_s * 1e9 / size if (gb_s and size) else None
            print(f"| transformers float32 (torch) | {r['config']} | dynamic | {r['threads']} | "
                  f"{r['prefill_tok_s']} | {r['decode_tok_s']} | {r['weight_gb_s']} | "
                  f"{bound and round(bound, 2)} | {bound and round(100 * r['decode_tok_s'] / bound)}"
                  f" | peak {r['peak_rss_gib']} | - |")
    litert = [r for r in lines if r["stage"] == "litert" and "runtime" in r]
    for r in litert:
        ref = [i for i in litert if i["runtime"] == "interpreter" and i["tflite"] == r["tflite"]]
        same = "-" if not ref else r["tokens"] == ref[-1]["tokens"]
        print(f"\n{r['runtime']} ({Path(r['tflite']).name}): load {r['load_s']} s, first "
              f"prefill {r['first_prefill_s']} s, RSS after load "
              f"{r['rss_after_load_gib']['VmRSS']:.2f} GiB, after decode "
              f"{r['rss_after_decode_gib']['VmRSS']:.2f} GiB (peak "
              f"{r['rss_after_decode_gib']['VmHWM']:.2f}); weight cache file "
              f"{r.get('weight_cache_bytes', 0):,} bytes; greedy tokens as the interpreter's: "
              f"{same}")
        if "cache_copy_in_out_s" in r:
            print(f"Cache copy in+out per decode step ({r['cache_bytes'] / 2**20:.0f} MiB of "
                  f"caches): {r['cache_copy_in_out_s'] * 1e3:.1f} ms = "
                  f"{100 * r['cache_copy_share_of_decode']:.1f}% of an interpreter decode step")
    _report_llamacpp(lines, litert)
    qerrs = [r for r in lines if r["stage"] == "quant_error"]
    if qerrs:
        print("\n| model | quantize | file bytes | max abs logit err | mean abs | rel RMS "
              "| top-1 agree |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in qerrs:
            for row in r["rows"]:
                if "error" in row:
                    print(f"| {r['config']} | {row['quantize']} | - | {row['error'][:90]} "
                          f"| | | |")
                    continue
                size = f"{row['file_bytes']:,}" if row.get("file_bytes") else "-"
                print(f"| {r['config']} | {row['quantize']} | {size} | "
                      f"{row['max_abs']:.3g} | {row['mean_abs']:.3g} | {row['rel_rms']:.3g} | "
                      f"{row['top1_agree']:.2f} |")


LLAMA_PAIRS = {"Q8_0": ("int8",), "Q4_0": ("int4",), "Q4_K_M": ("int4",)}


def _tflite_mode(path):
    """The quantization a benchmark file's name ends with (`gemma2_2b_<mode>[_suffix]`)."""
    from gemma_keras.tflite.quantize import QUANTIZATIONS

    name = Path(path).name
    return max((q for q in QUANTIZATIONS if f"_{q}." in name or f"_{q}_" in name),
               key=len, default=None)


def _runs(values, digits=2):
    """`a / b / ...` of one figure over a file's runs, in run order."""
    return " / ".join(f"{v:.{digits}f}" if v is not None else "-" for v in values)


def _report_llamacpp(lines, litert):
    """Side by side with llama.cpp: each file's speeds (every run, in run order) and the
    TFLite/llama.cpp ratios of the runs of the same round (the k-th run of each)."""
    llama = {}
    for r in lines:
        if r["stage"] == "llamacpp":
            llama.setdefault(r["quant"], []).append(r)
    if not llama:
        return
    cached = [r for r in litert if r["runtime"] == "cached"]
    runs = cached or [r for r in litert if r["runtime"] == "compiled"]
    tfl = {}
    for r in runs:
        tfl.setdefault((Path(r["tflite"]).name, r["cache_len"]), []).append(r)
    depth = next(iter(llama.values()))[0]["prefill_tokens"]
    print(f"\nSide by side (each figure: every run, in run order; TFLite "
          f"{'with the XNNPACK weight cache loaded' if cached else 'without a weight cache'}"
          f"; prompt {depth} tokens):\n")
    print(f"| file | cache | file bytes | prefill {depth} tok/s | decode tok/s at depth 0 | "
          f"decode tok/s at depth {depth} | RSS GiB after decode (bench peak) | RSS / file |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, cache_len), rs in tfl.items():
        size = rs[0]["file_bytes"]
        rss = [r["rss_after_decode_gib"]["VmRSS"] for r in rs]
        print(f"| {name} | {cache_len} | {size:,} | {_runs([r['prefill_tok_s'] for r in rs])} | "
              f"{_runs([r.get('decode_at_0_tok_s') for r in rs])} | "
              f"{_runs([r['decode_tok_s'] for r in rs])} | {_runs(rss)} | "
              f"{_runs([x * GIB / size for x in rss])} |")
    for q, rs in llama.items():
        size = rs[0]["file_bytes"]
        rss = [r.get("bench_peak_rss_gib") for r in rs]
        print(f"| llama.cpp {q} | (as filled) | {size:,} | "
              f"{_runs([r['prefill_tok_s'] for r in rs])} | "
              f"{_runs([r['decode_tok_s'] for r in rs])} | "
              f"{_runs([r['decode_at_depth_tok_s'] for r in rs])} | {_runs(rss)} | "
              f"{_runs([x and x * GIB / size for x in rss])} |")
    cpu = [(name, cache_len, [r.get("decode_cpu_ms", {}).get(str(r["prefill_tokens"]))
                              for r in rs])
           for (name, cache_len), rs in tfl.items() if any("decode_cpu_ms" in r for r in rs)]
    if cpu:
        print(f"\nCPU ms (all threads) per decode step at depth {depth}: " + "; ".join(
            f"{name} (cache {cache_len}) {_runs(ms, 1)}" for name, cache_len, ms in cpu))
    print(f"\n| TFLite file | cache | llama.cpp | prefill ratio | decode ratio at depth 0 | "
          f"decode ratio at depth {depth} | decode ratio at depth {depth}: best TFLite run "
          f"/ fastest llama-bench repetition |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for quant, prefixes in LLAMA_PAIRS.items():
        for (name, cache_len), rs in tfl.items():
            mode = _tflite_mode(name)
            if quant not in llama or not mode or not any(p in mode for p in prefixes):
                continue
            pairs = list(zip(rs, llama[quant]))

            def ratio(ours, theirs):
                return _runs([a.get(ours) / b[theirs] if a.get(ours) and b.get(theirs)
                              else None for a, b in pairs])

            # The least disturbed figures on a shared machine: TFLite's best run (median of
            # its steps) against llama-bench's fastest repetition (its mean where it kept none).
            theirs = max(max(r.get("samples_tok_s", {}).get(f"decode@{depth}") or
                             [r["decode_at_depth_tok_s"]]) for r in llama[quant])
            best = max(r["decode_tok_s"] for r in rs) / theirs
            print(f"| {name} | {cache_len} | {quant} | {ratio('prefill_tok_s', 'prefill_tok_s')}"
                  f" | {ratio('decode_at_0_tok_s', 'decode_tok_s')} | "
                  f"{ratio('decode_tok_s', 'decode_at_depth_tok_s')} | {best:.2f} |")
    print(f"\nllama-bench sizes its context to each test and attends over the filled "
          f"positions only; the TFLite decode step always covers all cache slots (its "
          f"attention costs the same at depth 0 and at depth {depth}).")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "checkpoint", "export", "requantize", "litert",
                                          "engine", "llamacpp", "transformers", "bandwidth",
                                          "quant-error", "quant-sim", "report"])
    parser.add_argument("--out-dir", default="/tmp/gemma_tflite_2b")
    parser.add_argument("--small", action="store_true", help="a tiny config, for dry runs")
    parser.add_argument("--layers", type=int, default=0,
                        help="the 2B's width with this many layers (0: all 26)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", default="dynamic_int8")
    parser.add_argument("--modes", default="dynamic_int8,int4_block32,int4_channel",
                        help="quantizations exported by `all` / compared by `quant-error`")
    parser.add_argument("--cache-len", type=int, default=1280)
    parser.add_argument("--prefill-lens", default="8,64,256")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--tflite")
    parser.add_argument("--model-dir", help="export: a checkpoint directory to export from "
                        "(the lean route's use); default: a random model built in process")
    parser.add_argument("--llama-cpp", help="llamacpp: a llama.cpp source tree with build/bin")
    parser.add_argument("--llama-quants", default=",".join(LLAMA_QUANTS))
    parser.add_argument("--runtimes", default=",".join(LITERT_RUNTIMES),
                        help="litert: the runtimes to time, each in its own process; one of "
                             + ", ".join(LITERT_RUNTIMES))
    parser.add_argument("--tiny-model", action="store_true",
                        help="quant-error on the bundled trained tiny model")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--min-free-gib", type=float, default=22.0)
    parser.add_argument("--export-timeout", type=int, default=2400)
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.stage in ("bandwidth", "all"):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    {"all": stage_all, "checkpoint": stage_checkpoint, "llamacpp": stage_llamacpp,
     "export": stage_export, "requantize": stage_requantize,
     "litert": stage_litert, "engine": stage_engine,
     "transformers": stage_transformers, "bandwidth": stage_bandwidth,
     "quant-error": stage_quant_error, "quant-sim": stage_quant_sim,
     "report": stage_report}[args.stage](args)


if __name__ == "__main__":
    main()
