"""Perplexity of a scorer on documents (llama-perplexity's and Hugging Face's measure).

`perplexity = exp(nll)`, `nll` the mean negative log-likelihood (nats) of every predicted
token, accumulated in float64; `bits_per_byte = total nll / ln 2 / UTF-8 bytes of the
documents` (lm-evaluation-harness' bits_per_byte, comparable across tokenizers).
"""

from __future__ import annotations

import math

from gemma_keras import defaults
from gemma_keras.evaluation.scorers import score_tails
from gemma_keras.evaluation.windows import document_windows


def summary(total_nll, tokens, n_bytes) -> dict:
    """The perplexity fields of a total negative log-likelihood over `tokens` tokens."""
    nll = total_nll / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(tokens),
            "bits_per_byte": total_nll / math.log(2) / n_bytes}


def windows_for(scorer, documents, context=None, stride=None):
    """(windows, context): the documents cut for `scorer` (context defaults to the runtime's
    limit, at most 1024)."""
    context = defaults.eval_context(context, scorer.max_length)
    if scorer.max_length is not None and context > scorer.max_length:
        raise ValueError(f"--context {context} is longer than {scorer.name} can score "
                         f"({scorer.max_length} tokens)")
    return document_windows(scorer.tokenizer, documents, context, stride), context


def perplexity(scorer, documents, context=None, stride=None, progress=False) -> dict:
    """Perplexity, mean nll, predicted tokens and bits per byte of `scorer` on `documents`
    (`gemma_keras.evaluation.data.Document`s), with the windows' `context` and `stride`."""
    windows, context = windows_for(scorer, documents, context, stride)
    scores = score_tails(scorer, [w.token_ids for w in windows], [w.scored for w in windows],
                         progress)
    total = math.fsum(-float(s.log_probs.sum()) for s in scores)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    return {**summary(total, sum(w.scored for w in windows), n_bytes),
            "documents": len(documents), "windows": len(windows), "context": context,
            "stride": stride}
