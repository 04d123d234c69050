"""`gemma-keras demo`: convert, generate, LoRA-fine-tune and export the bundled tiny model."""


def register(subparsers):
    p = subparsers.add_parser(
        "demo", help="the whole path on the bundled tiny model, offline, in a few minutes",
        description="Convert the bundled tiny Gemma 2 to Keras, generate answers, LoRA-fine-tune "
                    "it on a new task (showing held-out accuracy before and after), and export "
                    "it to TFLite and SavedModel, answering the same prompts with each.")
    p.add_argument("--workdir", default=None, help="where outputs go (default: a temp dir)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-steps", type=int, default=160)
    p.add_argument("--no-export", action="store_true", help="skip the TFLite/SavedModel part")
    p.set_defaults(func=run)


def run(args):
    from gemma_keras.demo import run_demo

    run_demo(args.workdir, lora_rank=args.lora_rank, lora_steps=args.lora_steps,
             exports=not args.no_export)
    return 0
