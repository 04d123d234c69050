"""Agreement of a model with a reference on the same tokens, as `llama-perplexity
--kl-divergence` reports it: the KL divergence of the evaluated model's next-token
distribution from the reference's, `KL(P_ref || P_model) = sum_v P_ref(v) (log P_ref(v) -
log P_model(v))` at every predicted position (mean, median, 99th percentile, max), how often
both put the same token first (top-1 agreement), and the perplexity of both.

A runtime that gives only the log-probabilities of the actual tokens (the SavedModel's
`score` signature) has no KL or top-1; the report names them under `unavailable` and gives
what the actual tokens allow: both perplexities and the differences of the log-probabilities.
"""

from __future__ import annotations

import math

import numpy as np

from gemma_keras.evaluation.perplexity import windows_for
from gemma_keras.evaluation.scorers import (
    batches,
    check_same_tokenizer,
    log_softmax,
    row_blocks,
    scores_from_logits,
)

NEEDS_DISTRIBUTION = ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement")


def _compare_logits(logits, reference_logits, token_ids, scored):
    """(kl, same_top1, log_p, reference_log_p) of the last `scored` predicted tokens."""
    n = len(token_ids)
    targets = np.asarray(token_ids[n - scored:])
    rows = slice(n - 1 - scored, n - 1)  # the positions that predict them
    logits, reference_logits = logits[rows], reference_logits[rows]
    out = [np.empty(scored), np.empty(scored, bool), np.empty(scored), np.empty(scored)]
    for block in row_blocks(scored, logits.shape[-1]):
        q, p = log_softmax(logits[block]), log_softmax(reference_logits[block])
        out[0][block] = (np.exp(p) * (p - q)).sum(-1)
        out[1][block] = q.argmax(-1) == p.argmax(-1)
        picked = targets[block, None]
        out[2][block] = np.take_along_axis(q, picked, -1)[:, 0]
        out[3][block] = np.take_along_axis(p, picked, -1)[:, 0]
    return out


def agreement(scorer, reference, documents, context=None, stride=None,
              progress=False) -> dict:
    """Compare `scorer` with `reference` (a scorer with logits, normally the float Keras
    model) on `documents`; both must use the same tokenizer."""
    if not reference.has_logits:
        raise ValueError(f"the reference ({reference.name}) must give logits: use a Keras "
                         "model directory")
    check_same_tokenizer(scorer.tokenizer, reference.tokenizer)
    windows, context = windows_for(scorer, documents, context, stride)
    for w in windows:
        reference.check_length(len(w.token_ids))
    sequences = [w.token_ids for w in windows]
    parts = {"kl": [], "top1": [], "log_p": [], "reference_log_p": []}
    batch_size = max(1, min(scorer.batch_size, reference.batch_size))
    for batch in batches(sequences, batch_size, progress, "agreement"):
        seqs = [sequences[i] for i in batch]
        reference_logits = reference.logits(seqs)
        if scorer.has_logits:
            for i, seq, z, ref in zip(batch, seqs, scorer.logits(seqs), reference_logits):
                for key, value in zip(parts, _compare_logits(z, ref, seq, windows[i].scored)):
                    parts[key].append(value)
            del reference_logits
            continue
        for i, seq, scores, ref in zip(batch, seqs, scorer.token_scores(seqs),
                                       reference_logits):
            k = windows[i].scored
            parts["log_p"].append(scores.log_probs[-k:])
            parts["reference_log_p"].append(scores_from_logits(ref, seq).log_probs[-k:])
    return _report(parts, scorer, reference, context, stride, len(documents), len(windows))


def _report(parts, scorer, reference, context, stride, n_documents, n_windows) -> dict:
    log_p = np.concatenate(parts["log_p"])
    ref_log_p = np.concatenate(parts["reference_log_p"])
    nll, ref_nll = -math.fsum(log_p) / len(log_p), -math.fsum(ref_log_p) / len(ref_log_p)
    diff = np.abs(log_p - ref_log_p)
    out = {"model": scorer.name, "reference": reference.name, "tokens": int(len(log_p)),
           "documents": n_documents, "windows": n_windows, "context": context,
           "stride": stride,
           "perplexity": math.exp(nll), "nll": nll,
           "reference_perplexity": math.exp(ref_nll), "reference_nll": ref_nll,
           "ln_ppl_ratio": nll - ref_nll,
           "log_prob_abs_diff_mean": float(diff.mean()),
           "log_prob_abs_diff_p99": float(np.percentile(diff, 99))}
    if parts["kl"]:
        kl = np.concatenate(parts["kl"])
        out.update(kl_mean=float(kl.mean()), kl_median=float(np.median(kl)),
                   kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                   top1_agreement=float(np.concatenate(parts["top1"]).mean()))
    else:
        out.update({key: None for key in NEEDS_DISTRIBUTION})
        out["unavailable"] = {
            "fields": list(NEEDS_DISTRIBUTION),
            "reason": f"{scorer.name} gives the log-probabilities of the actual tokens only "
                      "(the SavedModel's score signature), not the next-token distribution "
                      "that KL divergence and top-1 agreement need"}
    return out
