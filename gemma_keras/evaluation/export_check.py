"""`export-tflite --check`: how far a `.tflite` export departs from the float model.

After an export, `check_export` scores a held-out text (a file, or the built-in
`heldout.HELDOUT_TEXT`) with the export and with the float model it came from and returns the
agreement report (`agreement.agreement`: perplexity of both, KL divergence, top-1
agreement) with `warnings` when the export departs from the float model by more than:

- KL_WARN = 0.05 nats per token (mean KL divergence of the export's next-token distribution
  from the float model's). On text drawn from the float model, the export's cross-entropy
  exceeds the float model's by exactly this mean KL, so 0.05 nats is a perplexity about 5%
  higher (exp(0.05) = 1.051).
- TOP1_WARN = 0.90: fewer than 90% of positions put the same token first, i.e. greedy
  decoding departs from the float model's at more than one token in ten.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from gemma_keras.evaluation.evaluate import evaluate
from gemma_keras.evaluation.heldout import HELDOUT_TEXT

KL_WARN = 0.05
TOP1_WARN = 0.90


def quantization_warnings(report) -> list[str]:
    """The departures of an agreement report beyond KL_WARN and TOP1_WARN."""
    out = []
    if report.get("kl_mean") is not None and report["kl_mean"] > KL_WARN:
        out.append(f"mean KL divergence {report['kl_mean']:.4g} nats/token exceeds "
                   f"{KL_WARN} (about {100 * math.expm1(KL_WARN):.0f}% perplexity)")
    if report.get("top1_agreement") is not None and report["top1_agreement"] < TOP1_WARN:
        out.append(f"top-1 agreement {report['top1_agreement']:.1%} is below "
                   f"{TOP1_WARN:.0%}")
    return out


def check_export(tflite_path, model_dir, data=None, context=None, stride=None,
                 tokenizer=None, progress=False) -> dict:
    """Agreement of the export `tflite_path` (with `score_<T>` signatures) with the float
    model in `model_dir`, on `data` (a .jsonl or .txt file; default the built-in held-out
    text, in windows of `context` tokens), plus `warnings`."""
    builtin = data is None
    with tempfile.TemporaryDirectory() as work:
        if builtin:
            data = Path(work) / "heldout.txt"
            data.write_text(HELDOUT_TEXT, encoding="utf-8")
        report = evaluate(data=os.fspath(data), tflite=os.fspath(tflite_path),
                          tokenizer=tokenizer, reference=os.fspath(model_dir),
                          context=context, stride=stride, progress=progress)
    report["data"] = "built-in held-out text" if builtin else str(data)
    report["warnings"] = quantization_warnings(report)
    return report
