"""`gemma-keras distill`: train a student model on a teacher's next-token distributions."""


def register(subparsers):
    p = subparsers.add_parser(
        "distill", help="distil a teacher model into a (smaller) student on a JSONL file",
        description="Train --student on --data to match --teacher's next-token distributions "
                    "(KL divergence at --temperature) mixed with the label loss "
                    "(--student-loss-weight), both over the response tokens only, and write "
                    "the student to --out as a gemma-keras model directory. The data format is "
                    "`gemma-keras finetune`'s. Teacher and student share the tokenizer.")
    p.add_argument("--teacher", required=True, metavar="DIR",
                   help="teacher model directory (gemma-keras or Hugging Face)")
    p.add_argument("--student", required=True, metavar="DIR|CONFIG",
                   help="student model directory, or a config.json for a new randomly "
                        "initialised student (same vocabulary as the teacher)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sequence-length", type=int, default=None,
                   help="tokens per example (default: the longest record)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of both distributions (default 1; 2 trained worse "
                        "on the bundled task)")
    p.add_argument("--student-loss-weight", type=float, default=0.5,
                   help="weight of the label loss; the distillation loss gets 1 minus it")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the student instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default="attention",
                   help="comma-separated: attention, mlp, all, or projection names")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (default 2e-4 with LoRA, 5e-5 without)")
    p.add_argument("--validation-data", default=None, metavar="FILE.jsonl")
    p.add_argument("--validation-split", type=float, default=0.1)
    p.add_argument("--dtype", default=None, help="Keras dtype policy (default: float32)")
    p.add_argument("--no-jit", action="store_true", help="do not XLA-compile the train step")
    p.add_argument("--eager", action="store_true",
                   help="run eagerly, without tracing the step (debugging; very short runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    from gemma_keras.distill import distill

    result = distill(
        args.teacher, args.student, args.data, args.out, epochs=args.epochs,
        batch_size=args.batch_size, sequence_length=args.sequence_length,
        temperature=args.temperature, student_loss_weight=args.student_loss_weight,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets.split(",") if args.lora_rank else None,
        learning_rate=args.learning_rate, validation_split=args.validation_split,
        validation_path=args.validation_data, dtype=args.dtype, seed=args.seed,
        overwrite=args.overwrite, jit_compile=False if args.no_jit else "auto",
        run_eagerly=args.eager,
        verbose=2 if args.quiet else 1)
    history = result["history"]
    for epoch, (student, distilled) in enumerate(zip(history["student_loss"],
                                                     history["distillation_loss"]), start=1):
        print(f"epoch {epoch}: label loss {student:.4f}, distillation loss {distilled:.4f}")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0
