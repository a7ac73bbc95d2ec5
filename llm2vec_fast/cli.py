"""The ``llm2vec-fast`` command.

Each subcommand lives in its own module, listed in ``SUBCOMMAND_MODULES``. A module provides
``add_parser(subparsers)``, which adds its parser and sets ``run`` with
``parser.set_defaults(run=run)``, where ``run(args) -> int | None`` does the work. Keep heavy
imports inside ``run`` so that ``llm2vec-fast --help`` stays fast. Adding a subcommand is one
line here. Imports run one way: this module imports the subcommand modules, never the reverse
(each is run through ``main`` here, ``python -m llm2vec_fast.cli COMMAND ...``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from llm2vec_fast import __version__

SUBCOMMAND_MODULES = [
    "llm2vec_fast.info",
    "llm2vec_fast.corpus.cli",
    "llm2vec_fast.corpus.index_cli",
    "llm2vec_fast.train.cli",
    "llm2vec_fast.evaluation",
    "llm2vec_fast.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2vec-fast",
        description="Decoder LLMs as fast text encoders, the LLM2Vec way.",
    )
    parser.add_argument("--version", action="version", version=f"llm2vec-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand. A problem with the input (a missing or damaged file, a bad value)
    prints one line naming it and exits 2; ``LLM2VEC_FAST_TRACEBACK=1`` shows the traceback."""
    try:
        return int(args.run(args) or 0)
    except (OSError, ValueError) as exc:
        if os.environ.get("LLM2VEC_FAST_TRACEBACK"):
            raise
        print(f"llm2vec-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
