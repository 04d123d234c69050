"""Distillation on the bundled task: a half-width student distilled from the bundled tiny
model against the same student trained on the labels alone (same initial weights, steps,
data and optimizer). Prints a Markdown table of held-out accuracies.

  .venv/bin/python benchmarks/distill_tiny.py [--steps 300] [--temperature 1] [--weight 0.5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import machine


def token_accuracy(model, data) -> float:
    logits = np.asarray(model.predict_on_batch({"token_ids": data.token_ids,
                                                "padding_mask": data.padding_mask}))
    hits = (logits.argmax(-1) == data.labels) * data.sample_weight
    return float(hits.sum() / data.sample_weight.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weight", type=float, default=0.5,
                        help="the label loss's weight in the distilled run")
    args = parser.parse_args()

    import keras

    from gemma_keras import tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.data import encode_records
    from gemma_keras.distill import GemmaDistiller
    from gemma_keras.training import adamw

    teacher = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir())
    c = teacher.config
    student_config = Gemma2Config.from_dict({
        **c.to_dict(), "hidden_size": c.hidden_size // 2,
        "intermediate_size": c.intermediate_size // 2,
        "num_attention_heads": c.num_attention_heads // 2,
        "num_key_value_heads": c.num_key_value_heads // 2})
    train = encode_records(tiny_task.training_examples(4096), teacher.tokenizer, 32)
    held = encode_records(tiny_task.held_out_examples(n=200), teacher.tokenizer, 32)
    print(f"# {machine.describe()}; teacher: the bundled tiny model (hidden "
          f"{c.hidden_size}); student: hidden {student_config.hidden_size}, "
          f"{student_config.num_parameters():,} parameters, random init; {args.steps} steps "
          f"of batch {args.batch_size}, AdamW {args.learning_rate}; temperature "
          f"{args.temperature}")
    print("| student trained on | label weight | held-out token accuracy | held-out exact match "
          "| label loss (run mean) | distillation loss (run mean) | s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    print(f"| (teacher) | - | {token_accuracy(teacher, held):.3f} | "
          f"{tiny_task.teacher_forced_exact_match(teacher, held):.3f} | - | - | - |", flush=True)
    for name, weight in (("labels only", 1.0), ("labels + teacher", args.weight),
                         ("teacher only", 0.0)):
        keras.utils.set_random_seed(0)
        student = Gemma2CausalLM(student_config)
        distiller = GemmaDistiller(teacher, student, temperature=args.temperature,
                                   student_loss_weight=weight)
        distiller.compile(optimizer=adamw(student, learning_rate=args.learning_rate),
                          jit_compile=False)
        t = time.perf_counter()
        history = distiller.fit(train.tf_dataset(args.batch_size, seed=0).repeat(),
                                steps_per_epoch=args.steps, epochs=1, verbose=0).history
        seconds = time.perf_counter() - t
        label = f"{history['student_loss'][-1]:.3f}" if weight > 0 else "-"
        distilled = f"{history['distillation_loss'][-1]:.3f}" if weight < 1 else "-"
        print(f"| {name} | {weight} | {token_accuracy(student, held):.3f} | "
              f"{tiny_task.teacher_forced_exact_match(student, held):.3f} | {label} | "
              f"{distilled} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
