"""``llm2vec-fast train mntp|simcse|supervised CONFIG.json [--resume]``."""

from __future__ import annotations

import argparse

from .config import OBJECTIVES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an LLM2Vec stage (MNTP, SimCSE, supervised) with LoRA",
        description="Train one LLM2Vec stage from a config in the llm2vec repository's"
        " train_configs format. Several processes: torchrun --nproc-per-node N -m"
        " llm2vec_fast.cli train ...",
    )
    parser.add_argument("objective", choices=OBJECTIVES)
    parser.add_argument("config", help="JSON config (llm2vec train_configs format, local paths)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    from .loop import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args.objective, args.config, resume=args.resume)
    print(f"trained {result.steps} step(s); adapter in {result.output_dir}")
    return 0
