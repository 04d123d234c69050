"""What both directions share about a model directory: the tokenizer file beside the weights,
and `PretrainedFiles`, a directory as `Gemma2CausalLM.from_pretrained` reads it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from gemma_keras.config import Gemma2Config
from gemma_keras.tokenizer import GemmaTokenizer

TOKENIZER_NAME = "tokenizer.model"


def write_tokenizer(model, out_dir, tokenizer_path=None) -> bool:
    """Write `out_dir/tokenizer.model`: a copy of `tokenizer_path` when one is given, else the
    tokenizer that travels with `model`. False when there is none to write."""
    target = Path(out_dir) / TOKENIZER_NAME
    if tokenizer_path is not None:
        if not Path(tokenizer_path).is_file():
            return False
        shutil.copyfile(tokenizer_path, target)
        return True
    if model.tokenizer is None:
        return False
    model.tokenizer.save_proto(target)
    return True


def read_tokenizer(directory):
    """The `GemmaTokenizer` of `directory/tokenizer.model`, or None without that file."""
    path = Path(directory) / TOKENIZER_NAME
    return GemmaTokenizer(path) if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class PretrainedFiles:
    """A model directory, opened: its config, the dtype its weights are stored in, its
    tokenizer (or None), and `fill(model, progress=False)`, which streams the weights into a
    model built from `config` (also one built quantized, when `fills_quantized`).
    `Gemma2CausalLM.from_files` builds and fills."""

    directory: Path
    config: Gemma2Config
    dtype: str
    tokenizer: GemmaTokenizer | None
    fill: Callable
    fills_quantized: bool = False
