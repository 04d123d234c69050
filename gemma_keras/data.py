"""Fine-tuning data: JSONL records -> padded batches `({"token_ids", "padding_mask"}, labels,
sample_weight)` with the loss only on what the model should learn to write.

One JSON object per line, in one of three forms:
  {"text": "..."}                                  plain text: every token is trained, `<eos>`
                                                   is appended
  {"prompt": "...", "response": "..."}             one chat exchange in Gemma's turn format
  {"messages": [{"role": "user", "content": ...},  a conversation; every model turn is trained
                {"role": "model", "content": ...}]}

Chat records are written as Gemma turns (`<start_of_turn>user\\n...<end_of_turn>\\n
<start_of_turn>model\\n...<end_of_turn>\\n`); the loss covers each model turn's content and
its `<end_of_turn>\\n`, so the model learns to answer and then stop. Prompts are encoded exactly
as `GemmaTokenizer.apply_chat_template(..., add_generation_prompt=True)` encodes them at
generation time.

Example:
>>> data = load_jsonl("train.jsonl", tokenizer, sequence_length=128)
>>> train, val = data.split(0.1)
>>> model.fit(train.tf_dataset(batch_size=8), validation_data=val.tf_dataset(8), epochs=3)
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from gemma_keras.conventions import END_OF_TURN, TURN_ROLES, turn, turn_start

_FORMS = "'text', 'prompt' and 'response', or 'messages'"


class DataError(ValueError):
    """A fine-tuning file or record that cannot be used; the message names file and line."""


# ----------------------------------------------------------------------- reading
def read_jsonl(path, expected=_FORMS) -> list[tuple[str, dict]]:
    """`[(where, record)]` for every non-blank line; `where` is "FILE line N". `expected`
    names the fields a record should have (for the error on a line that is not an object)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with {expected}, "
                                f"got {type(record).__name__}")
            records.append((where, record))
    if not records:
        raise DataError(f"{path}: the file has no records (it is empty)")
    return records


def _text_field(record, key, where):
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def record_segments(record: dict, where: str = "record") -> list[tuple[str, bool]]:
    """Split a record into `(text, trained)` pieces, in order, without `<bos>`/`<eos>`."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                            "{'role', 'content'} objects")
    elif "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if key not in record:
                raise DataError(f"{where}: has 'prompt' or 'response' but is missing '{key}'")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "model", "content": record["response"]}]
    elif "text" in record:
        text = _text_field(record, "text", where)
        if not text:
            raise DataError(f"{where}: 'text' is empty")
        return [(text, True)]
    else:
        raise DataError(f"{where}: expected {_FORMS}; got keys {sorted(record)}")

    segments = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {n} must be an object with 'role' and 'content'")
        role = TURN_ROLES.get(message["role"])
        if role is None:
            raise DataError(f"{where}: message {n} has role {message['role']!r}; "
                            "expected 'user', 'model' or 'assistant'")
        content = _text_field(message, "content", f"{where}: message {n}")
        if role == "user":
            segments.append((turn("user", content), False))
        else:
            if not content:
                raise DataError(f"{where}: message {n} (model turn) is empty")
            segments.append((turn_start("model"), False))
            segments.append((f"{content}{END_OF_TURN}\n", True))
    if not any(trained for _, trained in segments):
        raise DataError(f"{where}: no model turn to learn from (the last turn is the user's)")
    return _merge_untrained(segments)


def _merge_untrained(segments):
    """Join neighbouring prompt pieces so they are encoded as the chat template is."""
    merged = []
    for text, trained in segments:
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    return merged


def encode_record(record: dict, tokenizer, where: str = "record"):
    """`(ids, trained)`: int32 token ids starting with `<bos>`, and 1.0 on trained tokens."""
    ids, trained = [tokenizer.bos_id], [0.0]
    segments = record_segments(record, where)
    for text, is_trained in segments:
        piece = tokenizer.encode(text, add_bos=False)
        ids += piece
        trained += [float(is_trained)] * len(piece)
    if len(segments) == 1 and segments[0][1]:  # plain text: learn to end it
        ids.append(tokenizer.eos_id)
        trained.append(1.0)
    return np.asarray(ids, np.int32), np.asarray(trained, np.float32)


# ---------------------------------------------------------------------- batching
@dataclasses.dataclass
class EncodedData:
    """Padded examples, all [N, sequence_length]: `labels[:, t]` follows `token_ids[:, t]`."""

    token_ids: np.ndarray
    padding_mask: np.ndarray
    labels: np.ndarray
    sample_weight: np.ndarray

    def __len__(self):
        return len(self.token_ids)

    @property
    def sequence_length(self) -> int:
        return self.token_ids.shape[1]

    def subset(self, index) -> "EncodedData":
        return EncodedData(*(a[index] for a in dataclasses.astuple(self)))

    def split(self, validation_fraction: float, seed: int = 0):
        """`(train, validation)`, the validation part a seeded random `validation_fraction`."""
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = max(1, int(round(len(self) * validation_fraction)))
        if n_val >= len(self):
            raise DataError(f"{len(self)} example(s) are too few to hold out a validation part")
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]))

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def _batch(self, index):
        return ({"token_ids": self.token_ids[index], "padding_mask": self.padding_mask[index]},
                self.labels[index], self.sample_weight[index])

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, repeat: bool = False):
        """A generator of numpy batches (any backend). With `repeat=True` it never ends: give
        `fit` `steps_per_epoch=data.num_batches(batch_size)`."""
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
            for start in range(0, len(self), batch_size):
                yield self._batch(np.sort(order[start:start + batch_size]))
            if not repeat:
                return

    def tf_dataset(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                   drop_remainder: bool = False):
        """A `tf.data.Dataset` of batches, reshuffled every epoch (works on every backend)."""
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices(self._batch(slice(None)))
        if shuffle:
            ds = ds.shuffle(len(self), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)


def pack(encoded, sequence_length=None, truncate=False, pad_id=0, wheres=None) -> EncodedData:
    """Pad `[(ids, trained)]` into an `EncodedData` of model inputs `sequence_length` long.

    An example of n tokens gives n - 1 inputs (each predicts the next token), so it fits when
    n <= sequence_length + 1. Longer examples are an error naming their line, unless
    `truncate=True` cuts them. `sequence_length=None` takes the longest example, rounded up
    to a multiple of 8.
    """
    if not encoded:
        raise DataError("no examples to pack")
    longest = max(len(ids) for ids, _ in encoded) - 1
    if sequence_length is None:
        sequence_length = -(-longest // 8) * 8
    wheres = wheres or [f"example {i}" for i in range(len(encoded))]
    n = len(encoded)
    token_ids = np.full((n, sequence_length), pad_id, np.int32)
    labels = np.full((n, sequence_length), pad_id, np.int32)
    padding_mask = np.zeros((n, sequence_length), np.int32)
    sample_weight = np.zeros((n, sequence_length), np.float32)
    for i, (ids, trained) in enumerate(encoded):
        if len(ids) - 1 > sequence_length:
            if not truncate:
                raise DataError(
                    f"{wheres[i]}: {len(ids)} tokens, longer than sequence_length="
                    f"{sequence_length} allows ({sequence_length + 1} tokens); raise "
                    "sequence_length, shorten the record, or truncate"
                )
            ids, trained = ids[:sequence_length + 1], trained[:sequence_length + 1]
        length = len(ids) - 1
        token_ids[i, :length] = ids[:-1]
        labels[i, :length] = ids[1:]
        padding_mask[i, :length] = 1
        sample_weight[i, :length] = trained[1:]
        if not sample_weight[i].any():
            raise DataError(f"{wheres[i]}: no trained token is left after truncation to "
                            f"sequence_length={sequence_length}")
    return EncodedData(token_ids, padding_mask, labels, sample_weight)


def encode_records(records, tokenizer, sequence_length=None, truncate=False) -> EncodedData:
    """Encode and pad records (dicts, or `(where, dict)` pairs as `read_jsonl` returns)."""
    records = [r if isinstance(r, tuple) else (f"record {i}", r) for i, r in enumerate(records)]
    if not records:
        raise DataError("no records given")
    encoded = [encode_record(record, tokenizer, where) for where, record in records]
    return pack(encoded, sequence_length, truncate, tokenizer.pad_id,
                wheres=[where for where, _ in records])


def load_jsonl(path, tokenizer, sequence_length=None, truncate=False) -> EncodedData:
    """Read, encode and pad a JSONL file; errors name the file and line."""
    return encode_records(read_jsonl(path), tokenizer, sequence_length, truncate)
