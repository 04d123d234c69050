"""EleutherAI's lm-evaluation-harness over the scoring interface.

`GemmaLM(scorer)` is an `lm_eval.api.model.LM` (registered as "gemma-keras"), so
`lm_eval.simple_evaluate(model=GemmaLM(scorer), tasks=[...])` evaluates a Keras model, a
`.tflite` file or a SavedModel on any harness task:

- `loglikelihood(context, continuation)`: the continuation's tokens
  (`encode(continuation, add_bos=False)`) scored after `<bos>` + `encode(context)`, batched;
  `is_greedy` from the logits (False on a SavedModel, whose `score` gives no argmax).
- `loglikelihood_rolling(text)`: the harness' own rolling windows
  (`lm_eval.utils.get_rolling_token_windows`, `<bos>` as the prefix token).
- `generate_until`: the runtime's greedy generation, cut at the first stop string.

Needs `pip install gemma-keras[eval]`.
"""

from __future__ import annotations

from gemma_keras import defaults
from gemma_keras.evaluation.scorers import open_scorer, score_tails

_MISSING = ("lm-evaluation-harness is not installed; pip install 'gemma-keras[eval]' "
            "(the lm-eval package)")


def require_lm_eval():
    """Raise a clear error when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(_MISSING) from None


try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the module imports; using it raises _MISSING
    LM = object

    def register_model(*names):
        return lambda cls: cls


@register_model("gemma-keras")
class GemmaLM(LM):
    """An lm-eval model over a `gemma_keras.evaluation.scorers.Scorer`.

    Args:
      scorer: a Scorer; or build one from `model` (Keras model directory), `tflite` (file)
        or `saved_model` (version directory), with `tokenizer`, `dtype`, `batch_size` (so that
        `simple_evaluate(model="gemma-keras", model_args="tflite=g.tflite")` works).
      max_length: the longest sequence scored (contexts are cut from the left to fit);
        default the runtime's limit, or 1024.
    """

    def __init__(self, scorer=None, model=None, tflite=None, saved_model=None, tokenizer=None,
                 dtype=None, batch_size=None, max_length=None, **_harness_kwargs):
        require_lm_eval()
        super().__init__()
        if scorer is None:
            kinds = [(k, p) for k, p in (("model", model), ("tflite", tflite),
                                         ("saved_model", saved_model)) if p]
            if len(kinds) != 1:
                raise ValueError("give one of model=, tflite=, saved_model= (or scorer=)")
            scorer = open_scorer(*kinds[0], tokenizer=tokenizer, dtype=dtype)
        self.scorer = scorer
        self.max_length = defaults.eval_context(
            None if max_length is None else int(max_length), scorer.max_length)
        if batch_size not in (None, "auto"):
            scorer.batch_size = int(batch_size)
        self.tokenizer = scorer.tokenizer

    # --------------------------------------------------------------- scoring
    def _fit(self, context, continuation):
        """`context + continuation` cut from the left to `max_length` tokens."""
        if len(continuation) >= self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"{self.max_length} tokens scored")
        return (context + continuation)[-self.max_length:]

    def _score_pairs(self, pairs):
        """(sum of log-probs, is_greedy) of each (context ids, continuation ids)."""
        sequences = [self._fit(c, x) for c, x in pairs]
        tails = score_tails(self.scorer, sequences, [len(x) for _, x in pairs])
        return [(float(t.log_probs.sum()),
                 bool(t.is_top1 is not None and t.is_top1.all())) for t in tails]

    def loglikelihood(self, requests):
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self.tokenizer.encode(context, add_bos=True),
                          self.tokenizer.encode(continuation, add_bos=False)))
        return self._score_pairs(pairs)

    def loglikelihood_rolling(self, requests):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                    token_list=self.tokenizer.encode(text, add_bos=False),
                    prefix_token=self.tokenizer.bos_id, max_seq_len=self.max_length,
                    context_len=1):
                pairs.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._score_pairs(pairs)):
            totals[owner] += log_prob
        return totals

    def generate_until(self, requests):
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = self.scorer.complete(context, int(kwargs.get("max_gen_toks", 256)))
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


def run_tasks(scorer, tasks, include_path=None, limit=None, num_fewshot=None,
              context=None) -> dict:
    """Run lm-evaluation-harness `tasks` (names; `include_path`: a folder of task YAML files)
    on `scorer`; returns {"task", "model", "results", "table"}."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = simple_evaluate(model=GemmaLM(scorer, max_length=context), tasks=list(tasks),
                              num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=False)
    if results is None:
        raise ValueError(f"lm-evaluation-harness returned no results for {tasks}")
    return {"task": "harness", "model": scorer.name, "results": results["results"],
            "table": make_table(results)}
