"""`--verify`: run a gemma-keras model directory and a Hugging Face directory on the same
short input and compare their logits.

The reference is transformers' `Gemma2ForCausalLM` (torch, float32, eager attention) when
transformers and torch are installed, else this package's own HF reader. Both sides compute
in float32; when either side stores weights in a narrower dtype (bfloat16, float16), both
sides' weights are rounded through it first, so the comparison measures the conversion and not
the rounding that the chosen dtype implies. One model is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np

from gemma_keras.config import Gemma2Config
from gemma_keras.converters.keras_dir import read_metadata
from gemma_keras.converters.safetensors_io import SafetensorsCheckpoint, numpy_dtype
from gemma_keras.pretrained import load_hf_checkpoint, load_model_dir

DEFAULT_ATOL = 1e-2  # float32 noise is ~1e-5; a wrong layout is off by whole units


@dataclasses.dataclass
class VerifyResult:
    max_abs_diff: float
    atol: float
    reference: str
    rounded_to: list

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.atol)

    def line(self) -> str:
        status = "ok" if self.passed else "FAILED"
        rounded = f", weights rounded through {'+'.join(self.rounded_to)}" if self.rounded_to else ""
        return (f"verify {status}: max |logit difference| {self.max_abs_diff:.3g} "
                f"(threshold {self.atol:g}) against {self.reference}{rounded}")


def verify_input(vocab_size, length=16, seed=0) -> np.ndarray:
    """[1, length] token ids: bos then random ordinary ids."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[2], rng.integers(3, vocab_size, length - 1)])[None].astype("int32")


def _round(array: np.ndarray, dtypes) -> np.ndarray:
    for dtype in dtypes:
        array = array.astype(numpy_dtype(dtype)).astype(np.float32)
    return array


def keras_logits(keras_dir, ids, round_to=()) -> np.ndarray:
    model = load_model_dir(keras_dir, dtype="float32")
    if round_to:
        for w in model.weights:
            w.assign(_round(np.asarray(w.numpy()), round_to))
    logits = np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    del model
    gc.collect()
    return logits


def reference_logits(hf_dir, ids, round_to=()) -> tuple[np.ndarray, str]:
    """Logits of the HF directory and the name of what computed them."""
    try:
        import torch
        import transformers
    except ImportError:
        model = load_hf_checkpoint(hf_dir, dtype="float32")
        if round_to:
            for w in model.weights:
                w.assign(_round(np.asarray(w.numpy()), round_to))
        logits = np.asarray(model({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
        return logits, "gemma-keras's HF reader (transformers/torch not installed)"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        if round_to:
            for p in model.parameters():
                p.copy_(torch.from_numpy(_round(p.detach().numpy(), round_to)))
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    del model
    gc.collect()
    return logits, f"transformers {transformers.__version__} (torch {torch.__version__})"


def verify_conversion(keras_dir, hf_dir, atol=DEFAULT_ATOL, length=16) -> VerifyResult:
    """Compare a gemma-keras directory with a Hugging Face directory on one short input."""
    keras_dtype = read_metadata(keras_dir)["dtype"]
    hf_dtype = SafetensorsCheckpoint(hf_dir).float_dtype("model.embed_tokens.weight")
    round_to = sorted({keras_dtype, hf_dtype} - {"float32"})
    vocab = Gemma2Config.from_json_file(Path(hf_dir) / "config.json").vocab_size
    ids = verify_input(vocab, length)
    # Weights stored in a dtype are already rounded through it: each side rounds only
    # through the other's.
    ours = keras_logits(keras_dir, ids, [d for d in round_to if d != keras_dtype])
    ref, name = reference_logits(hf_dir, ids, [d for d in round_to if d != hf_dtype])
    return VerifyResult(float(np.abs(ours - ref).max()), atol, name, round_to)
