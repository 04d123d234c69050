"""`gemma-keras demo`: the whole path on the bundled tiny model, offline, in a few minutes.

1. convert the tiny model from Hugging Face layout to a gemma-keras model directory;
2. generate answers to its own task (reversing word lists);
3. LoRA-fine-tune it on a task it has never seen ("repeat" the words) and show the held-out
   exact-match accuracy before and after; merge the adapters and save the model;
4. export to TFLite and to a SavedModel, and answer the same prompts with each.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import keras

from gemma_keras import tiny_task
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.converters.convert import convert_hf_to_keras
from gemma_keras.converters.keras_dir import save_model_dir
from gemma_keras.data import encode_records
from gemma_keras.lora import save_lora_weights
from gemma_keras.saved_model import export_saved_model
from gemma_keras.tflite.export import export_tflite
from gemma_keras.tflite.native_log import stderr_captured
from gemma_keras.tflite.runtime import GemmaTFLite
from gemma_keras.training import adamw

DEMO_PROMPTS = ["reverse: red fish blue fish", "reverse: king queen star",
                "reverse: one two six ten up"]
NEW_TASK = "repeat"
NEW_TASK_PROMPTS = ["repeat: red fish blue fish", "repeat: king queen star",
                    "repeat: one two six ten up"]


class _Report:
    def __init__(self, echo):
        self.echo, self.start = echo, time.perf_counter()

    def section(self, title):
        self.echo(f"\n== {title}  [{time.perf_counter() - self.start:.0f} s]")

    def answers(self, prompts, answers):
        for prompt, answer in zip(prompts, answers):
            self.echo(f"  {prompt!r:36} -> {answer!r}")


def run_demo(workdir=None, lora_rank=8, lora_steps=256, exports=True, echo=print,
             seed=0) -> dict:
    """Run the demo, printing as it goes; return the numbers it showed. `seed` sets the
    initial LoRA weights and dropout (benchmarks/demo_robustness.py varies it)."""
    keras.utils.set_random_seed(seed)
    report = _Report(echo)
    work = Path(workdir or tempfile.mkdtemp(prefix="gemma-keras-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"workdir": str(work)}

    report.section("1. Convert the bundled tiny Gemma 2 (Hugging Face layout) to Keras")
    summary = convert_hf_to_keras(tiny_task.tiny_model_dir(), work / "tiny-keras", overwrite=True)
    echo("  " + summary.line())
    model = Gemma2CausalLM.from_pretrained(work / "tiny-keras")

    report.section("2. Generate (greedy) with the task it was trained on")
    held_out = tiny_task.held_out_examples(NEW_TASK, n=100)
    shown = DEMO_PROMPTS + NEW_TASK_PROMPTS[:1]
    answers, result["before"] = _answer_and_score(model, shown, held_out)
    report.answers(shown, answers)
    echo(f"  new task {NEW_TASK!r}, exact match on {len(held_out)} held-out prompts: "
         f"{result['before']:.0%}")

    report.section(f"3. LoRA fine-tune (rank {lora_rank}) on {NEW_TASK!r}")
    train = encode_records(tiny_task.training_examples(4096, task=NEW_TASK), model.tokenizer,
                           sequence_length=32)
    model.enable_lora(lora_rank, targets="all")
    trainable = sum(int(v.numpy().size) for v in model.trainable_variables)
    echo(f"  {trainable:,} trainable LoRA parameters of "
         f"{sum(int(v.numpy().size) for v in model.variables):,}")
    # A from-scratch 64-wide model takes a larger step than the default for real checkpoints:
    # a short warm-up to 1e-2, then cosine decay, so that the last steps settle whatever the
    # CPU's rounding did to the trajectory. Without XLA the tiny train step is faster on CPU.
    epochs = max(1, lora_steps // train.num_batches(32))
    steps = epochs * train.num_batches(32)
    schedule = keras.optimizers.schedules.CosineDecay(
        1e-3, decay_steps=steps - steps // 10, alpha=0.02, warmup_target=1e-2,
        warmup_steps=steps // 10)
    model.compile(optimizer=adamw(model, learning_rate=schedule), jit_compile=False)
    history = model.fit(train.tf_dataset(32), epochs=epochs, shuffle=False, verbose=0)
    echo(f"  {epochs} epochs, loss {history.history['loss'][0]:.3f} -> "
         f"{history.history['loss'][-1]:.3f}")
    result["adapter"] = save_lora_weights(model, work / "repeat-adapter.safetensors")
    model.merge_lora()
    # Same batch size as before, so generation is not retraced. The old task is shown too:
    # trained on "repeat" alone, the model forgets how to reverse.
    shown = NEW_TASK_PROMPTS + DEMO_PROMPTS[:1]
    answers, result["after"] = _answer_and_score(model, shown, held_out)
    report.answers(shown, answers)
    echo(f"  exact match on {len(held_out)} held-out {NEW_TASK!r} prompts: "
         f"{result['before']:.0%} before -> {result['after']:.0%} after")
    save_model_dir(model, work / "tiny-repeat", overwrite=True)
    echo(f"  adapter: {result['adapter']}; merged model: {work / 'tiny-repeat'}")

    if exports:
        result["exports"] = _exports(model, work, report)
    report.section(f"done in {time.perf_counter() - report.start:.0f} s")
    result["seconds"] = time.perf_counter() - report.start
    return result


def _answer_and_score(model, shown_prompts, examples):
    """Greedy answers to `shown_prompts` and the exact match on `examples`, in one batch."""
    answers = tiny_task.keras_answers(model, shown_prompts + [e["prompt"] for e in examples])
    shown = answers[:len(shown_prompts)]
    accuracy = tiny_task.exact_match_accuracy(
        lambda prompts: answers[len(shown_prompts):], examples, batch_size=len(examples))
    return shown, accuracy


def _exports(model, work, report) -> dict:
    """Export to TFLite and to a SavedModel (Keras on TensorFlow only) and answer with each."""
    out = {}
    if keras.backend.backend() != "tensorflow":
        report.echo("  (exports need the TensorFlow backend; skipped)")
        return out
    prompts = tiny_task.chat_prompts(model.tokenizer, NEW_TASK_PROMPTS)
    tokenizer_path = model.tokenizer.save_proto(work / "tokenizer.model")

    report.section("4a. Export to TFLite (dynamic int8) and answer with the LiteRT runtime")
    path = export_tflite(model, work / "tiny-repeat.tflite", quantize="dynamic_int8",
                         kv_cache_max_len=64, prefill_lens=(32,), progress=False)
    runtime = GemmaTFLite(path, tokenizer_path=tokenizer_path)
    answers = [runtime.generate(p, max_new_tokens=tiny_task.MAX_NEW_TOKENS) for p in prompts]
    report.answers(NEW_TASK_PROMPTS, answers)
    out["tflite"] = {"path": str(path), "answers": answers}

    import tensorflow as tf  # the TensorFlow backend runs here already

    report.section("4b. Export a SavedModel for TF Serving and answer with it")
    # (tf-text's SentencePiece op logs "precompiled_charsmap is empty" as it loads)
    with stderr_captured():
        path = export_saved_model(model, work / "serving", max_length=64,
                                  max_new_tokens=tiny_task.MAX_NEW_TOKENS)
        served = tf.saved_model.load(str(path))
        completions = served.generate(tf.constant(prompts))["completions"].numpy()
    answers = [c.decode("utf-8") for c in completions]
    report.answers(NEW_TASK_PROMPTS, answers)
    out["saved_model"] = {"path": str(path), "answers": answers}
    return out
