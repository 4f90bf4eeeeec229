"""The ``neural-mechanics`` command (also ``python -m neural_mechanics_ext``).

Each subcommand ``NAME`` lives in a module of the package that provides ``add_NAME_arguments(parser)``
and ``NAME_main(args)`` (the table ``COMMANDS``); a command whose module is not installed is reported
as unavailable instead of breaking the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "demo": ("neural_mechanics_ext.app.commands", "demo", "train the built-in demo (no download) and write a report"),
    "train": ("neural_mechanics_ext.app.commands", "train", "train a model (paper presets or your own data) with tracking"),
    "report": ("neural_mechanics_ext.app.report", "report", "redraw the figures and report.html of a run folder"),
    "check": ("neural_mechanics_ext.app.check", "check", "check the Hessian constraints of a model's symmetries"),
    "bench": ("neural_mechanics_ext.bench", "bench", "run the benchmark suite and print the ratio table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neural-mechanics", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, prefix, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _prefix=prefix)
        try:
            getattr(importlib.import_module(module), f"add_{prefix}_arguments")(p)
        except (ImportError, AttributeError):
            p.set_defaults(_missing=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        parser.error(f"the {args.command!r} command is not available in this installation")
    run = getattr(importlib.import_module(args._module), f"{args._prefix}_main")
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
