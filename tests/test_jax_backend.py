"""The same parity against transformers on the JAX backend, in a separate process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import torch_logits

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from gemma_keras.converters import load_hf_checkpoint
    args = json.loads(sys.argv[1])
    ids, mask = np.array(args["ids"], "int32"), np.array(args["mask"], "int32")
    model = load_hf_checkpoint(args["checkpoint"])
    logits = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
    cache = model.backbone.init_cache(ids.shape[0], ids.shape[1])
    hidden, _ = model.backbone.call_with_cache(ids, cache, 0)
    np.savez(args["out"], logits=logits, cached=np.asarray(model.logits(hidden)))
    """
)


def test_jax_backend_matches_transformers(hf_model, hf_checkpoint, padded_batch, tmp_path):
    ids, mask = padded_batch
    out = tmp_path / "jax_logits.npz"
    args = json.dumps({"ids": ids.tolist(), "mask": mask.tolist(),
                       "checkpoint": str(hf_checkpoint), "out": str(out)})
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    got = np.load(out)
    ref = torch_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got["logits"][valid], ref[valid], atol=1e-4, rtol=0)
    # Row 0 has no padding: the cached front door agrees with the reference too.
    np.testing.assert_allclose(got["cached"][0], ref[0], atol=1e-4, rtol=0)


TOKENIZER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from gemma_keras.pretrained import load_model
    path, text = sys.argv[1], sys.argv[2]
    load_model().save(path)
    loaded = keras.saving.load_model(path)
    print(json.dumps(loaded.tokenizer.encode(text)))
    """
)


def test_jax_keras_file_keeps_the_tokenizer(tmp_path):
    """On JAX too, a `.keras` file carries the tokenizer: the ids match the bundled one's."""
    from gemma_keras.tiny_task import tiny_model_dir
    from gemma_keras.tokenizer import GemmaTokenizer

    text = "<start_of_turn>user\nreverse: red fish<end_of_turn>\n<start_of_turn>model\n"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", TOKENIZER_SCRIPT, str(tmp_path / "t.keras"),
                             text], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = GemmaTokenizer(os.path.join(tiny_model_dir(), "tokenizer.model")).encode(text)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
