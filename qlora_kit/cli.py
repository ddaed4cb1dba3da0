"""`qlora-kit` command line: `train` for now. User mistakes exit 2 with one line; `--debug` shows tracebacks."""

from __future__ import annotations

import argparse
import sys

from qlora_kit.errors import UserError


def _train(args: argparse.Namespace) -> None:
    from qlora_kit.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: recipe typos fail in 0.1 s
    from qlora_kit.train import train

    train(recipe, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA finetuning on a frozen 4-bit base.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train LoRA adapters from a recipe")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=1e-4")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    return 0
