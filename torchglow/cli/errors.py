"""The CLI's own user error, its exit status, and the one place where library words become flags.

The library names what a user got wrong by its Python name in backticks: a config field
(`` `batch_size` ``, a field of :class:`GlowConfig` or :class:`TrainConfig`) or a function's
parameter (`` `csv_path` ``). Only the CLI knows its flags: :func:`in_flags` rewrites each such name
into the option that sets it (``--batch-size``, ``--labels-csv``) before the error is printed."""

from __future__ import annotations

import re

EXIT_USAGE = 2

# parameters of library functions whose option is not their name with hyphens
PARAMETER_FLAGS: dict[str, str] = {
    "classes": "--class-attribute",  # data.labels.labels_for, by manipulate
    "csv_path": "--labels-csv",
    "attributes": "--attribute",
    "hparams_path": "--hparams",  # tools.convert.convert_y0ast
}


class CLIError(Exception):
    """A user error found by the CLI itself."""


def flag_of(name: str) -> str:
    """The option that sets the config field or parameter ``name``: ``batch_size`` -> ``--batch-size``."""
    return PARAMETER_FLAGS.get(name, "--" + name.replace("_", "-"))


def in_flags(message: str) -> str:
    """``message`` with every backticked Python name (`` `name` ``) replaced by its option."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: flag_of(m.group(1)), message)
