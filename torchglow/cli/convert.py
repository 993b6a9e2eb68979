"""``torchglow convert``: import a checkpoint of another Glow implementation
(:mod:`torchglow.tools.convert`)."""

from __future__ import annotations

import argparse
import shlex

from ..config import GlowConfig
from ..model import CONFIG_NAME
from ..tools import convert


def add_commands(command) -> None:
    """Add ``convert`` through ``command(name, func, help, description)``, which returns its parser."""
    p = command("convert", cmd_convert, "import a checkpoint of another Glow implementation (y0ast/Glow-PyTorch)",
                convert.__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the other implementation's checkpoint (.pt state dict)")
    p.add_argument("--from", dest="source", choices=("y0ast",), required=True,
                   help="the implementation it comes from: y0ast (github.com/y0ast/Glow-PyTorch)")
    p.add_argument("--hparams", help="its hparams.json (checked against the tensors; needed for the 'reverse' "
                                     "permutation)")
    p.add_argument("--out", required=True, help="the pretrained folder to write (must not exist or be empty)")


def cmd_convert(args: argparse.Namespace) -> int:
    words = ["torchglow", "convert", "--from", args.source, args.checkpoint]
    words += ["--hparams", args.hparams] if args.hparams else []
    command = shlex.join(words + ["--out", args.out])
    out = convert.convert_y0ast(args.checkpoint, args.out, args.hparams, command)
    config = GlowConfig.load(out / CONFIG_NAME)
    print(f"wrote {out}: {config.image_shape} K={config.n_steps} L={config.n_levels} "
          f"{config.hidden_channels} hidden, {config.coupling} coupling, {config.permutation}"
          + (" (LU)" if config.permutation == "invconv" and config.lu else "")
          + (f", {config.num_classes} classes" if config.num_classes else ""))
    return 0
