"""Loading a `Gemma2CausalLM` from disk, tokenizer included.

- `load_model(directory=None, dtype=None)`: a gemma-keras or Hugging Face model directory
  (`Gemma2CausalLM.from_pretrained`), or the bundled tiny model when `directory` is None.
- `load_hf_checkpoint(path, dtype=None, quantize=None, progress=False)`: a Hugging Face
  Gemma 2 directory.
- `load_model_dir(directory, dtype=None)`: a gemma-keras model directory (`gemma-keras convert`).

The readers (`gemma_keras.converters.hf_checkpoint.open_hf_checkpoint`,
`gemma_keras.converters.keras_dir.open_model_dir`) open a directory; `Gemma2CausalLM.from_files`
builds the model and streams the weights in.

Example:
>>> model = load_model("gemma2-2b-keras")
>>> model.tokenizer.decode(model.tokenizer.encode("hello"))
'hello'
"""

from __future__ import annotations

from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.converters.hf_checkpoint import open_hf_checkpoint
from gemma_keras.converters.keras_dir import open_model_dir
from gemma_keras.tiny_task import model_dir_or_tiny


def load_model(directory=None, dtype=None):
    """`Gemma2CausalLM.from_pretrained(directory)` (a gemma-keras or Hugging Face model
    directory, tokenizer included); `None` loads the bundled tiny model."""
    return Gemma2CausalLM.from_pretrained(model_dir_or_tiny(directory), dtype=dtype)


def load_hf_checkpoint(path, dtype=None, quantize=None, progress=False):
    """Load a Hugging Face Gemma 2 checkpoint directory as a `Gemma2CausalLM`.

    Args:
      path: directory with config.json and model.safetensors (or sharded model-*.safetensors
        with model.safetensors.index.json); float32, float16 or bfloat16 tensors.
      dtype: Keras dtype policy of the model ("float32" by default: on CPU Keras computes
        fastest in float32).
      quantize: "int8" or "int4" (per channel) to store the projections and the tied
        embedding quantized, each tensor quantized as it is read (the float weights are
        never whole in memory).
      progress: show a progress bar.

    The config's model_type, and every tensor's presence and shape, are checked before any
    weight is read; an error lists the missing, misshapen or unexpected names. A
    `tokenizer.model` in the directory travels with the model as `model.tokenizer`.

    Example:
    >>> model = load_hf_checkpoint("gemma-2-2b", dtype="bfloat16")
    """
    return Gemma2CausalLM.from_files(open_hf_checkpoint(path), dtype=dtype, quantize=quantize,
                                     progress=progress)


def load_model_dir(directory, dtype=None):
    """Load a gemma-keras model directory as a `Gemma2CausalLM`, tokenizer included.

    `dtype` is the Keras dtype policy (default: the dtype the weights were saved in).
    """
    return Gemma2CausalLM.from_files(open_model_dir(directory), dtype=dtype)
