"""`recsys`: one entry point, subcommands per stage.

Handlers are short: resolve config, call one library function, print where the
output went. Library code raises typed errors; this module maps them to exit
statuses: 0 ok, 1 runtime/data failure, 2 usage/config error.
Heavy libraries (torch, mlflow) are imported inside handlers so `--help` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

from features.core.errors import RecsysError

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
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for group_parser in sub.choices.values():
        _group_examples(group_parser)
    return parser


def _group_examples(p: argparse.ArgumentParser) -> None:
    """A group's help (`recsys features --help`) ends with the first example of
    each of its subcommands, so every help page shows examples."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs or p.epilog:
        return
    lines = []
    for child in subs[0].choices.values():
        examples = (child.epilog or "").split("examples:", 1)
        body = [ln.rstrip() for ln in examples[1].splitlines() if ln.strip()] if len(examples) > 1 else []
        for ln in body:  # the first example, with its "\" continuation lines
            lines.append(ln if ln.startswith("  ") else f"  {ln}")
            if not ln.endswith("\\"):
                break
    if lines:
        p.epilog = "examples (each subcommand's --help has more):\n" + "\n".join(lines)
        p.formatter_class = argparse.RawDescriptionHelpFormatter


def seed_everything(seed: int, announce: bool = True) -> None:
    """The one place that seeds global RNGs (library code takes generators);
    `announce`: print "seed: N" (not where each run names its own seed)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if announce:
        print(f"seed: {seed}", file=sys.stderr)


def warnings_only(msg: str) -> None:
    """The log of a --quiet command: its "warning:" lines still reach the user (on stderr), nothing else."""
    if msg.startswith("warning:"):
        print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = args.debug or debug
    expand_quoted_home(args)
    return dispatch(parser, args)


# the flags (and positional) that name files or folders; never a value such as --multi-value-sep "~"
PATH_ARGS = ("out", "config", "features", "interactions", "items", "embeddings", "match_features",
             "artifact_root", "store", "file")


def expand_quoted_home(args: argparse.Namespace) -> None:
    """A quoted `"~/x"` path reaches us unexpanded: expand it as the shell would
    (polars expanded it when writing, our temp folder did not: exit 1)."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            setattr(args, name, os.path.expanduser(value))


def pop_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """`--debug` is accepted anywhere on the line, not only before the command."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="print the full Python traceback of an unexpected error (also RECSYS_DEBUG=1)"
    )


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("RECSYS_DEBUG", "") not in ("", "0")


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command's handler; every error becomes one `error:` line
    and an exit status (2 usage/config, 1 data/runtime, 130 interrupted).
    Only `--debug` shows a traceback."""
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
        if _debug(args):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into an exit status
        if _debug(args):
            traceback.print_exc()
        print(f"error: {describe_exception(e)}", file=sys.stderr)
        if not _debug(args):
            print("rerun with --debug for the traceback", file=sys.stderr)
        return 1


def describe_exception(e: BaseException) -> str:
    """One line for an error nobody raised on purpose: the OS's words for
    I/O failures (they name the file), the type and message otherwise."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on device{where}: free some space or choose another --out"
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    if isinstance(e, MemoryError):
        return "out of memory: try a smaller batch size, history cap or shard"
    if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # torch's CPU allocator
        asked = re.search(r"allocate (\d+) bytes", str(e))
        size = f" (one tensor of {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
        return (f"out of memory{size}: try smaller batches (the ranker's train.batch_size or train.eval_batch_size, "
                "distill.batch_size, the teachers' batch_size), a shorter data.history_cap, or shard")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}" + (f": {msg}" if msg else "")


def command(
    sub: argparse._SubParsersAction,
    name: str,
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
    handler=None,
) -> argparse.ArgumentParser:
    """One (sub)command: help line, description, an examples epilog kept as
    written, and the handler `dispatch` calls."""
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if handler is not None:
        p.set_defaults(handler=handler)
    return p


def group(sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None):
    """A command group (`recsys features ...`) whose bare call prints its help."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(parser=p)
    return p, p.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")


