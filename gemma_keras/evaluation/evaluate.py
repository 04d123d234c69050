"""`evaluate(...)`: what `gemma-keras eval` runs, as one library call.

The data is read and checked first, then the tokenizers (the evaluated runtime's and the
reference's) are compared, and only then are the models loaded: bad input fails in seconds.
"""

from __future__ import annotations

from pathlib import Path

from gemma_keras import defaults
from gemma_keras.evaluation import data as data_lib
from gemma_keras.evaluation import scorers
from gemma_keras.evaluation.agreement import agreement
from gemma_keras.evaluation.choice import evaluate_choice
from gemma_keras.evaluation.perplexity import perplexity
from gemma_keras.tiny_task import model_dir_or_tiny
from gemma_keras.tokenizer import GemmaTokenizer

TASKS = ("perplexity", "choice")


def _source(model, tflite, saved_model):
    given = [(k, p) for k, p in (("tflite", tflite), ("saved_model", saved_model)) if p]
    if model is not None:
        given.insert(0, ("model", model))
    if len(given) > 1:
        raise ValueError("give one of --model, --tflite, --saved-model")
    if given:
        return given[0]
    return "model", model_dir_or_tiny(None)


def evaluate(data=None, task="perplexity", model=None, tflite=None, saved_model=None,
             tokenizer=None, dtype=None, reference=None, context=None, stride=None,
             batch_size=None, output=None, tasks=None, include_path=None, limit=None,
             num_fewshot=None, progress=False) -> dict:
    """Score one runtime (`model`: a Keras model directory, default the bundled tiny model;
    `tflite`: a `.tflite` file; `saved_model`: a SavedModel version directory) and return
    the report as a dict (see docs/evaluation.md).

    `task`: "perplexity" (`data`: .jsonl of {"text"} or .txt; with `reference`, a Keras
    model directory, the agreement report) or "choice" (`data`: .jsonl of {"prompt",
    "choices", "answer"}; `output`: per-question .jsonl). `tasks`: lm-evaluation-harness
    task names instead (with `include_path` for local task YAML files).
    """
    kind, path = _source(model, tflite, saved_model)
    if tasks:
        if data is not None or reference is not None:
            raise ValueError("--tasks runs lm-evaluation-harness tasks; --data and "
                             "--reference go with --task")
        from gemma_keras.evaluation import harness

        harness.require_lm_eval()
        with _open(kind, path, tokenizer, dtype, batch_size, context) as scorer:
            return harness.run_tasks(scorer, tasks, include_path=include_path, limit=limit,
                                     num_fewshot=num_fewshot, context=context)
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    if data is None:
        raise ValueError("--data FILE is required (or --tasks for lm-evaluation-harness)")
    if output is not None and task != "choice":
        raise ValueError("--output goes with --task choice")
    if reference is not None and task != "perplexity":
        raise ValueError("--reference goes with --task perplexity")
    if stride is not None and task != "perplexity":
        raise ValueError("--stride goes with --task perplexity")
    if task == "perplexity":
        documents = data_lib.read_documents(data)
    else:
        questions = data_lib.read_questions(data)
    tokenizer_file = scorers.tokenizer_path(kind, path, tokenizer)
    if reference is not None:
        scorers.check_same_tokenizer(
            GemmaTokenizer(tokenizer_file),
            GemmaTokenizer(scorers.tokenizer_path("model", reference)))
    with _open(kind, path, tokenizer, dtype, batch_size, context) as scorer:
        return _score(scorer, task, documents if task == "perplexity" else questions,
                      Path(data).suffix == ".txt", reference, context, stride, batch_size,
                      output, progress)


def _score(scorer, task, records, whole_text, reference, context, stride, batch_size, output,
           progress):
    if task == "choice":
        return {"task": "choice", "model": scorer.name,
                **evaluate_choice(scorer, records, output, progress)}
    context = defaults.eval_context(context, scorer.max_length)
    if stride is None and whole_text:
        stride = context  # one long document: disjoint windows unless --stride is given
    if reference is None:
        return {"task": "perplexity", "model": scorer.name,
                **perplexity(scorer, records, context, stride, progress)}
    reference_scorer = _open("model", reference, None, "float32", batch_size, context)
    return {"task": "agreement",
            **agreement(scorer, reference_scorer, records, context, stride, progress)}


def _open(kind, path, tokenizer, dtype, batch_size, context):
    scorer = scorers.open_scorer(kind, path, tokenizer, dtype)
    window = defaults.eval_context(context, scorer.max_length)
    scorer.batch_size = defaults.eval_batch_size(batch_size, window, scorer.vocab_size)
    return scorer
