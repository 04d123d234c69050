"""`gemma-keras finetune`: fine-tune a model on a JSONL file, fully or with LoRA."""

from gemma_keras.tiny_task import model_dir_or_tiny


def add_training_arguments(p):
    """The options `finetune` and `distill` share: epochs, batches, LoRA, optimizer,
    validation, dtype, compilation, seed and output."""
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sequence-length", type=int, default=None,
                   help="tokens per example (default: the longest record); longer records "
                        "are an error naming their line")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this "
                                                               "rank instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator "
                                                                  "(default: the rank)")
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated: attention, mlp, all, or projection names "
                        "(q_proj,...,down_proj); default attention")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (default 2e-4 with LoRA, 5e-5 without)")
    p.add_argument("--validation-data", default=None, metavar="FILE.jsonl",
                   help="validation file (default: hold out --validation-split of --data)")
    p.add_argument("--validation-split", type=float, default=0.1)
    p.add_argument("--dtype", default=None,
                   help="Keras dtype policy, e.g. mixed_bfloat16 (default: float32)")
    p.add_argument("--no-jit", action="store_true",
                   help="do not XLA-compile the train step (on CPU with TensorFlow, small "
                        "models train faster without it)")
    p.add_argument("--eager", action="store_true",
                   help="run eagerly, without tracing the step (debugging; very short runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def training_kwargs(args) -> dict:
    """The keyword arguments of `finetune.finetune` and `distill.distill` that
    `add_training_arguments` parsed."""
    return dict(
        epochs=args.epochs, batch_size=args.batch_size, sequence_length=args.sequence_length,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets.split(",") if args.lora_rank else None,
        learning_rate=args.learning_rate, validation_split=args.validation_split,
        validation_path=args.validation_data, dtype=args.dtype, seed=args.seed,
        overwrite=args.overwrite, jit_compile=False if args.no_jit else "auto",
        run_eagerly=args.eager, verbose=2 if args.quiet else 1)


def register(subparsers):
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model on a JSONL file (full or LoRA)",
        description="Train --model on --data with model.fit and write the result to --out as a "
                    "gemma-keras model directory (LoRA adapters merged; the adapters alone go "
                    "to OUT.checkpoints/adapter.safetensors). Each JSONL line is "
                    '{"text": ...}, {"prompt": ..., "response": ...} or {"messages": [...]}; '
                    "the loss covers the responses only. A checkpoint is written after every "
                    "epoch, and running the same command again resumes from the latest one.")
    p.add_argument("--model", default=None,
                   help="model directory (gemma-keras or Hugging Face; default: the bundled "
                        "tiny model)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, metavar="DIR")
    add_training_arguments(p)
    p.add_argument("--checkpoint-dir", default=None, help="default: OUT.checkpoints")
    p.add_argument("--restart", action="store_true",
                   help="ignore existing checkpoints instead of resuming")
    p.add_argument("--accumulate", type=int, default=None, metavar="N",
                   help="gradient accumulation: one update every N batches")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="train the LoRA adapters on int8 base weights (less memory; needs "
                        "--lora-rank; a Hugging Face --model is quantized as it loads); the "
                        "merged result is a float model")
    p.add_argument("--remat", action="store_true",
                   help="recompute block activations in the backward pass (less memory)")
    p.set_defaults(func=run)


def run(args):
    from gemma_keras.finetune import finetune  # Keras and TensorFlow

    result = finetune(
        model_dir_or_tiny(args.model), args.data, args.out, checkpoint_dir=args.checkpoint_dir,
        resume=not args.restart, gradient_accumulation_steps=args.accumulate,
        remat=args.remat, quantize=args.quantize, **training_kwargs(args))
    for epoch, loss in enumerate(result["history"].get("val_loss", []),
                                 start=result["initial_epoch"] + 1):
        print(f"epoch {epoch}: validation loss {loss:.4f}")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0
