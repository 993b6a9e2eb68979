"""The ``torchglow`` command: argparse subcommands that parse, then call the Python API.

Options of ``train`` are derived from the typed fields of :class:`GlowConfig` and
:class:`TrainConfig`. Precedence: field defaults < preset < config file (``--config``) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of option names to values")
    flat = {**data.pop("model", {}), **data.pop("train", {}), **data}
    return {k.replace("-", "_"): v for k, v in flat.items()}


def build_configs(values: dict[str, Any], preset_name: str | None):
    """Split option values between the model and training configs, over the preset's defaults."""
    from .train import TRAIN_PRESETS, TrainConfig

    model_fields = {f.name for f in dataclasses.fields(GlowConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_fields - train_fields - {"preset"})
    if unknown:
        raise CLIError(f"unknown option(s) {', '.join(unknown)}")
    name = values.get("preset", preset_name) or "digits"
    if name not in PRESETS:
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
    from .train import load_run_configs, train

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
    print(json.dumps(summary, indent=2))
    return 0 if summary["finished"] or summary["interrupted_by"] else 1


def _data_for(path: str, dataset: str | None, data_dir: str | None, split: str):
    from .checkpoint import load_model
    from .data import load_dataset

    model = load_model(path)
    run_config = _run_train_config(path)
    name = dataset or run_config.get("dataset")
    if not name:
        raise CLIError(f"{path} does not say which data set it was trained on: pass --dataset")
    c, h, _ = model.config.image_shape
    data = load_dataset(name, split, data_dir=data_dir or run_config.get("data_dir"), image_size=h, channels=c)
    return model, data


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

    model, data = _data_for(args.run, args.dataset, args.data_dir, args.split)
    model = model.to(_device(args.device))
    images, labels = _all_images(data)
    bpd = evaluate_bpd(model, images, labels if model.config.num_classes else None,
                       args.batch_size, args.draws, args.seed)
    result = {"checkpoint": args.run, "dataset": data.name, "images": int(images.shape[0]),
              "draws": args.draws, "seed": args.seed, "bits_per_dim": bpd, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _all_images(data):
    import torch

    if hasattr(data, "images"):
        return data.images, data.labels
    xs, ys = zip(*(data[i] for i in range(len(data))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


def cmd_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .latent import sample_grid

    model = load_model(args.run).to(_device(args.device))
    out = Path(args.out or (Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent) / "samples")
    summary = sample_grid(model, out, temperatures=args.temperatures, n_per_row=args.n, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import MEMORY_MODES, OPTIMIZERS, PRECISIONS, TrainConfig
    from .config import COUPLINGS, PERMUTATIONS

    parser = argparse.ArgumentParser(prog="torchglow", description="Glow normalizing flows: train, evaluate, sample.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a Glow (default: the digits preset on scikit-learn's digits, CPU)",
                       description="Train a Glow. Precedence: defaults < --preset < --config < flags.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and training defaults (digits)")
    p.add_argument("--config", help="YAML or JSON file of options (flat, or under model:/train:)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    add_dataclass_options(p, GlowConfig, {"coupling": COUPLINGS, "permutation": PERMUTATIONS})
    add_dataclass_options(p, TrainConfig, {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "memory": MEMORY_MODES})
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
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    p.add_argument("--n", type=int, default=8, help="samples per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: RUN/samples)")
    p.set_defaults(func=cmd_sample)
    return parser


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
