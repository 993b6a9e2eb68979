"""The ``torchglow`` command: argparse subcommands that parse, then call the Python API."""

from .app import main

__all__ = ["main"]
