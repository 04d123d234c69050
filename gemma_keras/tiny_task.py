"""The synthetic tasks of the bundled tiny model, and how to score a model on them.

The tiny model (`gemma_keras/assets/tiny`, see `scripts/train_tiny_model.py`) was trained on
one task, in Gemma's chat format:

    user:  "reverse: cat dog sun"        model: "sun dog cat"

Lists have 2 to 5 words drawn from `WORDS`. A second task, never seen in training, is left
for fine-tuning demos and tests ("repeat: cat dog sun" -> "cat dog sun").

Scoring is greedy exact match of the answer text. Any runtime can be scored the same way:
`exact_match_accuracy(generate_fn, examples)` calls `generate_fn(list_of_prompts)` (the
prompts are the user texts; the runtime applies the chat template) and compares the answers.

Example:
>>> examples = eval_examples()                          # the 200 held-out prompts
>>> acc = exact_match_accuracy(lambda p: keras_answers(model, p), examples)
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np

from gemma_keras.atomic_files import write_atomically

TINY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
EVAL_FILE = "eval.jsonl"

WORDS = (
    "cat dog sun moon star tree fish bird red blue green gold big small hot cold "
    "one two six ten up down left right old new fast slow rain snow king queen"
).split()
MIN_WORDS, MAX_WORDS = 2, 5
TASKS = {
    "reverse": lambda words: words[::-1],   # the tiny model's training task
    "repeat": lambda words: list(words),    # the new task for fine-tuning demos
}
MAX_NEW_TOKENS = MAX_WORDS + 2  # one token per word, then <end_of_turn>


def tiny_model_dir() -> str:
    """Directory of the bundled tiny model (HF layout: config.json, model.safetensors,
    tokenizer.model, eval.jsonl); the default `--model` of the `gemma-keras` subcommands."""
    return str(TINY_MODEL_DIR)


def model_dir_or_tiny(directory=None) -> str:
    """`directory`, or the bundled tiny model's when it is None; an error names a missing one."""
    if directory is None:
        directory = tiny_model_dir()
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"the bundled tiny model is not installed ({directory}); "
                                    "pass --model DIR")
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    return str(directory)


def make_example(words, task="reverse") -> dict:
    """`{"prompt", "response"}` for one word list."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return {"prompt": f"{task}: {' '.join(words)}", "response": " ".join(TASKS[task](words))}


def random_examples(n, seed, task="reverse", exclude=()) -> list[dict]:
    """`n` distinct examples with random word lists, none of whose prompts is in `exclude`."""
    rng = np.random.default_rng(seed)
    seen = set(exclude)
    out = []
    while len(out) < n:
        length = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), length)]
        example = make_example(words, task)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
    return out


def held_out_examples(task="reverse", n=200) -> list[dict]:
    """The held-out evaluation prompts of `task` (seeded; never used for training)."""
    return random_examples(n, seed=10_000 + sorted(TASKS).index(task), task=task)


def training_examples(n, seed=0, task="reverse") -> list[dict]:
    """Training examples of `task`, disjoint from its held-out prompts."""
    held_out = {e["prompt"] for e in held_out_examples(task)}
    return random_examples(n, seed=seed, task=task, exclude=held_out)


def eval_examples(directory=None) -> list[dict]:
    """The 200 held-out "reverse" examples stored beside the tiny model (`eval.jsonl`)."""
    path = Path(directory or TINY_MODEL_DIR) / EVAL_FILE
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer_corpus() -> list[str]:
    """Lines to train the tiny model's SentencePiece tokenizer on: every task, every word."""
    # Single characters of ordinary text, so that any English prompt encodes without <unk>;
    # the role names and task names often enough to be one piece each.
    lines = [" ".join(string.ascii_letters + string.digits + string.punctuation)] * 20
    lines += ["user", "model", "reverse: ", "repeat: "] * 200
    for task in sorted(TASKS):
        for example in random_examples(1000, seed=99, task=task):
            lines += [example["prompt"], example["response"]]
    return lines


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match_accuracy(generate_fn, examples, batch_size=200) -> float:
    """Fraction of `examples` whose greedy answer equals the response (whitespace-normalised).

    `generate_fn(prompts)` takes a list of user texts and returns the answer texts.
    """
    hits = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        answers = generate_fn([e["prompt"] for e in batch])
        if len(answers) != len(batch):
            raise ValueError(f"generate_fn returned {len(answers)} answers for {len(batch)} "
                             "prompts")
        hits += sum(normalise(a) == normalise(e["response"]) for a, e in zip(answers, batch))
    return hits / len(examples)


def chat_prompts(tokenizer, prompts) -> list[str]:
    """Each user text as a one-turn Gemma chat prompt, ready for the model to answer."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def keras_answers(model, prompts, max_new_tokens=MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of a `Gemma2CausalLM` (tokenizer attached) to user texts: the
    `generate_fn` for `exact_match_accuracy`."""
    return model.generate(chat_prompts(model.tokenizer, prompts), max_new_tokens=max_new_tokens)


def teacher_forced_exact_match(model, data, batch_size=256) -> float:
    """Fraction of examples in `data` (`gemma_keras.data.EncodedData`) whose every trained
    token is the argmax given the true prefix. For greedy decoding this is the same event as
    an exact match of the answer tokens (end of turn included), so it scores a Keras model
    with one forward pass instead of a generation loop."""
    hits = 0
    for start in range(0, len(data), batch_size):
        part = data.subset(slice(start, start + batch_size))
        logits = model.predict_on_batch({"token_ids": part.token_ids,
                                         "padding_mask": part.padding_mask})
        correct = np.asarray(logits).argmax(-1) == part.labels
        counted = part.sample_weight > 0
        hits += int(np.all(correct | ~counted, axis=1).sum())
    return hits / len(data)


def write_eval_file(directory, examples=None) -> str:
    """Write the held-out examples as `eval.jsonl` in `directory`."""
    examples = examples if examples is not None else held_out_examples()
    path = os.path.join(directory, EVAL_FILE)
    write_atomically(path, "".join(json.dumps(e) + "\n" for e in examples))
    return path
