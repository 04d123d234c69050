"""`GemmaTFLite`: generate text from an exported `.tflite` file without TensorFlow or Keras.

Needs only `ai-edge-litert` (LiteRT's `CompiledModel`), `numpy` and `sentencepiece` (through
`gemma_keras.tokenizer`, whose TensorFlow parts load only on use). `generate` and `stream` are
the host decode loop of `gemma_keras.decoding` over the file's prefill and decode signatures
(`TFLiteDecodeBackend`), with the same arguments, sampling and stop ids as the Keras model's,
so a seed gives the same tokens as `Gemma2CausalLM.generate` for the same logits.

Example:
>>> lm = GemmaTFLite("gemma.tflite", "tokenizer.model")
>>> lm.generate("The capital of France is", max_new_tokens=8)
>>> for piece in lm.stream("Tell me a story", sampler="top_p", seed=0):
...     print(piece, end="", flush=True)
>>> lm.chat([{"role": "user", "content": "reverse: cat dog"}])
"""

from __future__ import annotations

import os
import re

import numpy as np

from gemma_keras import decoding
from gemma_keras.atomic_files import atomic_file
from gemma_keras.conventions import (
    BOS_ID,
    DECODE,
    INPUT_POS,
    LOGITS,
    MASK,
    MASK_HIDDEN,
    PAD_ID,
    SCORE_PREFIX,
    STOP_IDS,
    TOKENS,
    prefill_lengths,
    prefill_name,
    score_name,
)
from gemma_keras.tflite.native_log import stderr_captured
from gemma_keras.tokenizer import GemmaTokenizer, tokenizer_of

_DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int8": np.int8}
_CACHE_SUFFIX = ".xnnpack_cache"


def _weight_cache_path(path, weight_cache):
    """The XNNPACK weight cache file for `path` (see `GemmaTFLite`), or None."""
    if weight_cache is False or weight_cache is None:
        return None
    if weight_cache is not True:
        return os.fspath(weight_cache)
    st = os.stat(path)
    name = f"{os.path.basename(path)}.{st.st_size}-{st.st_mtime_ns}{_CACHE_SUFFIX}"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                              "gemma_keras")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return None
    return os.path.join(folder, name)


def _remove_stale_caches(path, keep):
    """Delete the weight cache files of earlier versions of `path` (other size or mtime)
    from the folder of `keep`."""
    folder = os.path.dirname(os.path.abspath(keep))
    stale = re.compile(re.escape(os.path.basename(path)) + r"\.\d+-\d+"
                       + re.escape(_CACHE_SUFFIX) + "$")
    for other in os.listdir(folder):
        full = os.path.join(folder, other)
        if stale.match(other) and full != os.path.abspath(keep):
            try:
                os.remove(full)
            except OSError:
                pass


def _compiled_model(path, num_threads, weight_cache_file):
    """LiteRT's CompiledModel of `path` on XNNPACK, its packed weights in `weight_cache_file`
    (loaded if complete, else written; "": none)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.options import Options

    options = Options(cpu_options=CpuOptions(num_threads=num_threads,
                                             xnnpack_weight_cache_path=weight_cache_file))
    try:
        with stderr_captured() as log:
            return CompiledModel.from_file(path, options=options)
    except (ValueError, RuntimeError) as e:
        errors = [line for line in "".join(log).splitlines() if "ERROR" in line]
        raise ValueError(f"{path} is not a readable .tflite model: {e}\n"
                         + "\n".join(errors)) from None


def _write_weight_cache(path, num_threads, cache):
    """Have XNNPACK write its packed weights of `path` to `cache`, atomically (a crash or a
    concurrent load never sees half a file). Returns `cache`, or None if none was written.

    XNNPACK writes the file while the model loads; the model is then loaded again from it,
    because the first load keeps XNNPACK's packing buffer, as large as the largest weight
    (0.55 GiB for the 2B's embedding)."""
    try:
        with atomic_file(cache) as partial:
            partial.unlink()  # XNNPACK creates the file itself
            with stderr_captured():  # releasing the model logs LiteRT's teardown
                _compiled_model(path, num_threads, str(partial)).close()
            if not partial.is_file():
                raise FileNotFoundError(partial)
    except FileNotFoundError:
        return None
    return cache


class _Signature:
    """One signature of a `CompiledModel` with its buffers: the small inputs (tokens,
    positions, mask), the outputs that are not caches (decode's logits), and the shared cache
    buffers as both input and output."""

    def __init__(self, model, name, caches):
        self.model, self.name = model, name
        inputs = [n for n in model.get_input_tensor_details(name) if n not in caches]
        outputs = [n for n in model.get_output_tensor_details(name) if n not in caches]
        self.inputs = {n: model.create_input_buffer_by_name(name, n) for n in inputs}
        self.outputs = {n: model.create_output_buffer_by_name(name, n) for n in outputs}
        self._input_map = {**self.inputs, **caches}
        self._output_map = {**self.outputs, **caches}

    def __call__(self, tokens, positions, mask):
        self.inputs[TOKENS].write(tokens)
        self.inputs[INPUT_POS].write(positions)
        self.inputs[MASK].write(mask)
        self.model.run_by_name(self.name, self._input_map, self._output_map)


class GemmaTFLite:
    """A Gemma 2 `.tflite` export (see `gemma_keras.tflite.export_tflite`) and its tokenizer.

    Args:
      path: the `.tflite` file, with `prefill_<T>` and `decode` signatures.
      tokenizer_path: Gemma's SentencePiece `tokenizer.model`; default: a `tokenizer.model`
        beside the file, if there is one. Without a tokenizer, prompts must be token ids.
      num_threads: CPU threads (XNNPACK).
      weight_cache: XNNPACK's packed weights as a file that is memory-mapped, instead of a
        second copy of the weights in memory. True (default): a file beside the model,
        `<path>.<size>-<mtime_ns>.xnnpack_cache`, written on first load (about the model's
        size; its name changes with the model file, so a re-exported model never reads a
        stale cache), or in `~/.cache/gemma_keras/` without write access beside the model;
        a path: that file; False: no file (XNNPACK packs the weights in memory, apparently
        per signature: resident memory 4.6x the file for the 2B with four signatures,
        against 1.3x with the file, and decode 1.7x slower).

    Runs on LiteRT's `CompiledModel` with XNNPACK. Each KV cache is one buffer passed as both
    input and output of every signature, so the graph writes the new slots in place: nothing
    copies the caches between steps. Batch size 1. The prompt is prefilled in chunks through
    the prefill signatures (the largest first, then the smallest that holds the rest), its last
    token through `decode`, which returns the logits the first new token is sampled from.
    """

    def __init__(self, path, tokenizer_path=None, num_threads=2, weight_cache=True):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path}")
        self.path = path
        self.weight_cache_path = cache = _weight_cache_path(path, weight_cache)
        if cache and not os.path.isfile(cache):
            cache = self.weight_cache_path = _write_weight_cache(path, num_threads, cache)
            if cache and weight_cache is True:
                _remove_stale_caches(path, keep=cache)
        self.model = _compiled_model(path, num_threads, cache or "")

        signatures = self.model.get_signature_list()
        self.prefill_lens = prefill_lengths(signatures)
        if DECODE not in signatures:
            raise ValueError(f"{path} has no '{DECODE}' signature (found {sorted(signatures)}); "
                             "export it with gemma_keras.tflite.export_tflite")
        inputs = self.model.get_input_tensor_details(DECODE)
        self.cache_names = sorted(n for n in inputs if n.startswith("kv_cache_"))
        self.cache_len = int(inputs[MASK]["shape"][-1])
        self.vocab_size = int(self.model.get_output_tensor_details(DECODE)[LOGITS]["shape"][-1])
        # One buffer per cache, shared by every signature as input and output (in place).
        # Slots past the current position are masked, so they only need to hold finite
        # values: zeros once here, then whatever an earlier prompt left.
        self._caches = {}
        with stderr_captured():  # the first write creates LiteRT's environment (logged)
            for name in self.cache_names:
                buffer = self.model.create_input_buffer_by_name(DECODE, name)
                buffer.write(np.zeros(inputs[name]["shape"], _DTYPES[inputs[name]["dtype"]]))
                self._caches[name] = buffer
        self._signatures = {1: _Signature(self.model, DECODE, self._caches)}
        for t in self.prefill_lens:
            self._signatures[t] = _Signature(self.model, prefill_name(t), self._caches)
        # Optional score_<T> signatures (logits at every position), for evaluation.
        self.score_lens = prefill_lengths(signatures, SCORE_PREFIX)
        self._score_signatures = {t: _Signature(self.model, score_name(t), self._caches)
                                  for t in self.score_lens}
        self._pos = None  # set by `start`

        if tokenizer_path is None:
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")
            tokenizer_path = beside if os.path.isfile(beside) else None
        self.tokenizer = None
        if tokenizer_path is not None:
            self.tokenizer = GemmaTokenizer(tokenizer_path)

    def close(self):
        """Release the model and its caches now (LiteRT's teardown log lines are dropped)."""
        if getattr(self, "model", None) is None:
            return
        with stderr_captured():
            self._signatures = self._caches = None
            self.model.close()
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass

    def __repr__(self):
        return (f"GemmaTFLite({self.path!r}, cache_len={self.cache_len}, "
                f"prefill_lens={self.prefill_lens}, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------ model steps
    def _mask(self, positions):
        """Additive mask [1, 1, T, S]: query at position p sees cache slots 0..p."""
        slots = np.arange(self.cache_len)[None, :]
        visible = slots <= np.asarray(positions)[:, None]
        return np.where(visible, 0.0, MASK_HIDDEN).astype(np.float32)[None, None]

    def _run(self, seq_len, tokens, start, signatures=None):
        """Run `tokens` (at most `seq_len`) at positions start.. through the signature whose
        length is `seq_len` (1: decode) among `signatures` (default: prefill and decode),
        padding with token 0; the caches update in place. Returns the signature."""
        if self.model is None:
            raise ValueError(f"{self!r} is closed")
        ids = np.full((1, seq_len), PAD_ID, np.int32)
        ids[0, :len(tokens)] = tokens
        positions = np.arange(start, start + seq_len, dtype=np.int32)
        signature = (signatures or self._signatures).get(seq_len) or self._signatures[seq_len]
        signature(ids, positions, self._mask(positions))
        return signature

    def _prefill_plan(self, start, count, lens=None):
        """Chunks `(seq_len, n_tokens)` that run `count` tokens from position `start` through
        the signatures of lengths `lens` (default: the prefill lengths).

        Each chunk must fit the cache with its padding (the whole padded chunk is written).
        A length that fits nothing left over is prefilled token by token through decode.
        """
        plan, pos, left = [], start, count
        while left > 0:
            fits = [t for t in (lens or self.prefill_lens) if pos + t <= self.cache_len]
            holding = [t for t in fits if t >= left]
            if holding:
                seq_len = holding[0]
            elif fits:
                seq_len = fits[-1]
            else:
                seq_len = 1  # decode
            n = min(seq_len, left)
            plan.append((seq_len, n))
            pos, left = pos + n, left - n
        return plan

    def start(self, token_ids):
        """Run a prompt (token ids, `<bos>` included) into a fresh cache.

        Returns the float32 logits [vocab] for the token after the prompt; `step` continues.
        """
        token_ids = self._check_ids(token_ids)
        if len(token_ids) > self.cache_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens but the model's cache "
                             f"holds {self.cache_len} (kv_cache_max_len of {self.path})")
        self._pos = None
        pos = 0
        for seq_len, n in self._prefill_plan(0, len(token_ids) - 1):
            self._run(seq_len, token_ids[pos:pos + n], pos)
            pos += n
        self._pos = pos
        return self.step(token_ids[-1])

    def step(self, token_id):
        """Feed one token at the next position; returns float32 logits [vocab]."""
        if self._pos is None:
            raise ValueError("call start(prompt_ids) before step()")
        if self._pos >= self.cache_len:
            raise ValueError(f"the cache of {self.cache_len} slots is full")
        self._run(1, [int(token_id)], self._pos)
        self._pos += 1
        return self._signatures[1].outputs[LOGITS].read(self.vocab_size, np.float32)

    def logits_at_every_position(self, token_ids):
        """float32 logits [n, vocab] after each of the n tokens (`<bos>` first), run into a
        fresh cache through the file's `score_<T>` signatures (export with `score_lens`);
        `step` may continue after them."""
        token_ids = self._check_ids(token_ids)
        if not self.score_lens:
            raise ValueError(f"{self.path} has no score_<T> signature; export it with "
                             "score_lens (gemma-keras export-tflite --score-lens)")
        if len(token_ids) > self.cache_len:
            raise ValueError(f"{len(token_ids)} tokens do not fit the model's cache of "
                             f"{self.cache_len} (kv_cache_max_len of {self.path})")
        self._pos = None
        logits, pos = np.empty((len(token_ids), self.vocab_size), np.float32), 0
        for seq_len, n in self._prefill_plan(0, len(token_ids), self.score_lens):
            signature = self._run(seq_len, token_ids[pos:pos + n], pos, self._score_signatures)
            chunk = signature.outputs[LOGITS].read(seq_len * self.vocab_size, np.float32)
            logits[pos:pos + n] = chunk.reshape(seq_len, self.vocab_size)[:n]
            pos += n
        self._pos = pos
        return logits

    def _check_ids(self, token_ids):
        return decoding.check_token_ids(token_ids, self.vocab_size)

    # -------------------------------------------------------------- generation
    def generate_ids(self, prompt_ids, max_new_tokens=None, sampler="greedy", **kwargs):
        """Yield up to `max_new_tokens` new token ids after `prompt_ids`, the stop token last
        (if reached). Arguments as in `generate`."""
        steps = decoding.decode_steps(TFLiteDecodeBackend(self), [self._check_ids(prompt_ids)],
                                      max_new_tokens, sampler, **kwargs)
        return (int(ids[0]) for ids, _ in steps)

    def generate(self, prompt, max_new_tokens=None, sampler="greedy", **kwargs):
        """The completion of `prompt`: a string for a text prompt, ids for a token-id list.

        The arguments and their defaults are the Keras model's (`gemma_keras.decoding.generate`):
        `seed`, `stop_token_ids`, `temperature`, `top_k`, `top_p`, `max_length`, `truncate`.
        One prompt at a time; the limit is the file's cache.
        """
        return decoding.generate(TFLiteDecodeBackend(self), self.tokenizer, prompt,
                                 max_new_tokens, sampler, **kwargs)

    def stream(self, prompt, max_new_tokens=None, sampler="greedy", **kwargs):
        """Yield the completion of `prompt` as it is produced (the stop token left out): text
        pieces for a text prompt (`<bos>` is added), ids for a token-id list. Arguments as in
        `generate`."""
        return decoding.stream(TFLiteDecodeBackend(self), self.tokenizer, prompt,
                               max_new_tokens, sampler, **kwargs)

    def chat(self, messages, max_new_tokens=None, sampler="greedy", **kwargs):
        """The model's reply to `messages` (`[{"role": "user"|"model", "content": str}]`),
        in Gemma's turn format; generation stops at `<end_of_turn>`."""
        prompt = tokenizer_of(self, "chat").apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, max_new_tokens, sampler, **kwargs)


class TFLiteDecodeBackend:
    """`decoding.DecodeBackend` of a `GemmaTFLite`: one prompt, prefilled through the file's
    signatures (`GemmaTFLite.start`), then `decode` per token. Limit: the file's cache."""

    max_batch_size = 1
    stop_ids, bos_id, pad_id = STOP_IDS, BOS_ID, PAD_ID

    def __init__(self, runtime):
        self.runtime = runtime
        self.capacity, self.vocab_size = runtime.cache_len, runtime.vocab_size
        self.limit_note = (f"{os.path.basename(runtime.path)} was exported with a cache of "
                           f"{runtime.cache_len} slots, --kv-cache-max-len")

    def prefill(self, prompts, max_new_tokens):
        return self.runtime.start(prompts[0])[None]

    def step(self, token_ids):
        return self.runtime.step(int(token_ids[0]))[None]
