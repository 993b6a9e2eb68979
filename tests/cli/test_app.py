"""The ``torchglow`` parser and :func:`torchglow.cli.main`: every subcommand's help, one-line parse
and run errors, the library's words as flags, ``--version`` and ``bench``."""

import argparse
import json

import pytest

from torchglow.cli.app import build_parser, main
from torchglow.cli.options import HelpFormatter

from conftest import cli as call

pytestmark = pytest.mark.usefixtures("one_thread")


def test_missing_run_is_one_line_exit_1(capsys, tmp_path):
    missing = tmp_path / "no_such_run"
    for tool in ("reconstruct", "interpolate", "manipulate", "ood", "evaluate", "sample"):
        code, _, err = call(capsys, tool, missing)
        assert code == 1, tool
        assert len(err.strip().splitlines()) == 1 and str(missing) in err, err


def subcommands():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_option_of_every_subcommand_has_help_without_markup():
    """Help for every option, without reStructuredText markup, and every default that means something
    shown as it would be typed (not a Python list)."""
    for name, sub in subcommands().items():
        shown = HelpFormatter(name)
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"
            assert "`" not in action.help, f"{name} {action.option_strings}: {action.help}"
            text = shown._expand_help(action)
            if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                assert "(default: " in text and "[" not in text, f"{name} {action.option_strings}: {text}"


def test_help_shows_defaults_and_data_set_names(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    assert "(default: 12)" in text and "(default: --ema)" in text  # the digits preset's K; a bool
    assert "digits, mnist, fashion-mnist, cifar10" in text
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE images per forward pass (default: 256)" in text


def test_version(capsys):
    from torchglow import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"torchglow {__version__}"


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "digit"], "did you mean 'digits'?"),
    (["train", "--nsteps", "3"], "did you mean --n-steps?"),
    (["sample", "x", "--n", "0"], "must be >= 1"),
    (["train", "--threads", "0"], "--threads"),
    (["reconstruct", "x", "--dataset", "mnst"], "did you mean 'mnist'?"),
])
def test_parse_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "see torchglow" in err, err


def test_bench_subcommand_writes_json(tmp_path, capsys):
    rc = main(["bench", "--preset", "digits", "--batch-size", "4", "--device", "cpu", "--n-steps", "2",
               "--hidden-channels", "8", "--warmup", "0", "--repeats", "1", "--phases", "sample", "--no-isolate",
               "--name", "tiny", "--out-dir", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["sample_images_per_s"] > 0 and r["config"]["n_steps"] == 2 and "train" not in r
    assert str(tmp_path / "tiny.json") in capsys.readouterr().out


def test_library_errors_and_warnings_are_printed_in_flags(capsys, tmp_path, monkeypatch):
    """The library names fields and parameters in backticks; the command line shows their options."""
    import sys
    import warnings

    from torchglow import ConfigError
    from torchglow.cli import sample

    def fails(args):  # pytest records warnings itself: show this one as Python would, through formatwarning
        print(warnings.formatwarning("`max_level` is above the top bin", UserWarning, __file__, 1), end="",
              file=sys.stderr)
        raise ConfigError("`batch_size` must be positive; `csv_path` has no header")

    monkeypatch.setattr(sample, "cmd_sample", fails)  # the real PARAMETER_FLAGS maps csv_path
    code, _, err = call(capsys, "sample", tmp_path)
    assert code == 2 and "`" not in err
    assert err.splitlines() == ["torchglow sample: warning: --max-level is above the top bin",
                                "torchglow sample: error: --batch-size must be positive; --labels-csv has no header"]
