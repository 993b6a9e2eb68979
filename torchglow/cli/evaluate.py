"""``torchglow evaluate``: the test-set bits/dim of a trained model."""

from __future__ import annotations

import argparse
import warnings

from .errors import in_flags
from .options import count
from .shared import common_options, fast_note, fast_option, open_model, print_summary, user_errors


@user_errors
def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..tools.evaluate import evaluate_bpd, few_images_caveat
    from ..files import write_json_atomic

    run = open_model(args)
    fast_note(args, run)
    picked = run.pick(args.split, 0, args.seed, args.dataset, args.data_dir)
    bpd = evaluate_bpd(run.model, picked.images, picked.y, args.batch_size, args.draws, args.seed, args.fast)
    result = {"checkpoint": args.run, "dataset": picked.data.name, "images": int(picked.images.shape[0]),
              "draws": args.draws, "seed": args.seed, "fast": args.fast, "bits_per_dim": bpd, "torch": torch.__version__}
    caveat = few_images_caveat(result["images"], picked.data.name)
    if caveat:
        result["caveat"] = in_flags(caveat)
        warnings.warn(result["caveat"])
    if args.out:
        write_json_atomic(args.out, result)
    return print_summary(result)


def add_commands(command) -> None:
    """Add ``evaluate`` through ``command(name, func, help, description)``, which returns its parser."""
    p = command("evaluate", cmd_evaluate, "test-set bits/dim of a trained model")
    common_options(p, "evaluate", "test")
    p.add_argument("--draws", type=count(1), default=1, help="dequantisation noise draws averaged per image")
    p.add_argument("--out", help="also write the result to this JSON file")
    fast_option(p, "the forward replayed as a CUDA graph at a fixed batch (on a GPU); same bits/dim up to float rounding")
