"""The interactive page of the official Glow demo (openai/glow demo/) for any trained run: samples
at a temperature, an uploaded image's model input, reconstruction, bits/dim and typicality, a
slider per attribute direction, and a walk between two images (``torchglow demo``).

This module is the command: its options, the attribute directions from the run's data, and serving
the page (:mod:`.server`, imported only here: it needs the web extra) over a
:class:`~.session.DemoSession`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ...train.runs import Run, open_run
from ..errors import CLIError, in_flags
from .session import MAX_UPLOAD_BYTES, SAMPLES_PER_ROW, DemoSession, check_directions, class_attributes

MAX_CLASS_DIRECTIONS = 100  # one slider per class up to this many classes (not ImageNet's 1000)


def add_commands(command) -> None:
    """Add ``demo`` through ``command(name, func, help, description)``, which returns its parser."""
    p = command("demo", cmd_demo, "the interactive demo page (samples, your image, edit, mix) for a run",
                __doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="run folder, .pt checkpoint or pretrained folder (default: the newest run under runs/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other address, such as "
                        "0.0.0.0 or a LAN address, serves the page and its API to the network, without authentication)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests that name NAME as their Host (repeatable; '*.example.org' for its "
                        "subdomains): the names other machines use for a --host that is not loopback. Requests "
                        "naming any other host are refused (DNS rebinding)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one); the URL is printed")
    p.add_argument("--dataset", help="data set of the test images and directions (default: the run's)")
    p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--directions", metavar="FILE", help="attribute directions saved by torchglow manipulate "
                     "--save-directions (default: from the data set's attributes or classes)")
    src.add_argument("--labels-csv", metavar="FILE",
                     help="CSV of binary attributes of the training images (header 'id,NAME,...'), as for "
                          "torchglow manipulate")
    p.add_argument("--max-images", type=int, default=2000,
                   help="at most this many (seeded) images for the directions and for the test histogram")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20, help="upload size limit")
    p.add_argument("--samples", type=int, default=24, help=f"samples in the grid ({SAMPLES_PER_ROW} a row)")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of images and the bits/dim dequantisation noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def latest_run(root: str | Path = "runs") -> Path:
    """The most recently modified folder under ``root`` that holds a checkpoint or a pretrained model."""
    from ...model import CONFIG_NAME, WEIGHTS_NAME

    def holds_model(p: Path) -> bool:
        return (any((p / name).is_file() for name in ("best.pt", "last.pt"))
                or ((p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()))

    root = Path(root)
    found = [p for p in root.iterdir() if p.is_dir() and holds_model(p)] if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no run folder with a checkpoint under {root}/: pass RUN (a run folder, "
                                f"checkpoint or pretrained folder)")
    return max(found, key=lambda p: p.stat().st_mtime)


def _directions(args: argparse.Namespace, run: Run) -> tuple[dict[str, list[torch.Tensor]], str]:
    """Attribute directions: a saved file, or computed from the training split's labels (a CSV, the
    data set's per-image attributes, or its classes); none when the run's data are not at hand."""
    from ...data import DatasetError
    from ...data.labels import attribute_labels, image_ids, labels_from_csv
    from ...tools.directions import attribute_directions, load_directions

    model = run.model
    if args.directions:
        if not Path(args.directions).is_file():
            raise CLIError(f"directions file {args.directions} does not exist")
        try:
            directions = load_directions(args.directions)
            check_directions(model, directions)
        except ValueError as e:
            raise CLIError(f"cannot use directions file {args.directions}: {e}") from None
        return directions, f"file {args.directions}"
    try:
        src = run.pick("train", args.max_images, args.seed, args.dataset, args.data_dir)
    except (ValueError, DatasetError) as e:
        print(f"torchglow demo: no attribute sliders: no training images ({in_flags(str(e))})", file=sys.stderr)
        return {}, ""
    data, index = src.data, src.index
    classes = torch.as_tensor(data.labels)[index]
    if args.labels_csv:
        try:
            labels, names = labels_from_csv(args.labels_csv, image_ids(data))
        except ValueError as e:
            raise CLIError(str(e)) from None
        labels, source = labels[index], f"{args.labels_csv} on {data.name}"
    elif getattr(data, "attributes", None) is not None:
        labels, names = attribute_labels(data)
        labels, source = labels[index], f"attributes of {data.name}"
    elif data.num_classes and data.num_classes > MAX_CLASS_DIRECTIONS:
        print(f"torchglow demo: no attribute sliders: {data.name} has {data.num_classes} classes, more than "
              f"{MAX_CLASS_DIRECTIONS} sliders (pass --labels-csv or --directions)", file=sys.stderr)
        return {}, ""
    elif data.num_classes and (classes >= 0).all():
        labels, names = class_attributes(classes, data.class_names or [str(c) for c in range(data.num_classes)])
        source = f"classes of {data.name}"
    else:
        print(f"torchglow demo: no attribute sliders: {data.name} has no labels (pass --labels-csv or --directions)",
              file=sys.stderr)
        return {}, ""
    n_pos = labels.sum(0).tolist()
    keep = [i for i, k in enumerate(n_pos) if 0 < k < len(index)]  # a direction needs images with and without
    if len(keep) < len(names):
        print(f"torchglow demo: no slider for {', '.join(names[i] for i in range(len(names)) if i not in keep)}: "
              f"all or none of the {len(index)} images have it", file=sys.stderr)
    if not keep:
        return {}, ""
    directions = attribute_directions(model, src.images, labels[:, keep], [names[i] for i in keep], y=src.y)
    return directions, f"{source} ({len(index)} images)"


def cmd_demo(args: argparse.Namespace) -> int:
    """``torchglow demo``; Ctrl+C, while the model loads or the page is served, stops it with one
    line and exit status 130 (128 + SIGINT, as ``torchglow train``)."""
    try:
        return _demo(args)
    except KeyboardInterrupt:
        print("torchglow demo: stopped (Ctrl+C)", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    from ...data import DatasetError
    from ...devices import resolve_device

    try:
        from . import server
    except ImportError as e:
        raise CLIError(f"the demo needs the web extra ({e}): pip install 'torchglow[demo]'") from None
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    if args.max_images < 1 or args.samples < 1 or args.max_upload_mb <= 0:
        raise CLIError("--max-images, --samples and --max-upload-mb must be positive")
    try:
        server.check_host_names(args.allow_host)
    except ValueError as e:
        raise CLIError(f"--allow-host: {e}") from None
    try:
        run = str(args.run or latest_run())
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    opened = open_run(run, resolve_device(args.device))
    directions, source = _directions(args, opened)
    test_x = test_y = class_names = None
    try:
        test = opened.pick("test", args.max_images, args.seed, args.dataset, args.data_dir, labels=False)
        test_x, test_y, class_names = test.images, torch.as_tensor(test.data.labels)[test.index], test.data.class_names
    except (ValueError, DatasetError) as e:
        print(f"torchglow demo: no histogram or gallery: no test images ({in_flags(str(e))})", file=sys.stderr)
    session = DemoSession(opened.model, name=run, test_images=test_x, test_labels=test_y, class_names=class_names,
                          directions=directions, direction_source=source, max_level=opened.display_max_level(),
                          n_samples=args.samples, seed=args.seed)
    try:
        server.serve(session, args.host, args.port, max_upload_bytes=int(args.max_upload_mb * 2**20),
                          allow_hosts=args.allow_host)
    except OSError as e:  # the address is taken or not this machine's
        raise CLIError(str(e)) from None
    return 0
