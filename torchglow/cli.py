"""The ``torchglow`` command: argparse subcommands that parse, then call the Python API.

Options of ``train`` are derived from the typed fields of :class:`GlowConfig` and
:class:`TrainConfig`. Precedence: field defaults < preset < config file (``--config``) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .config import PRESETS, ConfigError, GlowConfig

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error found by the CLI itself."""


# --------------------------------------------------------------------------- dataclass -> flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help_of(cls) -> dict[str, str]:
    """Per-field help from the class docstring's ``Attributes:`` section."""
    out, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = head
            out[current] = rest.strip()
        elif current and stripped:
            out[current] += " " + stripped
        elif not stripped:
            current = None
    return out


def add_dataclass_options(parser: argparse.ArgumentParser, cls, choices: dict[str, tuple] | None = None) -> None:
    """One option per field; defaults are SUPPRESSed so only flags given on the command line count."""
    hints = typing.get_type_hints(cls)
    helps = _help_of(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        args = typing.get_args(tp)
        optional = type(None) in args and (typing.get_origin(tp) in (typing.Union, types.UnionType))
        base = next(a for a in args if a is not type(None)) if optional else tp
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=helps.get(field.name, ""))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            item_types = typing.get_args(base)
            kw["type"] = item_types[0]
            kw["nargs"] = "+" if Ellipsis in item_types else len(item_types)
            kw["metavar"] = item_types[0].__name__.upper()
        else:
            kw["type"] = base
            kw["metavar"] = base.__name__.upper()
        if choices and field.name in choices:
            kw["choices"] = choices[field.name]
            kw.pop("metavar", None)
        if optional:
            kw["help"] += " (none to unset)" if base is not str else ""
            if base is not str:
                kw["type"] = _none_or(base)
        group.add_argument(_flag(field.name), dest=field.name, **kw)


def _none_or(tp):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file with model and training options, flat or under ``model:``/``train:``."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise CLIError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CLIError(f"config file {path} is not a text file") from None
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of option names to values")
    sections = [data.pop("model", None) or {}, data.pop("train", None) or {}]
    if not all(isinstance(section, dict) for section in sections):
        raise CLIError(f"config file {path}: model: and train: must hold mappings of option names to values")
    flat = {**sections[0], **sections[1], **data}
    if not all(isinstance(k, str) for k in flat):
        raise CLIError(f"config file {path}: option names must be strings, got {[k for k in flat if not isinstance(k, str)]}")
    return {k.replace("-", "_"): v for k, v in flat.items()}


def build_configs(values: dict[str, Any], preset_name: str | None):
    """Split option values between the model and training configs, over the preset's defaults."""
    from .config import TRAIN_PRESETS, TrainConfig

    model_fields = {f.name for f in dataclasses.fields(GlowConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_fields - train_fields - {"preset"})
    if unknown:
        raise CLIError(f"unknown option(s) {', '.join(unknown)}")
    name = values.get("preset", preset_name) or "digits"
    if not isinstance(name, str) or name not in PRESETS:
        raise CLIError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    model_values = {**PRESETS[name], **{k: v for k, v in values.items() if k in model_fields}}
    train_values = {**TRAIN_PRESETS.get(name, {}), **{k: v for k, v in values.items() if k in train_fields}}
    if isinstance(model_values.get("image_shape"), list):
        model_values["image_shape"] = tuple(model_values["image_shape"])
    try:
        return GlowConfig(**model_values), TrainConfig(**train_values)
    except TypeError as e:
        raise CLIError(str(e)) from None


# --------------------------------------------------------------------------- subcommands
def cmd_train(args: argparse.Namespace) -> int:
    """Train; print the human summary (rank 0). Exit 0 when finished, 130/143 when stopped by
    SIGINT/SIGTERM (the run is resumable), 1 otherwise."""
    import os

    from .train import load_run_configs, summary_text, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config", "resume", "preset")}
    if args.resume:
        model_config, train_config = load_run_configs(args.resume)
        if args.preset or args.config or any(k in {f.name for f in dataclasses.fields(GlowConfig)} for k in given):
            raise CLIError("--resume continues a run with its own config: drop --preset, --config and model options")
        train_config = dataclasses.replace(train_config, out=args.resume, **given)
        summary = train(model_config, train_config, resume=True).summary
    else:
        values = read_config_file(args.config) if args.config else {}
        values.update(given)
        model_config, train_config = build_configs(values, args.preset)
        summary = train(model_config, train_config).summary
    if os.environ.get("RANK", "0") == "0":
        print(summary_text(summary))
    if summary["interrupted_by"]:
        return 128 + int(signal.Signals[summary["interrupted_by"]])
    return 0 if summary["finished"] else 1


def _dataset_for(path: str, model, dataset: str | None, data_dir: str | None, split: str):
    """The ``split`` of the data set the run at ``path`` was trained on (or ``dataset``), at the
    model's image size and channels, split with the run's seed (digits and image folders)."""
    from .data import load_dataset

    run_config = _run_train_config(path)
    name = dataset or run_config.get("dataset")
    if not name:
        raise CLIError(f"{path} does not say which data set it was trained on: pass --dataset")
    c, h, _ = model.config.image_shape
    own = name == run_config.get("dataset")
    seed = run_config.get("seed", 0) if own else 0
    return load_dataset(name, split, data_dir=data_dir or (run_config.get("data_dir") if own else None),
                        image_size=h, channels=c, seed=seed if isinstance(seed, int) else 0)


def _run_train_config(path: str) -> dict[str, Any]:
    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("train", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def _device(name: str):
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate_bpd

    model = _load_model(args)
    data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.split)
    images, labels = _images_at(data, torch.arange(len(data)))
    bpd = evaluate_bpd(model, images, labels if model.config.num_classes else None,
                       args.batch_size, args.draws, args.seed)
    result = {"checkpoint": args.run, "dataset": data.name, "images": int(images.shape[0]),
              "draws": args.draws, "seed": args.seed, "bits_per_dim": bpd, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .latent import sample_grid

    model = _load_model(args)
    out = _tool_dir(args.run, args.out, "samples")
    summary = sample_grid(model, out, temperatures=args.temperatures, n_per_row=args.n, seed=args.seed,
                          max_level=_display_max_level(args, model))
    print(json.dumps(summary, indent=2))
    return 0


def _display_max_level(args: argparse.Namespace, model) -> int | None:
    """--max-level; else the top bin of the run's own test images when they are held in memory
    (16 for the digits, whose 17 levels fill 5-bit bins 0..16); else None, the top bin."""
    from .data import DatasetError
    from .images import data_max_level

    if args.max_level is not None or model.config.n_bits == 8:
        return args.max_level
    try:
        data = _dataset_for(args.run, model, None, None, "test")
    except (CLIError, DatasetError):
        return None
    return data_max_level(data.images, model.config.n_bits) if hasattr(data, "images") else None


# --------------------------------------------------------------------------- latent-space and OOD tools
def _tool_dir(run: str, out: str | None, tool: str) -> Path:
    """``--out``, or ``<RUN>/<tool>`` (the checkpoint's folder when RUN is a file)."""
    if out:
        return Path(out)
    p = Path(run)
    return (p if p.is_dir() else p.parent) / tool


def _load_model(args: argparse.Namespace):
    from .checkpoint import load_model

    return load_model(args.run).to(_device(args.device))


def _pick(n_total: int, n: int, seed: int, what: str = "images") -> "torch.Tensor":
    """``n`` distinct indices of ``range(n_total)`` from a seeded permutation (all of them, in
    order, when ``n`` is 0 or at least ``n_total``)."""
    import torch

    if n < 0:
        raise CLIError(f"the number of {what} must be >= 0, got {n}")
    if n == 0 or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def _images_at(data, index) -> tuple["torch.Tensor", "torch.Tensor"]:
    """uint8 images (N, C, H, W) and int64 labels (N,) of ``data`` at ``index``."""
    import torch

    index = torch.as_tensor(index, dtype=torch.long)
    if hasattr(data, "images"):
        return data.images[index], torch.as_tensor(data.labels)[index]
    if len(index) == 0:
        return torch.zeros((0, *data.image_shape), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    xs, ys = zip(*(data[int(i)] for i in index))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys]).long()


def _class_labels(model, data, labels):
    """The labels to condition a class-conditional model on (None for an unconditional one)."""
    if not model.config.num_classes:
        return None
    if (labels < 0).any():
        raise CLIError(f"the model is class-conditional but data set {data.name} has no class labels")
    return labels


def _need_images(data, n: int, what: str) -> None:
    if len(data) < n:
        raise CLIError(f"{what} needs {n} images but data set {data.name} has {len(data)}")


def _finish(summary: dict[str, Any], json_path: Path, **extra: Any) -> dict[str, Any]:
    """Add where the images came from to a tool's summary, rewrite its JSON file, print it."""
    summary = {**summary, **extra}
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def _library_call(fn, *a, **kw):
    """Call a latent/OOD function; its ValueErrors are the user's (bad option values): one line."""
    try:
        return fn(*a, **kw)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .latent import reconstruct

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    model = _load_model(args)
    data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.split)
    index = _pick(len(data), args.n, args.seed)
    x, labels = _images_at(data, index)
    out = _tool_dir(args.run, args.out, "reconstruct")
    summary = _library_call(reconstruct, model, x, out, y=_class_labels(model, data, labels), nrow=args.nrow,
                            batch_size=args.batch_size, max_level=args.max_level)
    _finish(summary, out / "reconstruction.json", checkpoint=args.run, dataset=data.name, seed=args.seed,
            indices=index.tolist())
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .latent import interpolate

    if args.pairs < 1:
        raise CLIError(f"--pairs must be >= 1, got {args.pairs}")
    model = _load_model(args)
    data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.split)
    _need_images(data, 2 * args.pairs, f"--pairs {args.pairs}")
    index = _pick(len(data), 2 * args.pairs, args.seed)
    x, labels = _images_at(data, index)
    y = _class_labels(model, data, labels)
    out = _tool_dir(args.run, args.out, "interpolate")
    p = args.pairs
    summary = _library_call(interpolate, model, x[:p], x[p:], out, steps=args.steps, method=args.method,
                            y=None if y is None else y[:p], batch_size=args.batch_size, max_level=args.max_level)
    _finish(summary, out / "interpolation.json", checkpoint=args.run, dataset=data.name, seed=args.seed,
            indices_a=index[:p].tolist(), indices_b=index[p:].tolist())
    return 0


def _csv_ids(data) -> list[str]:
    """The image ids a labels CSV is matched on: file names for file-backed data sets (CelebA's
    ``000001.jpg``), else the 0-based index of the image in the split."""
    paths = getattr(data, "paths", None)
    if paths is not None:
        return [Path(q).name for q in paths]
    return [str(i) for i in range(len(data))]


def _select(names: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if not wanted:
        return names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        shown = ", ".join(names[:50]) + (", ..." if len(names) > 50 else "")
        raise CLIError(f"unknown attribute(s) {', '.join(unknown)} in {where}; available: {shown}")
    return list(dict.fromkeys(wanted))


def _attribute_labels(args: argparse.Namespace, data, index) -> tuple["torch.Tensor", list[str], str]:
    """Binary labels (len(index), A) of the images at ``index``, their names and their source."""
    import torch

    from .latent import attribute_labels, binary_labels_from_classes, labels_from_csv

    if args.class_attribute is not None:
        if args.attribute:
            raise CLIError("--attribute picks among data set, CSV or saved attributes; "
                           "--class-attribute already names its attribute(s)")
        if not data.num_classes or (torch.as_tensor(data.labels) < 0).all():
            raise CLIError(f"data set {data.name} has no class labels: --class-attribute needs a labelled data set "
                           f"(use --labels-csv or, for CelebA, --attribute)")
        bad = [c for c in args.class_attribute if not 0 <= c < data.num_classes]
        if bad:
            raise CLIError(f"--class-attribute {bad[0]} is not a class of {data.name} (0..{data.num_classes - 1})")
        labels = torch.as_tensor(data.labels)[index]
        cols, names = [], []
        for c in dict.fromkeys(args.class_attribute):
            lab, (name,) = binary_labels_from_classes(labels, c)
            cols.append(lab)
            names.append(name)
        return torch.cat(cols, 1), names, f"classes of {data.name}"
    if args.labels_csv:
        labels, names = _library_call(labels_from_csv, args.labels_csv, _csv_ids(data))
        source = f"{args.labels_csv}"
    else:
        if getattr(data, "attributes", None) is None:
            raise CLIError(f"data set {data.name} has no per-image attributes: pass --class-attribute C, "
                           f"--labels-csv FILE or --directions FILE")
        labels, names = _library_call(attribute_labels, data)
        source = f"attributes of {data.name}"
        if not args.attribute:
            shown = ", ".join(names[:50])
            raise CLIError(f"pass --attribute NAME (one or more) to choose among the attributes of {data.name}: {shown}")
    chosen = _select(names, args.attribute, source)
    cols = [names.index(n) for n in chosen]
    return labels[torch.as_tensor(index, dtype=torch.long)][:, cols], chosen, source


def cmd_manipulate(args: argparse.Namespace) -> int:
    from .latent import attribute_directions, load_directions, manipulate, save_directions

    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    if args.directions and (args.class_attribute is not None or args.labels_csv):
        raise CLIError("--directions reuses saved directions: drop --class-attribute and --labels-csv")
    model = _load_model(args)
    info: dict[str, Any] = {}
    if args.directions:
        if not Path(args.directions).is_file():
            raise CLIError(f"directions file {args.directions} does not exist")
        try:
            directions = load_directions(args.directions)
        except Exception as e:  # safetensors raises its own errors for foreign files
            raise CLIError(f"cannot read directions file {args.directions}: {e}") from None
        names = _select(list(directions), args.attribute, args.directions)
        directions = {n: directions[n] for n in names}
        info["directions_from"] = args.directions
    else:
        source_data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.directions_split)
        index = _pick(len(source_data), args.max_images, args.seed)
        labels, names, source = _attribute_labels(args, source_data, index)
        x_all, y_all = _images_at(source_data, index)
        directions = _library_call(attribute_directions, model, x_all, labels, names, batch_size=args.batch_size,
                                   y=_class_labels(model, source_data, y_all))
        positives = {n: int(v) for n, v in zip(names, labels.sum(0).tolist())}
        info.update(directions_from={"source": source, "dataset": source_data.name, "images": len(index),
                                     "with_attribute": positives})
        if args.save_directions:
            meta = {"checkpoint": args.run, **info["directions_from"]}
            save_directions(directions, args.save_directions, metadata=meta)
            info["saved_directions"] = str(args.save_directions)
    data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.split)
    index = _pick(len(data), args.n, args.seed)
    x, labels = _images_at(data, index)
    y = _class_labels(model, data, labels)
    out = _tool_dir(args.run, args.out, "manipulate")
    per_attribute = {}
    for name, direction in directions.items():
        per_attribute[name] = _library_call(manipulate, model, x, direction, out, alphas=args.alphas, y=y, name=name,
                                            batch_size=args.batch_size, max_level=args.max_level)
    summary = {"tool": "manipulate", "checkpoint": args.run, "dataset": data.name, "seed": args.seed,
               "indices": index.tolist(), "alphas": [float(a) for a in args.alphas], **info,
               "attributes": per_attribute,
               "files": [f for s in per_attribute.values() for f in s["files"]]}
    out.mkdir(parents=True, exist_ok=True)
    _finish(summary, out / "manipulate.json")
    return 0


OOD_TRANSFORMS = ("flipped", "inverted", "noise")


def _ood_folder(folder: str, model) -> list:
    """All images of a folder (both splits of :func:`load_dataset`'s 95/5 split)."""
    from .data import DatasetError, load_dataset

    c, h, _ = model.config.image_shape
    sets = [load_dataset(f"folder:{folder}", "train", image_size=h, channels=c)]
    try:
        sets.append(load_dataset(f"folder:{folder}", "test", image_size=h, channels=c))
    except DatasetError:  # a small folder has no test split
        pass
    return sets


def cmd_ood(args: argparse.Namespace) -> int:
    import torch

    from .data import load_dataset
    from .images import data_max_level
    from .ood import flipped, inverted, ood_report, uniform_noise

    if args.max_images < 0:
        raise CLIError(f"--max-images must be >= 0, got {args.max_images}")
    transforms = args.ood if args.ood is not None else ([] if args.ood_dataset or args.ood_folder
                                                        else list(OOD_TRANSFORMS))
    if not transforms and not args.ood_dataset and not args.ood_folder:
        raise CLIError("no OOD set: pass --ood, --ood-dataset or --ood-folder")
    model = _load_model(args)
    n_bits = model.config.n_bits
    data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.in_split)
    x_in, _ = _images_at(data, _pick(len(data), args.max_images, args.seed))
    if x_in.shape[0] < 2:
        raise CLIError(f"data set {data.name} has {x_in.shape[0]} image(s); OOD metrics need at least 2")
    top = data_max_level(x_in, n_bits)
    out_sets: dict[str, torch.Tensor] = {}
    for t in dict.fromkeys(transforms):
        if t == "flipped":
            out_sets["flipped"] = flipped(x_in)
        elif t == "inverted":
            out_sets["inverted"] = inverted(x_in, n_bits)
        else:
            out_sets["noise"] = uniform_noise(x_in.shape[0], x_in.shape[1:], n_bits, seed=args.seed, max_level=top)
    c, h, _ = model.config.image_shape
    for name in dict.fromkeys(args.ood_dataset or []):
        ds = load_dataset(name, args.ood_split, data_dir=args.ood_data_dir, download=args.download,
                          image_size=h, channels=c)
        out_sets[ds.name] = _images_at(ds, _pick(len(ds), args.max_images, args.seed))[0]
    for folder in dict.fromkeys(args.ood_folder or []):
        parts = [_images_at(ds, torch.arange(len(ds)))[0] for ds in _ood_folder(folder, model)]
        x = torch.cat(parts)
        out_sets[f"folder:{folder}"] = x[_pick(len(x), args.max_images, args.seed)]
    for name, x in out_sets.items():
        if tuple(x.shape[1:]) != tuple(model.config.image_shape):
            raise CLIError(f"OOD set {name} has images of shape {tuple(x.shape[1:])}, "
                           f"the model takes {model.config.image_shape}")
    reference = None
    if args.reference_split:
        ref_data = _dataset_for(args.run, model, args.dataset, args.data_dir, args.reference_split)
        reference = _images_at(ref_data, _pick(len(ref_data), args.max_images, args.seed))[0]
    out = _tool_dir(args.run, args.out, "ood")
    out.mkdir(parents=True, exist_ok=True)
    summary = _library_call(ood_report, model, x_in, out_sets, out, batch_size=args.batch_size, seed=args.seed,
                            typicality_m=args.typicality_m, in_reference=reference, in_name=data.name,
                            verbose=not args.json)
    summary = {**summary, "checkpoint": args.run, "in_distribution": data.name,
               "ood_sets": {k: int(v.shape[0]) for k, v in out_sets.items()}, "noise_max_level": top}
    (out / "ood.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {', '.join(summary['files'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import COMPILE_MODES, COUPLINGS, MEMORY_MODES, OPTIMIZERS, PERMUTATIONS, PRECISIONS, TrainConfig

    parser = argparse.ArgumentParser(prog="torchglow", description="Glow normalizing flows: train, evaluate, sample, and the latent-space "
                                     "and OOD tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a Glow (default: the digits preset on scikit-learn's digits, CPU)",
                       description="Train a Glow. Precedence: defaults < --preset < --config < flags.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and training defaults (digits)")
    p.add_argument("--config", help="YAML or JSON file of options (flat, or under model:/train:)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    add_dataclass_options(p, GlowConfig, {"coupling": COUPLINGS, "permutation": PERMUTATIONS})
    add_dataclass_options(p, TrainConfig, {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "memory": MEMORY_MODES,
                                           "compile_mode": COMPILE_MODES})
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set bits/dim of a trained model")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, .pt checkpoint or pretrained folder")
    p.add_argument("--dataset", help="data set (default: the one the run was trained on)")
    p.add_argument("--data-dir", help="where the data set's files are")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--draws", type=int, default=1, help="dequantisation draws to average (seeded)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the result to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="image grids at one or more temperatures")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, .pt checkpoint or pretrained folder")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 0.9, 1.0],
                   help="one row (or grid, class-conditional) per temperature")
    p.add_argument("--n", type=int, default=8, help="samples per row")
    p.add_argument("--seed", type=int, default=0, help="seeds the latent draw shared by all temperatures")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-level", type=int, default=None,
                   help="bin shown as white (default: the top bin the run's own in-memory test images use, e.g. 16 for the digits; else 2**n_bits-1)")
    p.add_argument("--out", help="output folder (default: RUN/samples)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="test images next to decode(encode(x)), with the largest error",
                       description="Encode n seeded test images at their bin centres and decode them back; "
                                   "writes reconstruction.png/.json and prints the summary (max_abs_error).")
    _tool_options(p, "reconstruct", "test")
    p.add_argument("--n", type=int, default=16, help="images to reconstruct (seeded choice)")
    p.add_argument("--nrow", type=int, default=8, help="images per row of the grid")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("interpolate", help="interpolations between pairs of images through their latents",
                       description="Interpolate the standardised latents of seeded pairs of images "
                                   "(linear and/or spherical); one PNG per method, interpolation.json.")
    _tool_options(p, "interpolate", "test")
    p.add_argument("--pairs", type=int, default=4, help="pairs of images, one row each")
    p.add_argument("--steps", type=int, default=8, help="images per row, both ends included")
    p.add_argument("--method", nargs="+", choices=("linear", "slerp"), default=["linear", "slerp"],
                   help="interpolation(s) of every level's latent")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("manipulate", help="edit images along attribute directions in latent space",
                       description="Attribute directions as in the official demo: 1.6 * (mean latent of the "
                                   "images with the attribute - mean latent of those without), from the data "
                                   "set's attributes (CelebA, --attribute), a class (--class-attribute), a CSV "
                                   "(--labels-csv) or a saved file (--directions); then n seeded images are "
                                   "decoded at latent + alpha * direction, one PNG per attribute.")
    _tool_options(p, "manipulate", "test", split_help="split of the images to edit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--class-attribute", type=int, nargs="+", metavar="CLASS",
                     help="one attribute per class C: images of class C against all others (e.g. 3 for digit 3)")
    src.add_argument("--labels-csv", metavar="FILE",
                     help="CSV of binary attributes: header 'id,NAME,...', one row per image with values 1 or 0/-1; "
                          "id is the file name (CelebA) or the image's 0-based index in --directions-split")
    src.add_argument("--directions", metavar="FILE", help="reuse directions saved with --save-directions")
    p.add_argument("--attribute", nargs="+", metavar="NAME",
                   help="attribute(s) to use: of the data set (CelebA, e.g. Smiling), the CSV or the directions "
                        "file (default: all of the CSV or file)")
    p.add_argument("--save-directions", metavar="FILE", help="write the computed directions to this .safetensors file")
    p.add_argument("--directions-split", choices=("train", "test"), default="train",
                   help="split whose images and labels give the directions")
    p.add_argument("--max-images", type=int, default=0,
                   help="use at most this many (seeded) images for the directions (0: all)")
    p.add_argument("--alphas", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="latent + alpha * direction, one column per alpha")
    p.add_argument("--n", type=int, default=4, help="images to edit (seeded choice), one row each")
    p.set_defaults(func=cmd_manipulate)

    p = sub.add_parser("ood", help="out-of-distribution detection: AUROC/AUPR/FPR@95 of likelihood-based scores",
                       description="Score in-distribution test images against OOD sets with bits/dim, the "
                                   "typicality test and the input-complexity score; prints the table, writes "
                                   "ood.json and bpd_hist.png/complexity_hist.png. Default OOD sets: flipped, "
                                   "inverted and uniform noise (when no --ood-dataset/--ood-folder is given).")
    _tool_options(p, "ood", None)
    p.add_argument("--in-split", choices=("train", "test"), default="test", help="in-distribution split")
    p.add_argument("--ood", nargs="*", choices=OOD_TRANSFORMS, default=None,
                   help="built-in OOD sets from the in-distribution images: upside down, intensities inverted, "
                        "uniform noise over the data's range of bins")
    p.add_argument("--ood-dataset", nargs="+", metavar="NAME",
                   help="other data sets (e.g. svhn for a cifar10 model), converted to the model's channels and "
                        "size (in-memory sets are only zero-padded, e.g. mnist 28->32; celeba is resized)")
    p.add_argument("--ood-split", choices=("train", "test"), default="test", help="split of the --ood-dataset sets")
    p.add_argument("--ood-data-dir", help="where the --ood-dataset files are (default: their usual place)")
    p.add_argument("--download", action="store_true", help="download --ood-dataset sets whose files are missing")
    p.add_argument("--ood-folder", nargs="+", metavar="DIR", help="folders of images, all used as OOD sets")
    p.add_argument("--typicality-m", type=int, nargs="+", default=[2, 10], metavar="M",
                   help="batch sizes of the typicality test")
    p.add_argument("--reference-split", choices=("train",), default=None,
                   help="in-distribution images for the typicality reference (default: half of the in-split)")
    p.add_argument("--max-images", type=int, default=0, help="at most this many (seeded) images per set (0: all)")
    p.add_argument("--json", action="store_true", help="print the full JSON summary instead of the table")
    p.set_defaults(func=cmd_ood)

    from . import bench
    p = sub.add_parser("bench", help="training, sampling and evaluation images/s and peak memory",
                       description=bench.__doc__.split("\n\n")[0] + " Writes benchmarks/results/<name>.json.")
    bench.add_arguments(p)
    p.set_defaults(func=bench.cmd_bench)
    return parser


def _tool_options(p: argparse.ArgumentParser, tool: str, split: str | None, split_help: str = "") -> None:
    """The options every latent/OOD tool shares."""
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder, .pt checkpoint or pretrained folder")
    p.add_argument("--dataset", help="data set (default: the one the run was trained on)")
    p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    if split:
        p.add_argument("--split", choices=("train", "test"), default=split,
                       help=split_help or "split the images come from")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of images (and any noise)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    if tool != "ood":
        p.add_argument("--max-level", type=int, default=None,
                       help="bin shown as white (default: the images' own top bin)")
    p.add_argument("--out", help=f"output folder (default: RUN/{tool})")


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, DatasetError, TrainingError) as e:
        print(f"torchglow {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CLIError, ConfigError)) else 1


if __name__ == "__main__":
    sys.exit(main())
