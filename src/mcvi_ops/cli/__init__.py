"""The ``mcvi-ops`` command line: demo, simulate, crop, train, embed and evaluate.

Only :mod:`argparse` and the sub-command modules (which import nothing heavy at module level)
load for ``--help``; torch, scvi-tools and scanpy load inside the command that needs them.
Every error prints one line saying what to fix and exits with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]

#: exit status of every error, as for argparse's usage errors
ERROR_STATUS = 2


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, pointing to ``--help``."""

    def error(self, message: str) -> NoReturn:
        one_line(f"{self.prog}: error: {message} (see '{self.prog} --help')")
        self.exit(ERROR_STATUS)


def one_line(text: str) -> None:
    """Print ``text`` to stderr as a single line."""
    print(" ".join(str(text).split()), file=sys.stderr)


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # on sub-commands the defaults are suppressed, so they do not overwrite the top-level value
    default = False if top else argparse.SUPPRESS
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="Log debug messages."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="Show the full traceback of an error instead of one line.",
    )


def build_parser() -> Parser:
    """The argument parser of every sub-command."""
    from . import _crop, _demo, _evaluate, _train

    parser = Parser(
        prog="mcvi-ops",
        description="Multi-Contrastive VAE for optical pooled screens.",
        epilog=(
            "Your own screen: 'mcvi-ops crop' (tiles + cell table -> crops), 'mcvi-ops train' "
            "(-> model + embeddings), 'mcvi-ops embed' (more cells, same model), 'mcvi-ops "
            "evaluate' (-> tables, figures, report). Run 'mcvi-ops COMMAND --help' for options."
        ),
    )
    _add_common(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo.add_parser(subparsers)
    _demo.add_simulate_parser(subparsers)
    _crop.add_parser(subparsers)
    _train.add_train_parser(subparsers)
    _train.add_embed_parser(subparsers)
    _evaluate.add_parser(subparsers)
    for sub in subparsers.choices.values():
        _add_common(sub, top=False)
    parser.set_defaults(commands=subparsers.choices)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) would add quotes
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror  # without the "[Errno 28]" prefix
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


def cli_wording(text: str, parser: argparse.ArgumentParser) -> str:
    """Name the command's flags where a library message names the Python keyword.

    ``overwrite=True`` (or ``overwrite=True (--overwrite)``) becomes ``--overwrite`` when the
    command has that flag, ``on_error='skip'`` becomes ``--on-error skip`` for an option with
    choices, and `` `max_epochs=` `` becomes ``--max-epochs``.
    """
    for action in parser._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags:
            continue
        flag, dest = flags[0], action.dest
        if isinstance(action, argparse._StoreTrueAction):
            text = re.sub(rf"`?\b{dest}=True`?(?: \({re.escape(flag)}\))?", flag, text)
        elif action.choices is not None:  # on_error='skip' -> --on-error skip
            text = re.sub(rf"`?\b{dest}='([^']*)'`?", rf"{flag} \1", text)
        text = re.sub(rf"`{dest}=`", f"`{flag}`", text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for every error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else ERROR_STATUS
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    command = args.commands[args.command]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        one_line(f"mcvi-ops {args.command}: interrupted.")
        return 130
    except Exception as err:
        if args.debug:
            raise
        text = cli_wording(_message(err), command)
        hint = "" if isinstance(err, _EXPECTED) else " (rerun with --debug for the traceback)"
        one_line(f"mcvi-ops {args.command}: error: {text}{hint}")
        return ERROR_STATUS


# errors that describe a problem with the user's input; others may be bugs worth a traceback
_EXPECTED = (ValueError, KeyError, TypeError, LookupError, OSError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
