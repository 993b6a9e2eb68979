"""What the commands over a trained model share: their common options, opening the run folder or
checkpoint, where the outputs go, and the user's errors and summaries in one form."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from .errors import CLIError
from .options import count, dataset_help, dataset_name

RUN_HELP = "run folder, .pt checkpoint or pretrained folder"
TOOL_SPLITS = ("train", "test", "val", "all")
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
SEED_HELP = {"evaluate": "seeds the dequantisation noise", "samples": "seeds the draws of the latents"}


def common_options(p: argparse.ArgumentParser, tool: str, split: str | None, split_help: str = "") -> None:
    """The options evaluate, sample and every latent/OOD tool share; ``tool`` names the output folder
    (``samples`` for sample)."""
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    if tool != "samples":
        p.add_argument("--dataset", type=dataset_name,
                       help=f"{dataset_help()} (default: the one the run was trained on)")
        p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    if split:
        p.add_argument("--split", choices=TOOL_SPLITS, default=split,
                       help=split_help or "split the images come from (all: every image; val: a folder's val/)")
    p.add_argument("--seed", type=int, default=0,
                   help=SEED_HELP.get(tool, "seeds the choice of images and any random draw"))
    if tool != "samples":
        p.add_argument("--batch-size", type=count(1), default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if tool == "samples":
        p.add_argument("--max-level", type=count(0), default=None,
                       help="bin shown as white (default: the top bin of the run's training images when they are "
                            "held in memory, as in the trainer's grids, e.g. 16 for the digits; else 2**n_bits-1)")
    elif tool not in ("evaluate", "ood"):
        p.add_argument("--max-level", type=count(0), default=None,
                       help="bin shown as white (default: the top bin the images use)")
    if tool != "evaluate":
        p.add_argument("--out", help=f"output folder (default: RUN/{tool})")


def fast_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--fast``: ``what`` replayed as a CUDA graph on a GPU (:func:`fast_note` says so on a CPU)."""
    p.add_argument("--fast", action="store_true", help=what)


def user_errors(cmd):
    """The library's ValueErrors are the user's (option values that do not fit): one line, exit 2,
    in the command line's words (:func:`~torchglow.cli.app.main` prints it through ``in_flags``)."""

    @functools.wraps(cmd)
    def call(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except ValueError as e:
            raise CLIError(str(e)) from None

    return call


def open_model(args: argparse.Namespace):
    """The run, checkpoint or pretrained folder ``args.run`` on ``args.device``."""
    from ..devices import resolve_device
    from ..train.runs import open_run

    return open_run(args.run, resolve_device(args.device))


def out_dir(args: argparse.Namespace, run, tool: str) -> Path:
    return Path(args.out) if args.out else run.tool_dir(tool)


def image_source(args: argparse.Namespace, picked) -> dict[str, Any]:
    """Where a tool's images came from, for its summary."""
    return {"checkpoint": args.run, "dataset": picked.data.name, "seed": args.seed}


def fast_note(args: argparse.Namespace, run) -> None:
    """One line on stderr when ``--fast`` runs on the CPU, where there is no CUDA graph to replay."""
    if args.fast and run.model.device.type == "cpu":
        print(f"torchglow {args.command}: note: --fast replays CUDA graphs on a GPU; on a CPU it runs the eager "
              f"kernels, so it pays off only on a GPU", file=sys.stderr)


def print_summary(summary: dict[str, Any]) -> int:
    print(json.dumps(summary, indent=2))
    return 0
