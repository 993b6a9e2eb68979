"""The ``torchglow`` command: the parser of every subcommand (each in its own module) and
:func:`main`, which runs one and prints the library's errors in the command line's words."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

from ..config import ConfigError
from ..threads import set_threads
from . import bench, convert, evaluate, latent, ood, sample, train
from .demo import command as demo
from .errors import EXIT_USAGE, CLIError, in_flags
from .options import HelpFormatter, Parser, add_threads_option


def _add_command(sub, name: str, func, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
    """The subcommand ``name`` of ``sub``, which calls ``func(args)``. Its description: ``description``,
    else the first paragraph of ``func``'s docstring (plain text: argparse shows it as it is), else
    ``help_text`` as a sentence."""
    description = description or (func.__doc__ or "").split("\n\n")[0] or help_text[0].upper() + help_text[1:] + "."
    p = sub.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="torchglow", formatter_class=HelpFormatter,
                    description="Glow normalizing flows: train, evaluate, sample, and the latent-space and OOD tools.")
    parser.add_argument("--version", action="version", version=f"torchglow {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = functools.partial(_add_command, sub)
    for module in (train, evaluate, sample, latent, ood, convert, demo):
        module.add_commands(command)

    for p in sub.choices.values():
        add_threads_option(p)

    # after the loop: bench has its own --threads
    p = command("bench", bench.cmd_bench, "training, sampling and evaluation images/s and peak memory",
                bench.__doc__.split("\n\n")[0] + " Prints a summary; --out DIR also writes the full JSON.")
    bench.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..train.checkpoint import CheckpointError
    from ..data import DatasetError
    from ..train import TrainingError
    from ..tools.convert import ConversionError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for the run's config.json and model card
    if args.command != "bench":  # bench sets its own threads (and records them)
        set_threads(args.threads)
    prefix = f"torchglow {args.command}"
    formatwarning = warnings.formatwarning
    # one line, no source line; the library's field names as the options that set them
    warnings.formatwarning = lambda message, *_, **__: f"{prefix}: warning: {in_flags(str(message))}\n"
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, ConversionError, DatasetError, TrainingError) as e:
        print(f"{prefix}: error: {in_flags(str(e))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CLIError, ConfigError)) else 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
