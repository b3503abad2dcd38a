"""The ``batchnorm`` command: one subcommand per module, each with ``add_parser`` and ``run``.

Errors a user can fix (bad options, unreadable files) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> module defining add_parser(subparsers) and run(args) -> int
SUBCOMMANDS = {
    "explain": "batchnorm.explain",
    "demo": "batchnorm.demo",
    "bench": "batchnorm.bench",
}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


def check_png(name: str, option: str = "--plot") -> Path:
    """The ``--plot`` argument as a Path: a ``.png`` name in an existing folder."""
    path = Path(name)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{option} {name}: expected a .png file name")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {name}: no such directory {path.parent}")
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchnorm", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UsageError as e:
        print(f"batchnorm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
