"""The latent-space commands: ``torchglow reconstruct``, ``interpolate`` and ``manipulate``."""

from __future__ import annotations

import argparse
from typing import Any

from .options import count
from .shared import TOOL_SPLITS, common_options, image_source, open_model, out_dir, print_summary, user_errors


@user_errors
def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Encode n seeded test images at their bin centres and decode them back; writes
    reconstruction.png/.json and prints the summary (max_abs_error)."""

    from ..tools.latent import reconstruct

    run = open_model(args)
    picked = run.pick(args.split, args.n, args.seed, args.dataset, args.data_dir)
    return print_summary(reconstruct(run.model, picked.images, out_dir(args, run, "reconstruct"), y=picked.y,
                                     nrow=args.nrow, batch_size=args.batch_size, max_level=args.max_level,
                                     info={**image_source(args, picked), "indices": picked.index.tolist()}))


@user_errors
def cmd_interpolate(args: argparse.Namespace) -> int:
    """Interpolate the standardised latents of seeded pairs of images (linear and/or spherical); one
    PNG per method, interpolation.json."""

    from ..tools.latent import interpolate

    run = open_model(args)
    picked = run.pick(args.split, 2 * args.pairs, args.seed, args.dataset, args.data_dir, exactly=True)
    p, y = args.pairs, picked.y
    info = {**image_source(args, picked), "indices_a": picked.index[:p].tolist(), "indices_b": picked.index[p:].tolist()}
    return print_summary(interpolate(run.model, picked.images[:p], picked.images[p:], out_dir(args, run, "interpolate"),
                                     steps=args.steps, method=args.method, y=None if y is None else y[:p],
                                     batch_size=args.batch_size, max_level=args.max_level, info=info))


@user_errors
def cmd_manipulate(args: argparse.Namespace) -> int:
    """Attribute directions as in the official demo: 1.6 * (mean latent of the images with the
    attribute - mean latent of those without), from the data set's attributes (CelebA, --attribute),
    a class (--class-attribute), a CSV (--labels-csv) or a saved file (--directions); then n seeded
    images are decoded at latent + alpha * direction, one PNG per attribute."""

    from ..data.labels import labels_for, select_attributes
    from ..tools.directions import attribute_directions, load_directions, save_directions
    from ..tools.latent import manipulate_all

    run = open_model(args)
    if args.directions:
        directions = load_directions(args.directions)
        directions = {n: directions[n] for n in select_attributes(list(directions), args.attribute, args.directions)}
        info: dict[str, Any] = {"directions_from": args.directions}
    else:
        src = run.pick(args.directions_split, args.max_images, args.seed, args.dataset, args.data_dir)
        labels, names, source = labels_for(src.data, src.index, args.class_attribute, args.labels_csv, args.attribute)
        directions = attribute_directions(run.model, src.images, labels, names, args.batch_size, y=src.y)
        info = {"directions_from": {"source": source, "dataset": src.data.name, "images": len(src.index),
                                    "with_attribute": dict(zip(names, labels.sum(0).tolist()))}}
        if args.save_directions:
            save_directions(directions, args.save_directions, metadata={"checkpoint": args.run, **info["directions_from"]})
            info["saved_directions"] = str(args.save_directions)
    picked = run.pick(args.split, args.n, args.seed, args.dataset, args.data_dir)
    return print_summary(manipulate_all(run.model, picked.images, directions, out_dir(args, run, "manipulate"),
                                        args.alphas, picked.y, args.batch_size, args.max_level,
                                        info={**image_source(args, picked), "indices": picked.index.tolist(), **info}))



def add_commands(command) -> None:
    """Add ``reconstruct``, ``interpolate`` and ``manipulate`` through ``command(name, func, help,
    description)``, which returns each one's parser."""
    p = command("reconstruct", cmd_reconstruct, "test images next to decode(encode(x)), with the largest error")
    common_options(p, "reconstruct", "test")
    p.add_argument("--n", type=count(1), default=16, help="images to reconstruct (seeded choice)")
    p.add_argument("--nrow", type=count(1), default=8, help="images per row of the grid")

    p = command("interpolate", cmd_interpolate, "interpolations between pairs of images through their latents")
    common_options(p, "interpolate", "test")
    p.add_argument("--pairs", type=count(1), default=4, help="pairs of images, one row each")
    p.add_argument("--steps", type=int, default=8, help="images per row, both ends included")
    p.add_argument("--method", nargs="+", choices=("linear", "slerp"), default=["linear", "slerp"],
                   help="interpolation(s) of every level's latent")
    _add_manipulate(command)


def _add_manipulate(command) -> None:
    p = command("manipulate", cmd_manipulate, "edit images along attribute directions in latent space")
    common_options(p, "manipulate", "test", split_help="split of the images to edit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--class-attribute", nargs="+", metavar="CLASS",
                     help="one attribute per class C, a class name or its index: images of class C against all "
                          "others (e.g. 3 for digit 3, cat for a folder's cat/ images)")
    src.add_argument("--labels-csv", metavar="FILE",
                     help="CSV of binary attributes: header 'id,NAME,...', one row per image with values 1 or 0/-1; "
                          "id is the file name (CelebA) or the image's 0-based index in --directions-split")
    src.add_argument("--directions", metavar="FILE", help="reuse directions saved with --save-directions")
    p.add_argument("--attribute", nargs="+", metavar="NAME",
                   help="attribute(s) to use: of the data set (CelebA, e.g. Smiling), the CSV or the directions "
                        "file (default: all of the CSV or file)")
    p.add_argument("--save-directions", metavar="FILE", help="write the computed directions to this .safetensors file")
    p.add_argument("--directions-split", choices=TOOL_SPLITS, default="train",
                   help="split whose images and labels give the directions")
    p.add_argument("--max-images", type=count(0), default=0,
                   help="use at most this many (seeded) images for the directions; 0 for all")
    p.add_argument("--alphas", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="latent + alpha * direction, one column per alpha")
    p.add_argument("--n", type=count(1), default=4, help="images to edit (seeded choice), one row each")
