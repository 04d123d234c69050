"""`GemmaTFLite`: generate text from an exported `.tflite` file without TensorFlow or Keras.

Needs only `ai-edge-litert` (the LiteRT interpreter), `numpy` and `sentencepiece` (through
`gemma_keras.tokenizer`, whose TensorFlow parts load only on use). Sampling reuses
`gemma_keras.samplers` (NumPy), so a seed gives the same tokens as the Keras model's
`generate` for the same logits.

Example:
>>> lm = GemmaTFLite("gemma.tflite", "tokenizer.model")
>>> lm.generate("The capital of France is", max_new_tokens=8)
>>> for piece in lm.stream("Tell me a story", sampler="top_p", seed=0):
...     print(piece, end="", flush=True)
>>> lm.chat([{"role": "user", "content": "reverse: cat dog"}])
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from gemma_keras.samplers import get_sampler
from gemma_keras.tokenizer import stream_text
from gemma_keras.tflite.signatures import (
    DECODE,
    INPUT_POS,
    LOGITS,
    MASK,
    MASK_HIDDEN,
    TOKENS,
    prefill_lengths,
    prefill_name,
)

EOS_ID, END_OF_TURN_ID, PAD_ID = 1, 107, 0


class GemmaTFLite:
    """A Gemma 2 `.tflite` export (see `gemma_keras.tflite.export_tflite`) and its tokenizer.

    Args:
      path: the `.tflite` file, with `prefill_<T>` and `decode` signatures.
      tokenizer_path: Gemma's SentencePiece `tokenizer.model`; default: a `tokenizer.model`
        beside the file, if there is one. Without a tokenizer, prompts must be token ids.
      num_threads: interpreter threads.

    Batch size 1. The prompt is prefilled in chunks through the prefill signatures (the
    largest first, then the smallest that holds the rest), its last token through `decode`,
    which returns the logits the first new token is sampled from.
    """

    def __init__(self, path, tokenizer_path=None, num_threads=2):
        from ai_edge_litert.interpreter import Interpreter

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TFLite model not found: {path}")
        self.path = path
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable .tflite model: {e}") from None
        signatures = self.interpreter.get_signature_list()
        self.prefill_lens = prefill_lengths(signatures)
        if DECODE not in signatures:
            raise ValueError(f"{path} has no '{DECODE}' signature (found {sorted(signatures)}); "
                             "export it with gemma_keras.tflite.export_tflite")
        self._decode = self.interpreter.get_signature_runner(DECODE)
        self._prefill = {t: self.interpreter.get_signature_runner(prefill_name(t))
                         for t in self.prefill_lens}
        inputs = self._decode.get_input_details()
        self.cache_names = sorted(n for n in inputs if n.startswith("kv_cache_"))
        self._cache_specs = {n: (tuple(inputs[n]["shape"]), inputs[n]["dtype"])
                             for n in self.cache_names}
        self.cache_len = int(inputs[MASK]["shape"][-1])
        self.vocab_size = int(self._decode.get_output_details()[LOGITS]["shape"][-1])
        self._cache, self._pos = None, 0  # set by `start`

        if tokenizer_path is None:
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")
            tokenizer_path = beside if os.path.isfile(beside) else None
        self.tokenizer = None
        if tokenizer_path is not None:
            from gemma_keras.tokenizer import GemmaTokenizer

            self.tokenizer = GemmaTokenizer(tokenizer_path)

    def __repr__(self):
        return (f"GemmaTFLite({self.path!r}, cache_len={self.cache_len}, "
                f"prefill_lens={self.prefill_lens}, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------ model steps
    def _new_cache(self):
        return {n: np.zeros(shape, dtype) for n, (shape, dtype) in self._cache_specs.items()}

    def _mask(self, positions):
        """Additive mask [1, 1, T, S]: query at position p sees cache slots 0..p."""
        slots = np.arange(self.cache_len)[None, :]
        visible = slots <= np.asarray(positions)[:, None]
        return np.where(visible, 0.0, MASK_HIDDEN).astype(np.float32)[None, None]

    def _run(self, runner, seq_len, tokens, start, cache):
        """Run `tokens` (at most `seq_len`) at positions start.. through a signature whose
        length is `seq_len`, padding with token 0; returns its outputs."""
        n = len(tokens)
        ids = np.full((1, seq_len), PAD_ID, np.int32)
        ids[0, :n] = tokens
        positions = np.arange(start, start + seq_len, dtype=np.int32)
        return runner(**{TOKENS: ids, INPUT_POS: positions, MASK: self._mask(positions)},
                      **cache)

    def _prefill_plan(self, start, count):
        """Chunks `(seq_len, n_tokens)` that prefill `count` tokens from position `start`.

        Each chunk must fit the cache with its padding (the whole padded chunk is written).
        A length that fits nothing left over is prefilled token by token through decode.
        """
        plan, pos, left = [], start, count
        while left > 0:
            fits = [t for t in self.prefill_lens if pos + t <= self.cache_len]
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
        self._cache = self._new_cache()
        self._pos = 0
        pos = 0
        for seq_len, n in self._prefill_plan(0, len(token_ids) - 1):
            runner = self._decode if seq_len == 1 else self._prefill[seq_len]
            out = self._run(runner, seq_len, token_ids[pos:pos + n], pos, self._cache)
            self._cache = {name: out[name] for name in self.cache_names}
            pos += n
        self._pos = pos
        return self.step(token_ids[-1])

    def step(self, token_id):
        """Feed one token at the next position; returns float32 logits [vocab]."""
        if self._cache is None:
            raise ValueError("call start(prompt_ids) before step()")
        if self._pos >= self.cache_len:
            raise ValueError(f"the cache of {self.cache_len} slots is full")
        out = self._run(self._decode, 1, [int(token_id)], self._pos, self._cache)
        self._cache = {name: out[name] for name in self.cache_names}
        self._pos += 1
        return np.asarray(out[LOGITS], np.float32).reshape(-1)

    def _check_ids(self, token_ids):
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return ids

    # -------------------------------------------------------------- generation
    def _prompt_ids(self, prompt):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer_path to "
                                 "GemmaTFLite, or give token ids")
            return self.tokenizer.encode(prompt), True
        return self._check_ids(prompt), False

    def generate_ids(self, prompt_ids, max_new_tokens=64, sampler="greedy", seed=None,
                     stop_token_ids=None, temperature=None, top_k=None, top_p=None):
        """Yield up to `max_new_tokens` new token ids after `prompt_ids`, the stop token last
        (if reached). Refuses a prompt that, with `max_new_tokens`, cannot fit the cache."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        prompt_ids = self._check_ids(prompt_ids)
        if len(prompt_ids) + max_new_tokens > self.cache_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; with max_new_tokens="
                f"{max_new_tokens} that needs {len(prompt_ids) + max_new_tokens} cache slots, "
                f"but {self.path} was exported with a cache of {self.cache_len} "
                f"(kv_cache_max_len). Shorten the prompt, lower max_new_tokens, or export "
                f"with a larger --kv-cache-max-len"
            )
        sampler = get_sampler(sampler, temperature=temperature, top_k=top_k, top_p=top_p)
        stop = {EOS_ID, END_OF_TURN_ID} if stop_token_ids is None else set(stop_token_ids)
        rng = np.random.default_rng(seed)
        logits = self.start(prompt_ids)
        for t in range(max_new_tokens):
            token = int(sampler(logits[None, :], rng)[0])
            yield token
            if token in stop or t == max_new_tokens - 1:
                return
            logits = self.step(token)

    def stream(self, prompt, max_new_tokens=64, sampler="greedy", seed=None,
               stop_token_ids=None, temperature=None, top_k=None, top_p=None):
        """Yield the completion of `prompt` as it is produced (the stop token left out).

        A text prompt (`<bos>` is added) yields text pieces; a token-id list yields ids.
        `sampler` is "greedy", "temperature", "top_k", "top_p" or a
        `gemma_keras.samplers.Sampler`; `seed` makes sampling reproducible.
        """
        ids, is_text = self._prompt_ids(prompt)
        stop = {EOS_ID, END_OF_TURN_ID} if stop_token_ids is None else set(stop_token_ids)
        steps = self.generate_ids(ids, max_new_tokens, sampler, seed, stop_token_ids,
                                  temperature, top_k, top_p)
        tokens = itertools.takewhile(lambda t: t not in stop, steps)
        yield from stream_text(self.tokenizer, tokens) if is_text else tokens

    def generate(self, prompt, max_new_tokens=64, sampler="greedy", seed=None, **kwargs):
        """The completion of `prompt`: a string for a text prompt, ids for a token-id list.
        Arguments as in `stream`."""
        pieces = list(self.stream(prompt, max_new_tokens, sampler, seed, **kwargs))
        return "".join(pieces) if isinstance(prompt, str) else pieces

    def chat(self, messages, max_new_tokens=64, sampler="greedy", seed=None, **kwargs):
        """The model's reply to `messages` (`[{"role": "user"|"model", "content": str}]`),
        in Gemma's turn format; generation stops at `<end_of_turn>`."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer: pass tokenizer_path to GemmaTFLite")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, max_new_tokens, sampler, seed, **kwargs)
