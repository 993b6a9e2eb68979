"""The parser machinery (:mod:`torchglow.cli.options`): help from a dataclass's docstring and the
``--threads`` option."""

import argparse
import dataclasses

import pytest
import torch

from torchglow import GlowConfig, TrainConfig
from torchglow.cli.options import field_help, parse_threads

from conftest import cli as call

pytestmark = pytest.mark.usefixtures("one_thread")


def test_field_help_reads_the_attributes_section_at_any_indentation():
    class Flat:
        """Title.

Attributes:
  a: first,
    continued.
  b: ``second`` with :func:`markup`.
Returns:
  not a field
"""

    def nested():
        class Deep:
            """Title.

            Attributes:
                    a: first.
            """

        return Deep

    assert field_help(Flat) == {"a": "first, continued.", "b": "second with markup."}
    assert field_help(nested()) == {"a": "first."}


def test_every_config_field_has_help():
    for cls in (GlowConfig, TrainConfig):
        helps = field_help(cls)
        assert set(helps) == {f.name for f in dataclasses.fields(cls)}, cls
        assert all(helps.values())


def test_parse_threads():
    assert parse_threads("auto") is None and parse_threads("3") == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_threads(bad)


def test_threads_option(capsys, tmp_path):
    """torch's threads are set before the command runs (here, one that finds no run)."""
    try:
        code, _, _ = call(capsys, "sample", tmp_path / "none", "--threads", 2, "--n", 1)
        assert code == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
