"""Train the bundled tiny Gemma 2 model (gemma_keras/assets/tiny) from scratch.

A 4-layer Gemma 2 (hidden 64) with its own SentencePiece tokenizer learns to reverse word
lists in Gemma's chat format (`gemma_keras.tiny_task`), trained with this package's own
`compile`/`fit` and data pipeline. The result is written in Hugging Face layout
(config.json, model.safetensors, tokenizer.model) plus eval.jsonl, the 200 held-out prompts.
It is written only if teacher-forced exact match on those prompts reaches --target (for greedy
decoding that equals exact-match accuracy).

    .venv/bin/python scripts/train_tiny_model.py --out gemma_keras/assets/tiny

About 8 minutes on 2 CPU cores (the task is learned after ~300 steps; the rest
widens the margins so that quantized exports keep the answers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=16,  # shorter than a full exchange, so sliding layers really slide
    max_position_embeddings=512,
)
REQUESTED_VOCAB = 320  # SentencePiece stops at the pieces the corpus supports (286)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gemma_keras/assets/tiny")
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--eval-every", type=int, default=150, help="steps between checks")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_hf_dir(model, tokenizer_path, out):
    """The converters' HF export (atomic), then the held-out prompts beside it."""
    from gemma_keras import tiny_task
    from gemma_keras.converters import save_hf_checkpoint

    save_hf_checkpoint(model, out, tokenizer_path=tokenizer_path, overwrite=True)
    tiny_task.write_eval_file(out)


def main(argv=None):
    args = parse_args(argv)
    import keras

    from gemma_keras import tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.data import encode_records
    from gemma_keras.tokenizer import GemmaTokenizer, train_sentencepiece
    from gemma_keras.training import adamw

    keras.utils.set_random_seed(args.seed)
    work = tempfile.mkdtemp(prefix="tiny-tokenizer-")
    tokenizer_path = train_sentencepiece(tiny_task.tokenizer_corpus(),
                                         os.path.join(work, "tokenizer"),
                                         vocab_size=REQUESTED_VOCAB, hard_vocab_limit=False)
    tokenizer = GemmaTokenizer(tokenizer_path)
    config = Gemma2Config(vocab_size=tokenizer.vocab_size, **TINY_CONFIG)
    print(f"tokenizer: {tokenizer.vocab_size} pieces; model: {config.num_parameters():,} "
          "parameters")

    train = encode_records(tiny_task.training_examples(args.examples, seed=args.seed),
                           tokenizer, sequence_length=32)
    held_out = encode_records(tiny_task.held_out_examples(), tokenizer, sequence_length=32)
    # Progress is reported on a validation set of its own, not on the held-out prompts.
    validation = encode_records(
        tiny_task.random_examples(500, seed=20_000, exclude={
            e["prompt"] for e in tiny_task.held_out_examples()}),
        tokenizer, sequence_length=32)

    model = Gemma2CausalLM(config, dtype="float32")
    steps = args.steps
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - steps // 20, warmup_target=args.learning_rate,
        warmup_steps=steps // 20, alpha=0.02)
    model.compile(optimizer=adamw(model, learning_rate=schedule, weight_decay=0.01))

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            acc = tiny_task.teacher_forced_exact_match(self.model, validation)
            print(f"step {(epoch + 1) * args.eval_every}: loss {logs['loss']:.4f}, "
                  f"validation exact match {acc:.3f} ({time.time() - start:.0f} s)", flush=True)

    start = time.time()
    model.fit(train.tf_dataset(args.batch_size, seed=args.seed).repeat(),
              steps_per_epoch=args.eval_every, epochs=args.steps // args.eval_every,
              callbacks=[Report()], verbose=0)
    accuracy = tiny_task.teacher_forced_exact_match(model, held_out)
    print(f"trained in {time.time() - start:.0f} s; held-out exact match {accuracy:.3f}")
    if accuracy < args.target:
        raise SystemExit(f"exact match {accuracy:.3f} is below --target {args.target}; "
                         "nothing written")
    write_hf_dir(model, tokenizer_path, args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
