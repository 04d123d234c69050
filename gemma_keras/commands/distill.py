"""`gemma-keras distill`: train a student model on a teacher's next-token distributions."""

from gemma_keras.commands.finetune import add_training_arguments, training_kwargs


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
    add_training_arguments(p)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of both distributions (default 1; 2 trained worse "
                        "on the bundled task)")
    p.add_argument("--student-loss-weight", type=float, default=0.5,
                   help="weight of the label loss; the distillation loss gets 1 minus it")
    p.set_defaults(func=run)


def run(args):
    from gemma_keras.distill import distill

    result = distill(
        args.teacher, args.student, args.data, args.out, temperature=args.temperature,
        student_loss_weight=args.student_loss_weight, **training_kwargs(args))
    history = result["history"]
    for epoch, (student, distilled) in enumerate(zip(history["student_loss"],
                                                     history["distillation_loss"]), start=1):
        print(f"epoch {epoch}: label loss {student:.4f}, distillation loss {distilled:.4f}")
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0
