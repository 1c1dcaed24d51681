"""The ``mcvi-ops`` command line: ``mcvi-ops demo``, ``mcvi-ops simulate``, ``mcvi-ops crop``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    from . import _crop, _demo

    parser = argparse.ArgumentParser(
        prog="mcvi-ops",
        description="Multi-Contrastive VAE for optical pooled screens.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo.add_parser(subparsers)
    _demo.add_simulate_parser(subparsers)
    _crop.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
