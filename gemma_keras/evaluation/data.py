"""Evaluation data files, read and checked before any model is loaded.

- Perplexity: a `.jsonl` file of `{"text": str}` records (each record one document), or a
  `.txt` file (the whole file is one document).
- Multiple choice: a `.jsonl` file of `{"prompt": str, "choices": [str, ...], "answer": int}`.

Every error is a `DataError` (a `ValueError`) that starts with `FILE:LINE:` (or `FILE:` for
the whole file) and says what was expected.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class DataError(ValueError):
    """Bad evaluation data; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document to score; `source` is "FILE:LINE" (or "FILE" for a `.txt` file)."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice record; `source` is "FILE:LINE"."""

    prompt: str
    choices: tuple
    answer: int
    source: str


def _jsonl_records(path):
    """Yield `(line_number, dict)` for every non-blank line of a `.jsonl` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got "
                                f"{type(record).__name__}")
            count += 1
            yield number, record
    if count == 0:
        raise DataError(f"{path}: the file holds no records")


def _string(record, key, path, number, what):
    if key not in record:
        raise DataError(f"{path}:{number}: the record has no {key!r} field ({what}); "
                        f"its fields are {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: {key!r} must be a string, got "
                        f"{type(value).__name__}")
    return value


def read_documents(path) -> list[Document]:
    """The documents of a `.jsonl` (`{"text": ...}` per line) or `.txt` file (one document)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        return [Document(text, str(path))]
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: expected a .jsonl file of {{\"text\": ...}} records or a "
                        f".txt file")
    documents = []
    for number, record in _jsonl_records(path):
        text = _string(record, "text", path, number, "the document to score")
        if not text:
            raise DataError(f"{path}:{number}: 'text' is empty")
        documents.append(Document(text, f"{path}:{number}"))
    return documents


def read_questions(path) -> list[Question]:
    """The records of a multiple-choice `.jsonl` file, each checked (choices, answer)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: expected a .jsonl file of {{\"prompt\", \"choices\", "
                        f"\"answer\"}} records")
    questions = []
    for number, record in _jsonl_records(path):
        prompt = _string(record, "prompt", path, number, "the question's context")
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) and c for c in choices):
            raise DataError(f"{path}:{number}: 'choices' must be a list of at least two "
                            f"non-empty strings, got {choices!r}")
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f"{path}:{number}: 'answer' must be an integer (the index of the "
                            f"right choice), got {answer!r}")
        if not 0 <= answer < len(choices):
            raise DataError(f"{path}:{number}: 'answer' {answer} is out of range for "
                            f"{len(choices)} choices (0 to {len(choices) - 1})")
        questions.append(Question(prompt, tuple(choices), answer, f"{path}:{number}"))
    return questions
