"""`qlora-kit` command line. User mistakes exit 2 with one line; `--debug` shows their traceback."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from qlora_kit.errors import Failed, UserError


def _train(args: argparse.Namespace) -> None:
    from qlora_kit.config import load_recipe
    from qlora_kit.preemption import watch_early_interrupts

    watch_early_interrupts()

    resume = args.resume
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():  # `--resume key=value`
        args.overrides.append(resume)
        resume = True
    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: recipe typos fail in 0.1 s
    if args.dry_run:
        from qlora_kit.dry_run import dry_run

        print(dry_run(recipe, args.recipe, args.fsdp, args.fsdp_offload, args.device))
        return
    import torch

    from qlora_kit.train import train

    try:
        train(recipe, overwrite=args.overwrite, resume=resume)
    except torch.cuda.OutOfMemoryError:
        raise UserError(out_of_memory_message(recipe)) from None


def out_of_memory_message(recipe) -> str:
    """What to lower when the GPU runs out of memory, with the run's current values."""
    t = recipe.train
    checkpointing = "" if t.gradient_checkpointing else ", set train.gradient_checkpointing=true"
    return (f"out of GPU memory: lower train.micro_batch_size (now {t.micro_batch_size}; raise train.grad_accum "
            f"to keep the step size) or train.seq_len (now {t.seq_len}){checkpointing}; continue from the last "
            "checkpoint with --resume")


def _estimate(args: argparse.Namespace) -> None:
    from qlora_kit.config import load_recipe
    from qlora_kit.estimate import estimate, find_shape, format_estimate, local_gpu_memory, parse_bytes

    recipe = load_recipe(args.recipe, args.overrides)
    shape = find_shape(recipe, Path(args.model_config) if args.model_config else None)
    budget = parse_bytes(args.gpu_memory) if args.gpu_memory else local_gpu_memory()
    est = estimate(recipe, shape, args.device, args.fsdp, args.fsdp_offload)
    print(format_estimate(recipe, shape, est, budget))
    if args.trace:
        from qlora_kit.trace import format_trace, trace_step

        print(format_trace(trace_step(recipe, shape.config), est, args.fsdp))


def _merge(args: argparse.Namespace) -> None:
    from qlora_kit.merge import merge

    report = merge(args.adapter, args.out, dtype=args.dtype, base=args.base, model_path=args.model,
                   overwrite=args.overwrite, check=not args.no_check)
    worst = max(report.layers.values(), default=0.0)
    logits = f", logits max |diff| {report.logits_max_abs_diff:.2e}" if report.logits_max_abs_diff is not None else ""
    print(f"merged {len(report.layers)} layers into {args.out} ({report.dtype}, base {report.base}) in "
          f"{report.seconds:.1f} s; worst layer relative error {worst:.2e}{logits}; report: "
          f"{args.out}/merge_report.json", file=sys.stderr)


def _export(args: argparse.Namespace) -> None:
    from qlora_kit.gguf_export import export_gguf

    report = export_gguf(Path(args.source), Path(args.gguf), args.type, model_path=args.model, base=args.base,
                         overwrite=args.overwrite, check=not args.no_check)
    logits = report.checks.get("logits_transformers")
    ppl = (f"; perplexity {logits['perplexity_reference']:.3f} -> {logits['perplexity_gguf']:.3f} on "
           f"{logits['tokens']} sample tokens" if logits else "")
    print(f"wrote {args.gguf} ({report.type}, {report.bytes / 2**20:.1f} MiB) in {report.seconds:.1f} s{ppl}; "
          f"report: {args.gguf}.report.json", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:

    from qlora_kit.inference import generate, load_for_inference
    from qlora_kit.model import default_device

    device = default_device()
    model, tokenizer = load_for_inference(args.model, device)
    if args.cpu_bf16_kernel and device.type == "cpu":
        from qlora_kit.nf4 import use_cpu_bf16_kernel

        use_cpu_bf16_kernel(model)
    generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, stream=True)
    print()


def _eval(args: argparse.Namespace) -> None:
    import json

    from qlora_kit.evaluate import evaluate
    from qlora_kit.inference import load_for_inference
    from qlora_kit.model import default_device

    device = default_device()
    model, tokenizer = load_for_inference(args.model, device)
    result = evaluate(model, tokenizer, args.data, seq_len=args.seq_len, generate=not args.no_generate)
    if not math.isfinite(result.loss):
        raise Failed(f"eval: the loss is {result.loss} on {args.data}: {args.model} computes non-finite values "
                     "(a damaged adapter or export?)")
    if args.json:
        print(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "exact_match": result.exact_match,
                          "examples": result.examples}))
        return
    match = (f"{result.exact_match:.1%}" if result.exact_match is not None else "skipped (--no-generate)"
             if args.no_generate else "n/a (text data has no answers to match)")
    print(f"{'examples':<12}{result.examples}\n{'loss':<12}{result.loss:.4f}\n{'perplexity':<12}"
          f"{result.perplexity:.3f}\n{'exact match':<12}{match}")


def _report(args: argparse.Namespace) -> None:
    from qlora_kit.report import INSTALL_HINT, draw_report, headline, read_metrics

    path = draw_report(Path(args.output_dir))
    if path is None:
        raise UserError(f"drawing the report needs matplotlib: {INSTALL_HINT}")
    print(f"{headline(read_metrics(Path(args.output_dir)))}; report: {path}", file=sys.stderr)


def _demo(args: argparse.Namespace) -> None:
    from qlora_kit.demo import run_demo

    run_demo(Path(args.out), args.overrides)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, exit 2 (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"qlora-kit: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora-kit", description="QLoRA finetuning on a frozen 4-bit base.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)
    # Shared arguments: `--debug` is accepted after the command too; `model` names what generate/eval load.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    model = _Parser(add_help=False, parents=[debug])
    model.add_argument("model", help="adapter directory, model directory, .gguf file or built-in model name")
    train = commands.add_parser("train", parents=[debug],
                                help="train LoRA adapters from a recipe")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=1e-4")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                       help="continue from the latest checkpoint in output_dir, or from PATH (a checkpoint or run)")
    train.add_argument("--dry-run", action="store_true",
                       help="check the recipe, data and model config and print the plan; load no weights")
    train.add_argument("--fsdp", type=_positive_int, default=1, metavar="N", help=argparse.SUPPRESS)
    train.add_argument("--fsdp-offload", action="store_true", help=argparse.SUPPRESS)
    train.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    train.set_defaults(func=_train)

    est = commands.add_parser("estimate", parents=[debug],
                              help="predict a recipe's peak memory and the largest batch that fits")
    est.add_argument("recipe", help="recipe YAML file")
    est.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    est.add_argument("--gpu-memory", metavar="SIZE", help="memory to fit in, e.g. 24GiB (default: this GPU's)")
    est.add_argument("--model-config", metavar="PATH", help="the model's config.json (or its directory)")
    est.add_argument("--fsdp", type=_positive_int, default=1, metavar="N", help="FSDP processes sharding the model")
    est.add_argument("--fsdp-offload", action="store_true", help="FSDP keeps the shards in CPU memory")
    est.add_argument("--trace", action="store_true",
                     help="also run one real training step at this shape on the meta device and count its bytes")
    est.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                     help="cuda: bf16 compute, CUDA context; cpu: fp32 compute, process memory")
    est.set_defaults(func=_estimate)

    merge = commands.add_parser("merge", parents=[debug],
                                help="merge an adapter into its base and export a full-precision model")
    merge.add_argument("adapter", help="adapter directory (PEFT format)")
    merge.add_argument("--out", required=True, help="output model directory")
    merge.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    merge.add_argument("--base", default="dequantized", choices=["dequantized", "original"],
                       help="merge into the 4-bit round-tripped weights the adapter trained on (default) or "
                            "into the original 16-bit weights")
    merge.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    merge.add_argument("--no-check", action="store_true", help="skip the parity check")
    merge.set_defaults(func=_merge)

    export = commands.add_parser("export", parents=[debug],
                                 help="write an adapter (merged on the way) or a model as one GGUF file for llama.cpp")
    export.add_argument("source", help="adapter directory (merged into its base first) or model directory")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    export.add_argument("--type", default="q8_0", choices=["f16", "bf16", "q8_0", "q4_0"],
                        help="tensor type of the matrices (norms stay float32)")
    export.add_argument("--base", default="dequantized", choices=["dequantized", "original"],
                        help="as for merge: what an adapter is merged into")
    export.add_argument("--model", help="an adapter's base model (default: the one it was trained on)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.add_argument("--no-check", action="store_true", help="skip the read-back, tokenizer and logit checks")
    export.set_defaults(func=_export)

    gen = commands.add_parser("generate", parents=[model],
                              help="generate text with a model or adapter (chat template applied)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--cpu-bf16-kernel", action="store_true",
                     help="on a CPU with AVX512-BF16, compute the 4-bit layers with bitsandbytes' bf16 kernel: "
                          "faster, less precise (eval and merge never do); ignored on GPUs")
    gen.set_defaults(func=_generate)

    ev = commands.add_parser("eval", parents=[model],
                             help="loss, perplexity and exact match of a model or adapter on a dataset")
    ev.add_argument("--data", required=True, help="a data file or folder in any format `train` reads")
    ev.add_argument("--seq-len", type=_positive_int, default=2048)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--no-generate", action="store_true", help="loss only, skip exact match")
    ev.set_defaults(func=_eval)

    report = commands.add_parser("report", parents=[debug],
                                 help="redraw OUTPUT_DIR/report.png from its metrics.jsonl")
    report.add_argument("output_dir", help="a training output_dir")
    report.set_defaults(func=_report)

    demo = commands.add_parser("demo", parents=[debug],
                               help="finetune SmolLM2-135M-Instruct on a small task, offline, end to end")
    demo.add_argument("--out", default="runs/demo", help="where the run, the export and demo_report.json go")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="demo recipe overrides")
    demo.set_defaults(func=_demo)
    return parser


def quiet_library_noise() -> None:
    """Drop third-party log lines that every run would print and that say nothing about this run.

    bitsandbytes, imported on a CPU with AVX512-BF16, warns that the optional `kernels` package is missing: it only
    speeds up the bf16 kernel that qlora-kit keeps off (nf4.keep_layout) unless `generate
    --cpu-bf16-kernel` asks for it, and bitsandbytes' own build of that kernel serves then. The filter sits on the
    logger object, so it holds however late bitsandbytes is imported."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_about_kernels_community)  # idempotent


def _not_about_kernels_community(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Options may sit between overrides (`train r.yaml a=1 --overwrite b=2`): argparse leaves the tail here.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"qlora-kit: error: {e}", file=sys.stderr)
        return 2
    except Failed as e:  # not a user mistake and not a crash: one line, exit 1
        if args.debug:
            raise
        print(f"qlora-kit: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and exits 0 itself): nothing to clean up
        if args.debug:
            raise
        print("qlora-kit: interrupted", file=sys.stderr)
        return 130
    return 0
