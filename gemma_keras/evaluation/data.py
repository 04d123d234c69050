"""Evaluation data files, read and checked before any model is loaded.

- Perplexity: a `.jsonl` file of `{"text": str}` records (each record one document), or a
  `.txt` file (the whole file is one document).
- Multiple choice: a `.jsonl` file of `{"prompt": str, "choices": [str, ...], "answer": int}`.

Lines are read by `gemma_keras.data.read_jsonl` (the fine-tuning reader); every error is its
`DataError` (a `ValueError`), whose message starts with "FILE line N:" (or "FILE:" for the
whole file) and says what was expected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gemma_keras.data import DataError, read_jsonl

__all__ = ["DataError", "Document", "Question", "read_documents", "read_questions"]


@dataclasses.dataclass(frozen=True)
class Document:
    """One document to score; `source` is "FILE line N" (or "FILE" for a `.txt` file)."""

    text: str
    source: str


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice record; `source` is "FILE line N"."""

    prompt: str
    choices: tuple
    answer: int
    source: str


def _string(record, key, where, what):
    if key not in record:
        raise DataError(f"{where}: the record has no {key!r} field ({what}); its fields are "
                        f"{sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
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
    for where, record in read_jsonl(path, expected="a 'text' field"):
        text = _string(record, "text", where, "the document to score")
        if not text:
            raise DataError(f"{where}: 'text' is empty")
        documents.append(Document(text, where))
    return documents


def read_questions(path) -> list[Question]:
    """The records of a multiple-choice `.jsonl` file, each checked (choices, answer)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: expected a .jsonl file of {{\"prompt\", \"choices\", "
                        f"\"answer\"}} records")
    questions = []
    for where, record in read_jsonl(path, expected="'prompt', 'choices' and 'answer'"):
        prompt = _string(record, "prompt", where, "the question's context")
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(
                isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two non-empty "
                            f"strings, got {choices!r}")
        answer = record.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f"{where}: 'answer' must be an integer (the index of the right "
                            f"choice), got {answer!r}")
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' {answer} is out of range for {len(choices)} "
                            f"choices (0 to {len(choices) - 1})")
        questions.append(Question(prompt, tuple(choices), answer, where))
    return questions
