"""``torchglow ood``: out-of-distribution detection with likelihood-based scores."""

from __future__ import annotations

import argparse

from .errors import CLIError, in_flags
from .options import count, dataset_name
from .shared import TOOL_SPLITS, common_options, open_model, out_dir, print_summary, user_errors


@user_errors
def cmd_ood(args: argparse.Namespace) -> int:
    """Score in-distribution test images against OOD sets with bits/dim, the typicality test and the
    input-complexity score; prints the table, writes ood.json and bpd_hist.png/complexity_hist.png.
    Default OOD sets: flipped, inverted and uniform noise (when no --ood-dataset/--ood-folder is
    given)."""

    from ..tools.images import data_max_level
    from ..tools.ood import TRANSFORMS, ood_report, ood_sets

    default = [] if args.ood_dataset or args.ood_folder else list(TRANSFORMS)
    transforms = default if args.ood is None else args.ood
    if not transforms and not args.ood_dataset and not args.ood_folder:
        raise CLIError("no OOD set: pass --ood, --ood-dataset or --ood-folder")
    run = open_model(args)
    n_bits = run.model.config.n_bits
    picked = run.pick(args.in_split, args.max_images, args.seed, args.dataset, args.data_dir, labels=False)
    if picked.images.shape[0] < 2:
        raise CLIError(f"data set {picked.data.name} has {picked.images.shape[0]} image(s); OOD metrics need at least 2")
    sets = ood_sets(picked.images, n_bits, transforms, args.ood_dataset or (), args.ood_folder or (), args.ood_split,
                    args.ood_data_dir, args.download, args.max_images, args.seed)
    reference = None
    if args.reference_split:
        reference = run.pick(args.reference_split, args.max_images, args.seed, args.dataset, args.data_dir,
                             labels=False).images
    info = {"checkpoint": args.run, "in_distribution": picked.data.name,
            "ood_sets": {k: int(v.shape[0]) for k, v in sets.items()},
            "noise_max_level": data_max_level(picked.images, n_bits)}
    summary = ood_report(run.model, picked.images, sets, out_dir(args, run, "ood"), batch_size=args.batch_size,
                         seed=args.seed, typicality_m=args.typicality_m, in_reference=reference,
                         in_name=picked.data.name, verbose=False, info=info)
    if args.json:
        return print_summary(summary)
    print(in_flags(summary["table"]))
    print(f"wrote {', '.join(summary['files'])}")
    return 0



def add_commands(command) -> None:
    """Add ``ood`` through ``command(name, func, help, description)``, which returns its parser."""
    from ..tools.ood import TRANSFORMS

    p = command("ood", cmd_ood, "out-of-distribution detection: AUROC/AUPR/FPR@95 of likelihood-based scores")
    common_options(p, "ood", None)
    p.add_argument("--in-split", choices=TOOL_SPLITS, default="test",
                   help="in-distribution split (all: every image, e.g. of a folder of test images)")
    p.add_argument("--ood", nargs="*", choices=TRANSFORMS, default=None,
                   help="built-in OOD sets from the in-distribution images: upside down, intensities inverted, "
                        "uniform noise over the data's range of bins (default: all three)")
    p.add_argument("--ood-dataset", nargs="+", metavar="NAME", type=dataset_name,
                   help="other data sets (e.g. svhn for a cifar10 model), converted to the model's channels and "
                        "size (in-memory sets are only zero-padded, e.g. mnist 28->32; celeba is resized)")
    p.add_argument("--ood-split", choices=TOOL_SPLITS, default="test", help="split of the --ood-dataset sets")
    p.add_argument("--ood-data-dir", help="where the --ood-dataset files are (default: their usual place)")
    p.add_argument("--download", action="store_true", help="download --ood-dataset sets whose files are missing")
    p.add_argument("--ood-folder", nargs="+", metavar="DIR", help="folders of images, all used as OOD sets")
    p.add_argument("--typicality-m", type=count(1), nargs="+", default=[2, 10], metavar="M",
                   help="batch sizes of the typicality test")
    p.add_argument("--reference-split", choices=("train",), default=None,
                   help="in-distribution images for the typicality reference (default: half of the in-split)")
    p.add_argument("--max-images", type=count(0), default=0, help="at most this many (seeded) images per set; 0 for all")
    p.add_argument("--json", action="store_true", help="print the full JSON summary instead of the table")
