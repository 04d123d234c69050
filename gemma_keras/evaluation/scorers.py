"""One scoring interface over every runtime: a Keras model, a `.tflite` export, a SavedModel.

A `Scorer` runs whole token sequences (each `<bos>` first) and returns, for every token after
the first, its log-probability given the tokens before it (`token_scores`); a scorer whose
runtime exposes the whole next-token distribution also returns the logits at every position
(`logits`, for KL divergence and top-1 agreement). `batches` groups sequences of similar
lengths into runs of `scorer.batch_size`; `score_tails` scores the last tokens of each
sequence with them. The metrics (`perplexity`, `agreement`, `choice`, `harness`) use only
this module.

    KerasScorer       Gemma2CausalLM: one forward pass per batch (right-padded), any backend
    TFLiteScorer      GemmaTFLite: the file's `score_<T>` signatures, chunk by chunk
    SavedModelScorer  the SavedModel's `score` signature (log-probabilities of the actual
                      tokens only: no logits)

`open_scorer(kind, path)` loads one; `tokenizer_path(kind, path)` finds its tokenizer
without loading the model, so that data can be checked first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gemma_keras.tflite.runtime import GemmaTFLite
from gemma_keras.tokenizer import GemmaTokenizer, tokenizer_of

KINDS = ("model", "tflite", "saved_model")
BLOCK_VALUES = 1 << 22  # host-side float64 log-softmax over this many logits at a time


@dataclasses.dataclass
class TokenScores:
    """Per predicted token of one sequence (positions 1..n-1): `log_probs` float64 [n-1] and
    `is_top1` bool [n-1] (the token is the argmax; None when the runtime cannot tell)."""

    log_probs: np.ndarray
    is_top1: np.ndarray | None


def log_softmax(logits) -> np.ndarray:
    """float64 log-softmax over the last axis of float32 logits [n, vocab]."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def row_blocks(n, vocab_size):
    """Slices of at most BLOCK_VALUES logits' worth of rows, covering 0..n."""
    step = max(1, BLOCK_VALUES // int(vocab_size))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def scores_from_logits(logits, token_ids) -> TokenScores:
    """TokenScores of `token_ids` [n] from the logits [n, vocab] at each of its positions."""
    targets = np.asarray(token_ids[1:])
    log_probs, top1 = np.empty(len(targets)), np.empty(len(targets), bool)
    for rows in row_blocks(len(targets), logits.shape[-1]):
        block = log_softmax(logits[rows])
        log_probs[rows] = np.take_along_axis(block, targets[rows, None], -1)[:, 0]
        top1[rows] = block.argmax(-1) == targets[rows]
    return TokenScores(log_probs, top1)


class Scorer:
    """The scoring interface (see the module docstring).

    Attributes: `name` (what is scored, for reports), `tokenizer` (a `GemmaTokenizer`),
    `vocab_size`, `max_length` (the longest sequence it can score, or None when the runtime
    does not say), `has_logits`, `batch_size` (sequences per run that `score_tails` sends;
    may be set).
    """

    name = "?"
    tokenizer = None
    vocab_size = None
    max_length = None
    has_logits = True
    batch_size = 1

    def logits(self, sequences) -> list:
        """float32 logits [n_i, vocab] at every position of each sequence."""
        raise NotImplementedError(f"{self.name} gives the log-probabilities of the scored "
                                  "tokens only, not the whole next-token distribution")

    def token_scores(self, sequences) -> list:
        """`TokenScores` of each sequence (one run of the runtime for the whole list)."""
        return [scores_from_logits(z, s) for z, s in zip(self.logits(sequences), sequences)]

    def complete(self, prompt, max_new_tokens) -> str:
        """Greedy completion of a text prompt (for lm-evaluation-harness' generate_until)."""
        raise NotImplementedError(f"{self.name} cannot generate")

    def close(self):
        """Release the runtime now (a no-op where nothing needs it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_length(self, length):
        if self.max_length is not None and length > self.max_length:
            raise ValueError(f"a sequence of {length} tokens is longer than {self.name} can "
                             f"score ({self.max_length}); lower --context")


def batches(sequences, batch_size, progress=False, what="scoring"):
    """Lists of at most `batch_size` indices into `sequences`, of similar lengths (longest
    first, so that a batch too large for memory fails at once); a tqdm bar with `progress`."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        return tqdm(out, desc=what, unit="batch")
    return out


def score_tails(scorer, sequences, counts, progress=False) -> list[TokenScores]:
    """TokenScores of the last `counts[i]` tokens of each of `sequences` (in order), run in
    batches of `scorer.batch_size`."""
    out = [None] * len(sequences)
    for batch in batches(sequences, scorer.batch_size, progress):
        for i, scores in zip(batch, scorer.token_scores([sequences[i] for i in batch])):
            k = counts[i]
            out[i] = TokenScores(scores.log_probs[-k:], None if scores.is_top1 is None
                                 else scores.is_top1[-k:])
    return out


def _right_padded(sequences, pad_id=0):
    ids = np.full((len(sequences), max(map(len, sequences))), pad_id, np.int32)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    return ids


# ---------------------------------------------------------------------- Keras
class KerasScorer(Scorer):
    """A `Gemma2CausalLM`: each batch is one forward pass over right-padded sequences; the
    log-softmax and the picked log-probabilities are computed with the model's backend."""

    def __init__(self, model, batch_size=8, name="keras"):
        self.model, self.tokenizer, self.name = model, tokenizer_of(model, "scoring"), name
        self.vocab_size = int(model.config.vocab_size)
        self.max_length = int(model.config.max_position_embeddings)
        self.batch_size = int(batch_size)

    def _forward(self, sequences):
        for seq in sequences:
            self.check_length(len(seq))
        ids = _right_padded(sequences)
        lengths = np.array([len(s) for s in sequences])
        mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return self.model({"token_ids": ids, "padding_mask": mask}), ids, lengths

    def logits(self, sequences):
        from keras import ops

        logits, _, lengths = self._forward(sequences)
        logits = np.asarray(ops.convert_to_numpy(logits), np.float32)
        return [logits[row, :n] for row, n in enumerate(lengths)]

    def token_scores(self, sequences):
        from keras import ops

        logits, ids, lengths = self._forward(sequences)
        logits = logits[:, :-1]
        targets = ops.convert_to_tensor(ids[:, 1:, None])
        log_probs = ops.take_along_axis(ops.log_softmax(logits, axis=-1), targets, axis=-1)
        log_probs = np.asarray(ops.convert_to_numpy(log_probs[..., 0]), np.float64)
        top1 = np.asarray(ops.convert_to_numpy(ops.argmax(logits, axis=-1))) == ids[:, 1:]
        return [TokenScores(log_probs[row, :n - 1], top1[row, :n - 1])
                for row, n in enumerate(lengths)]

    def complete(self, prompt, max_new_tokens):
        return self.model.generate(prompt, max_new_tokens=max_new_tokens)


# --------------------------------------------------------------------- TFLite
class TFLiteScorer(Scorer):
    """A `GemmaTFLite` whose file has `score_<T>` signatures (export with `score_lens`):
    batch 1, each sequence run chunk by chunk into the KV cache, logits at every position."""

    def __init__(self, runtime, name="tflite"):
        if runtime.tokenizer is None:
            raise ValueError(f"{runtime.path}: no tokenizer (pass --tokenizer, or put "
                             "tokenizer.model beside the file)")
        if not runtime.score_lens:
            raise ValueError(f"{runtime.path} has no score_<T> signature; export it with "
                             "`gemma-keras export-tflite --score-lens 64` (score_lens= in "
                             "Python)")
        self.runtime, self.tokenizer, self.name = runtime, runtime.tokenizer, name
        self.vocab_size, self.max_length = runtime.vocab_size, runtime.cache_len

    def logits(self, sequences):
        for seq in sequences:
            self.check_length(len(seq))
        return [self.runtime.logits_at_every_position(seq) for seq in sequences]

    def complete(self, prompt, max_new_tokens):
        return self.runtime.generate(prompt, max_new_tokens=max_new_tokens)

    def close(self):
        self.runtime.close()


# ----------------------------------------------------------------- SavedModel
class SavedModelScorer(Scorer):
    """A SavedModel version directory, through its `score` signature (right-padded int32
    [batch, length] -> `log_probs`); `complete` uses `serving_default`. Needs TensorFlow and
    tensorflow-text only."""

    has_logits = False

    def __init__(self, directory, batch_size=8, name="saved_model"):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the SentencePiece ops)

        self.tf, self.name, self.batch_size = tf, name, int(batch_size)
        self.tokenizer = GemmaTokenizer(tokenizer_path("saved_model", directory))
        self.vocab_size = self.tokenizer.vocab_size  # the signature does not say
        self.loaded = tf.saved_model.load(str(directory))
        if "score" not in self.loaded.signatures:
            raise ValueError(f"{directory} has no 'score' signature (found "
                             f"{sorted(self.loaded.signatures)})")
        self._score = self.loaded.signatures["score"]

    def token_scores(self, sequences):
        ids = _right_padded(sequences)
        out = self._score(token_ids=self.tf.constant(ids))["log_probs"].numpy()
        return [TokenScores(np.asarray(out[row, 1:len(s)], np.float64), None)
                for row, s in enumerate(sequences)]

    def complete(self, prompt, max_new_tokens):
        tf = self.tf
        out = self.loaded.signatures["serving_default"](
            prompts=tf.constant([prompt]), max_new_tokens=tf.constant(max_new_tokens, tf.int32))
        return out["completions"].numpy()[0].decode("utf-8")


# -------------------------------------------------------------------- loading
def tokenizer_path(kind, path, tokenizer=None) -> Path:
    """The `tokenizer.model` a runtime of `kind` at `path` uses (`tokenizer` if given),
    found without loading the model."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if tokenizer is not None:
        found = Path(tokenizer)
    elif kind == "model":
        found = Path(path) / "tokenizer.model"
    elif kind == "tflite":
        found = Path(path).resolve().parent / "tokenizer.model"
    else:
        found = Path(path) / "assets" / "tokenizer.model"
    if not found.is_file():
        raise FileNotFoundError(f"tokenizer not found for {path}: {found}"
                                + ("" if tokenizer else " (pass --tokenizer PATH)"))
    return found


def check_same_tokenizer(tokenizer, reference):
    """Refuse two `GemmaTokenizer`s whose vocabularies differ (naming both and the first id
    where they differ)."""
    if tokenizer.proto == reference.proto:
        return
    a, b, path, reference_path = tokenizer, reference, tokenizer.name, reference.name
    if a.vocab_size != b.vocab_size:
        raise ValueError(f"the tokenizers differ: {path} has {a.vocab_size} pieces, the "
                         f"reference's {reference_path} has {b.vocab_size}")
    for i in range(a.vocab_size):
        if a.id_to_piece(i) != b.id_to_piece(i):
            raise ValueError(f"the tokenizers differ: id {i} is {a.id_to_piece(i)!r} in "
                             f"{path} and {b.id_to_piece(i)!r} in the reference's "
                             f"{reference_path}")
    probe = "The quick brown fox, 12 jumps! Über straße."
    if a.encode(probe) != b.encode(probe):
        raise ValueError(f"the tokenizers differ: {path} and the reference's "
                         f"{reference_path} have the same pieces but encode text differently")


def open_scorer(kind, path=None, tokenizer=None, dtype=None, batch_size=8, name=None):
    """Load the runtime of `kind` ("model": a Keras model directory, default the bundled tiny
    model; "tflite": a `.tflite` file; "saved_model": a SavedModel version directory)."""
    if kind == "model":
        if tokenizer is not None:
            raise ValueError("--tokenizer goes with --tflite; a --model directory has its own")
        from gemma_keras.pretrained import load_model

        return KerasScorer(load_model(path, dtype=dtype), batch_size, name or f"keras:{path}")
    if kind == "tflite":
        return TFLiteScorer(GemmaTFLite(path, tokenizer), name or f"tflite:{path}")
    if kind == "saved_model":
        if tokenizer is not None:
            raise ValueError("--tokenizer goes with --tflite; a SavedModel has its own")
        return SavedModelScorer(path, batch_size, name or f"saved_model:{path}")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
