"""Multiple choice: the score of a choice is the sum of the log-probabilities of its tokens
(`encode(choice, add_bos=False)`) after `<bos>` + `encode(prompt)`.

`accuracy` takes the argmax of the scores; `accuracy_norm` the argmax of the scores divided
by each choice's length in UTF-8 bytes (lm-evaluation-harness' acc_norm divides by the length
in characters: the same for ASCII text).
"""

from __future__ import annotations

import json

import numpy as np

from gemma_keras.atomic_files import write_atomically
from gemma_keras.evaluation.data import DataError
from gemma_keras.evaluation.scorers import score_tails


def choice_sequences(tokenizer, questions, max_length=None):
    """(sequences, counts, owners): one `<bos>` + prompt + choice token list per choice, how
    many tokens the choice has, and the index of its question."""
    sequences, counts, owners = [], [], []
    for q_index, question in enumerate(questions):
        context = tokenizer.encode(question.prompt, add_bos=True)
        for c_index, choice in enumerate(question.choices):
            continuation = tokenizer.encode(choice, add_bos=False)
            if not continuation:
                raise DataError(f"{question.source}: choice {c_index} encodes to no token")
            if max_length is not None and len(context) + len(continuation) > max_length:
                raise DataError(f"{question.source}: prompt and choice {c_index} take "
                                f"{len(context) + len(continuation)} tokens, more than the "
                                f"{max_length} the model scores")
            sequences.append(context + continuation)
            counts.append(len(continuation))
            owners.append(q_index)
    return sequences, counts, owners


def choice_scores(scorer, questions, progress=False) -> list[np.ndarray]:
    """float64 [choices] scores of each question."""
    sequences, counts, owners = choice_sequences(scorer.tokenizer, questions,
                                                 scorer.max_length)
    tails = score_tails(scorer, sequences, counts, progress)
    scores = [[] for _ in questions]
    for owner, tail in zip(owners, tails):
        scores[owner].append(float(tail.log_probs.sum()))
    return [np.array(s, np.float64) for s in scores]


def evaluate_choice(scorer, questions, output=None, progress=False) -> dict:
    """`accuracy`, `accuracy_norm` and `count` of `scorer` on `questions`; with `output`, a
    `.jsonl` file gets one line per question: its `scores`, `pred`, `pred_norm`, `answer`."""
    rows = []
    for question, scores in zip(questions, choice_scores(scorer, questions, progress)):
        lengths = np.array([len(c.encode("utf-8")) for c in question.choices], np.float64)
        rows.append({"scores": scores.tolist(), "pred": int(np.argmax(scores)),
                     "pred_norm": int(np.argmax(scores / lengths)), "answer": question.answer,
                     "source": question.source})
    if output is not None:
        write_jsonl(output, rows)
    count = len(rows)
    return {"accuracy": sum(r["pred"] == r["answer"] for r in rows) / count,
            "accuracy_norm": sum(r["pred_norm"] == r["answer"] for r in rows) / count,
            "count": count}


def write_jsonl(path, rows):
    """Write `rows` as JSON lines under a temporary name, renamed when complete."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
