"""``torchglow sample``: image grids of a trained model at one or more temperatures."""

from __future__ import annotations

import argparse

from .options import count
from .shared import common_options, fast_note, fast_option, open_model, out_dir, print_summary, user_errors


@user_errors
def cmd_sample(args: argparse.Namespace) -> int:
    """Sample image grids, one row per temperature (one grid per temperature for a class-conditional
    model), into RUN/samples/NAME.png and NAME.json; the default NAME says the temperatures, the
    number per row and the seed, so other options never overwrite earlier grids."""

    from ..tools.sampling import sample_grid

    run = open_model(args)
    fast_note(args, run)
    max_level = run.display_max_level() if args.max_level is None else args.max_level
    grid = sample_grid(run.model, out_dir(args, run, "samples"), temperatures=args.temperatures, n_per_row=args.n,
                       seed=args.seed, max_level=max_level, name=args.name, fast=args.fast)
    return print_summary(grid)


def add_commands(command) -> None:
    """Add ``sample`` through ``command(name, func, help, description)``, which returns its parser."""
    from ..tools.sampling import DEFAULT_TEMPERATURES

    p = command("sample", cmd_sample, "image grids at one or more temperatures")
    common_options(p, "samples", None)
    p.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES),
                   help="one row (or grid, class-conditional) per temperature")
    p.add_argument("--n", type=count(1), default=8, help="samples per row")
    p.add_argument("--name", help="file name stem (default: samples_T<temperatures>_n<n>_seed<seed>)")
    fast_option(p, "the decode replayed as a CUDA graph (on a GPU); same images up to float rounding")
