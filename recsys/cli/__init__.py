"""`recsys`: one entry point, subcommands per stage.

Handlers are short: resolve config, call one library function, print where the
output went. Library code raises typed errors; this module maps them to exit
statuses: 0 ok, 1 runtime/data failure, 2 usage/config error.
Heavy libraries (torch, mlflow) are imported inside handlers so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from features.errors import RecsysError

# Each module exposes `register(subparsers)`; order = order in `recsys --help`.
COMMAND_MODULES = (
    "recsys.cli.features",
    "recsys.cli.distill",
    "recsys.cli.rank",
    "recsys.cli.baseline",
    "recsys.cli.experiment",
    "recsys.cli.ui",
)

DESCRIPTION = """\
recsys-plugin: multimodal item embeddings -> signals a production ranker can use.

Data flow:  features build -> teachers fit -> distill train/eval ->
            features match -> rank train -> experiment run/compare

Run `recsys COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def seed_everything(seed: int) -> None:
    """The one place that seeds global RNGs (library code takes generators)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    print(f"seed: {seed}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    return dispatch(parser, parser.parse_args(argv))


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command's handler; typed errors become exit statuses."""
    # torchrec 1.8 calls a torch 2.13 helper that warns once about its own
    # deprecation: nothing a user can act on.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    handler = getattr(args, "handler", None)
    if handler is None:
        (getattr(args, "parser", None) or parser).print_help(sys.stderr)
        return 2
    try:
        return int(handler(args) or 0)
    except RecsysError as e:  # UsageError/ConfigError carry 2, data errors 1
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def group(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None):
    """A command group (`recsys features ...`) whose bare call prints its help."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(parser=p)
    return p, p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")


