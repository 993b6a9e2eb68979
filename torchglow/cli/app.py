"""The ``torchglow`` command: argparse subcommands that parse, then call the Python API.

Options of ``train`` are derived from the typed fields of :class:`GlowConfig` and
:class:`TrainConfig`, their help from each class docstring's ``Attributes:`` section
(:func:`field_help`). Precedence: field defaults < preset < config file (``--config``) < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import json
import re
import signal
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from ..config import PRESETS, ConfigError, GlowConfig, TrainConfig
from ..threads import add_threads_option, set_threads

from .errors import EXIT_USAGE, CLIError, in_flags


# --------------------------------------------------------------------------- parser and messages
class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with the closest choice or option, when there
    is one, and a pointer to --help) instead of the usage followed by the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {self._suggest(message)} (see {self.prog} --help)\n")

    def _suggest(self, message: str) -> str:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            bad, choices = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(bad, choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{message[:choice.start()]}invalid choice {bad!r}{hint} (choose from {', '.join(choices)})"
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:  # reported by the top-level parser: look at the subcommands' options too
            parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for p in a.choices.values()]
            options = [s for p in parsers for a in p._actions for s in a.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], options, n=1)
            if close:
                return f"{message}; did you mean {close[0]}?"
        return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the default is None or False (nothing); a
    list default as it is typed (``0 0.5 1``), not as a Python list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or isinstance(action, argparse._VersionAction):
            return action.help or ""
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _plain(text: str) -> str:
    """Help text without reStructuredText markup: ``x``, `x` and :role:`x` become x."""
    return re.sub(r"(?::\w+:)?`{1,2}([^`]+)`{1,2}", r"\1", text)


# --------------------------------------------------------------------------- dataclass -> flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_help(cls) -> dict[str, str]:
    """Per-field help from the ``Attributes:`` section of a class docstring (Google style): an entry
    ``name: text`` per field, continued on lines indented deeper than the names. Only indentation
    relative to the section counts (the docstring is dedented first), and the section ends at the
    first line indented no deeper than its ``Attributes:`` header. Markup is removed."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    out: dict[str, str] = {}
    current, item_indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        if indent(line) <= indent(lines[start]):
            break
        item_indent = indent(line) if item_indent is None else item_indent
        head, sep, rest = line.strip().partition(":")
        if indent(line) == item_indent and sep and head.isidentifier():
            current = head
            out[current] = rest.strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return {name: _plain(text) for name, text in out.items()}


def _shown(value: Any, flag: str) -> str:
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_dataclass_options(parser: argparse.ArgumentParser, cls, choices: dict[str, tuple] | None = None,
                          defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> None:
    """One option per field of the dataclass ``cls``, its help from :func:`field_help` (or
    ``helps[name]``) followed by the default (``defaults[name]``, else the field's own). The parsed
    defaults are SUPPRESSed, so only flags given on the command line appear in the namespace."""
    hints = typing.get_type_hints(cls)
    helps = {**field_help(cls), **(helps or {})}
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        args = typing.get_args(tp)
        optional = type(None) in args and (typing.get_origin(tp) in (typing.Union, types.UnionType))
        base = next(a for a in args if a is not type(None)) if optional else tp
        shown = (defaults or {}).get(field.name, field.default)
        text = f"{helps.get(field.name, '')} (default: {_shown(shown, _flag(field.name))})".replace("%", "%%")
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=text)
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
        if optional and base is not str:
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


# A folder or .npz data set without --preset: the digits preset's small model, without what suits
# only the 1,497 digits (5-bit images, coupling dropout, weight decay, its lr and 60 epochs).
OWN_DATA_MODEL = dict(n_bits=8, dropout=0.0)
OWN_DATA_TRAIN = dict(epochs=100, lr=1e-3, weight_decay=0.0)
OWN_DATA_WARMUP_EPOCHS = 10  # the official warm-up: 10 epochs of the data set's training images


def build_configs(values: dict[str, Any], preset_name: str | None) -> tuple[GlowConfig, TrainConfig, str]:
    """Split option values between the model and training configs, over the defaults: the preset's,
    or for a folder or ``.npz`` data set without a preset, the digits model with
    :data:`OWN_DATA_MODEL` and :data:`OWN_DATA_TRAIN`, the image shape read from the data
    (:func:`torchglow.data.infer_image_shape`) unless given. Returns the configs and a line saying
    where they come from. CLIError for a data source that cannot work with them
    (:func:`check_data_source`)."""
    from ..config import TRAIN_PRESETS

    model_fields = {f.name for f in dataclasses.fields(GlowConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_fields - train_fields - {"preset"})
    if unknown:
        raise CLIError(f"unknown option(s) {', '.join(unknown)}")
    named = values.get("preset", preset_name)
    name = named or "digits"
    if not isinstance(name, str) or name not in PRESETS:
        raise CLIError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    model_values = {**PRESETS[name], **{k: v for k, v in values.items() if k in model_fields}}
    train_values = {**TRAIN_PRESETS.get(name, {}), **{k: v for k, v in values.items() if k in train_fields}}
    defaults = f"defaults: the {name} preset's"
    dataset = train_values.get("dataset")
    inferred = False
    if named is None and isinstance(dataset, str) and _own_data(dataset):
        model_values, train_values, defaults = _own_data_defaults(dataset, values, model_fields, train_fields)
        inferred = "image_shape" not in values
    if isinstance(model_values.get("image_shape"), list):
        model_values["image_shape"] = tuple(model_values["image_shape"])
    try:
        model_config, train_config = GlowConfig(**model_values), TrainConfig(**train_values)
    except TypeError as e:
        raise CLIError(str(e)) from None
    except ConfigError as e:
        if inferred and "image_shape" in str(e):
            raise CLIError(f"{e} (read from the images of {dataset}: pass --image-shape C S S, or other "
                           f"--n-levels)") from None
        raise
    check_data_source(train_config.dataset, train_config.data_dir, "dataset" in values, model_config, name)
    return model_config, train_config, defaults


def _own_data(dataset: str) -> bool:
    """Whether ``dataset`` is the user's own images: a folder or an ``.npz`` file."""
    from ..data import DatasetError, check_dataset_name, is_folder

    try:
        return dataset.endswith(".npz") or is_folder(check_dataset_name(dataset))
    except DatasetError:
        return False  # check_data_source reports it


def _own_data_defaults(dataset: str, values: dict[str, Any], model_fields: set[str], train_fields: set[str]
                       ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Model and training values for a folder or ``.npz`` file without a preset, and the words for
    them: the image shape from the data unless given, the warm-up 10 epochs of its training images."""
    from ..data import DatasetError, folder_layout, infer_image_shape, load_npz

    try:
        if dataset.endswith(".npz"):
            train_set = load_npz(dataset, "train")
            shape, n_train = tuple(train_set.image_shape), len(train_set)
        else:
            folder = dataset.removeprefix("folder:")
            n_train = folder_layout(folder).counts()["train"]
            shape = infer_image_shape(folder) if "image_shape" not in values else None
    except DatasetError as e:
        raise CLIError(f"--dataset: {e.cli_message}") from None
    model_values = {**PRESETS["digits"], **OWN_DATA_MODEL, **({"image_shape": shape} if shape else {}),
                    **{k: v for k, v in values.items() if k in model_fields}}
    train_values = {**OWN_DATA_TRAIN, "warmup_images": OWN_DATA_WARMUP_EPOCHS * n_train,
                    **{k: v for k, v in values.items() if k in train_fields}}
    how = ("image shape given" if "image_shape" in values
           else "image shape read from the images (--image-shape to change it)")
    digits = PRESETS["digits"]
    defaults = (f"{how}; defaults for your own images: the digits preset's model (L={digits['n_levels']}, "
                f"K={digits['n_steps']}, width {digits['hidden_channels']}) at {OWN_DATA_MODEL['n_bits']} bits, "
                f"no dropout or weight decay, lr {OWN_DATA_TRAIN['lr']:g}, warm-up {OWN_DATA_WARMUP_EPOCHS} epochs, "
                f"{OWN_DATA_TRAIN['epochs']} epochs (--preset NAME for a preset's, e.g. --preset digits for its "
                f"regularisers)")
    return model_values, train_values, defaults


def check_data_source(dataset: str, data_dir: str | None, dataset_given: bool, model_config: GlowConfig,
                      preset_name: str) -> None:
    """CLIError (one line, naming the options) for a data set that training cannot use as asked:
    an unknown name; ``--data-dir`` holding images without ``--dataset`` (the folder would be
    ignored); a data set whose images are larger than the model's (they are only zero-padded)."""
    from ..data import IMAGE_EXTENSIONS, IN_MEMORY_SHAPES, DatasetError, check_dataset_name, is_folder
    from ..config import TRAIN_PRESETS

    if not isinstance(dataset, str):
        return  # TrainConfig names the field
    try:
        check_dataset_name(dataset)
    except DatasetError as e:
        raise CLIError(f"--dataset: {e}") from None
    if data_dir and not dataset_given and not is_folder(dataset):
        folder = Path(data_dir).expanduser()
        holds_images = folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
        if holds_images or dataset == "digits":  # the digits come with scikit-learn: no files are read
            raise CLIError(f"--data-dir only says where the files of --dataset {dataset} are (it is not a data "
                           f"set): to train on the images of a folder, pass --dataset {data_dir}")
    if dataset in IN_MEMORY_SHAPES:
        _, h, w = IN_MEMORY_SHAPES[dataset]
        _, mh, mw = model_config.image_shape
        if h > mh or w > mw:
            fits = [p for p in sorted(PRESETS, key=lambda p: PRESETS[p]["image_shape"][1])
                    if PRESETS[p]["image_shape"][1] >= h and PRESETS[p]["image_shape"][0] == IN_MEMORY_SHAPES[dataset][0]]
            fits.sort(key=lambda p: TRAIN_PRESETS.get(p, {}).get("dataset") != dataset)
            hint = f"; use --preset {fits[0]} ({'x'.join(map(str, PRESETS[fits[0]]['image_shape'][1:]))})" if fits else ""
            raise CLIError(f"--dataset {dataset} has {h}x{w} images, larger than the {mh}x{mw} of the model "
                           f"(the {preset_name} preset's, or --image-shape){hint}")


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    """Train; print the human summary (rank 0). Exit 0 when finished, 130/143 when stopped by
    SIGINT/SIGTERM (the run is resumable), 1 otherwise."""
    import os

    import shlex

    from ..train import train
    from ..train.runs import read_run_config
    from ..train.text import summary_text

    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "config", "resume", "preset", "threads", "argv")}
    command = shlex.join(["torchglow", *args.argv])
    if args.resume:
        run_config = read_run_config(args.resume)
        model_config, train_config = run_config.model, run_config.train
        if args.preset or args.config or any(k in {f.name for f in dataclasses.fields(GlowConfig)} for k in given):
            raise CLIError("--resume continues a run with its own config: drop --preset, --config and model options")
        train_config = dataclasses.replace(train_config, out=args.resume, **given)
        summary = train(model_config, train_config, resume=True, defaults="resumed with the run's own config",
                        say=lambda line: print(in_flags(line), file=sys.stderr)).summary
    else:
        values = read_config_file(args.config) if args.config else {}
        values.update(given)
        model_config, train_config, defaults = build_configs(values, args.preset)
        summary = train(model_config, train_config, defaults=defaults, command=command,
                        say=lambda line: print(in_flags(line), file=sys.stderr)).summary
    text = summary_text(summary)
    if os.environ.get("RANK", "0") == "0" and text:
        print(text)
    if summary["interrupted_by"]:
        return 128 + int(signal.Signals[summary["interrupted_by"]])
    return 0 if summary["finished"] else 1


# --------------------------------------------------------------------------- evaluate, sample and the tools
def _user_errors(cmd):
    """The library's ValueErrors are the user's (option values that do not fit): one line, exit 2,
    in the command line's words where the error has them (``cli_message``)."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except ValueError as e:
            raise CLIError(getattr(e, "cli_message", str(e))) from None

    return run


def _open(args: argparse.Namespace):
    from ..devices import resolve_device
    from ..train.runs import open_run

    return open_run(args.run, resolve_device(args.device))


def _out(args: argparse.Namespace, run, tool: str) -> Path:
    return Path(args.out) if args.out else run.tool_dir(tool)


def _source(args: argparse.Namespace, picked) -> dict[str, Any]:
    """Where a tool's images came from, for its summary."""
    return {"checkpoint": args.run, "dataset": picked.data.name, "seed": args.seed}


def _fast_note(args: argparse.Namespace, run) -> None:
    """One line on stderr when ``--fast`` runs on the CPU, where there is no CUDA graph to replay."""
    if args.fast and run.model.device.type == "cpu":
        print(f"torchglow {args.command}: note: --fast replays CUDA graphs on a GPU; on a CPU it runs the eager "
              f"kernels, so it pays off only on a GPU", file=sys.stderr)


def _print(summary: dict[str, Any]) -> int:
    print(json.dumps(summary, indent=2))
    return 0


@_user_errors
def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..tools.evaluate import evaluate_bpd, few_images_caveat
    from ..files import write_json_atomic

    run = _open(args)
    _fast_note(args, run)
    picked = run.pick(args.split, 0, args.seed, args.dataset, args.data_dir)
    bpd = evaluate_bpd(run.model, picked.images, picked.y, args.batch_size, args.draws, args.seed, args.fast)
    result = {"checkpoint": args.run, "dataset": picked.data.name, "images": int(picked.images.shape[0]),
              "draws": args.draws, "seed": args.seed, "fast": args.fast, "bits_per_dim": bpd, "torch": torch.__version__}
    caveat = few_images_caveat(result["images"], picked.data.name)
    if caveat:
        warnings.warn(caveat)
        result["caveat"] = caveat
    if args.out:
        write_json_atomic(args.out, result)
    return _print(result)


@_user_errors
def cmd_sample(args: argparse.Namespace) -> int:
    from ..tools.sampling import sample_grid

    run = _open(args)
    _fast_note(args, run)
    max_level = run.display_max_level() if args.max_level is None else args.max_level
    return _print(sample_grid(run.model, _out(args, run, "samples"), temperatures=args.temperatures, n_per_row=args.n,
                              seed=args.seed, max_level=max_level, name=args.name, fast=args.fast))


@_user_errors
def cmd_reconstruct(args: argparse.Namespace) -> int:
    from ..tools.latent import reconstruct

    run = _open(args)
    picked = run.pick(args.split, args.n, args.seed, args.dataset, args.data_dir)
    return _print(reconstruct(run.model, picked.images, _out(args, run, "reconstruct"), y=picked.y, nrow=args.nrow,
                              batch_size=args.batch_size, max_level=args.max_level,
                              info={**_source(args, picked), "indices": picked.index.tolist()}))


@_user_errors
def cmd_interpolate(args: argparse.Namespace) -> int:
    from ..tools.latent import interpolate

    run = _open(args)
    picked = run.pick(args.split, 2 * args.pairs, args.seed, args.dataset, args.data_dir, exactly=True)
    p, y = args.pairs, picked.y
    info = {**_source(args, picked), "indices_a": picked.index[:p].tolist(), "indices_b": picked.index[p:].tolist()}
    return _print(interpolate(run.model, picked.images[:p], picked.images[p:], _out(args, run, "interpolate"),
                              steps=args.steps, method=args.method, y=None if y is None else y[:p],
                              batch_size=args.batch_size, max_level=args.max_level, info=info))


@_user_errors
def cmd_manipulate(args: argparse.Namespace) -> int:
    from ..data.labels import labels_for, select_attributes
    from ..tools.directions import attribute_directions, load_directions, save_directions
    from ..tools.latent import manipulate_all

    run = _open(args)
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
    return _print(manipulate_all(run.model, picked.images, directions, _out(args, run, "manipulate"), args.alphas,
                                 picked.y, args.batch_size, args.max_level,
                                 info={**_source(args, picked), "indices": picked.index.tolist(), **info}))


@_user_errors
def cmd_ood(args: argparse.Namespace) -> int:
    from ..tools.images import data_max_level
    from ..tools.ood import TRANSFORMS, ood_report, ood_sets

    default = [] if args.ood_dataset or args.ood_folder else list(TRANSFORMS)
    transforms = default if args.ood is None else args.ood
    if not transforms and not args.ood_dataset and not args.ood_folder:
        raise CLIError("no OOD set: pass --ood, --ood-dataset or --ood-folder")
    run = _open(args)
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
    summary = ood_report(run.model, picked.images, sets, _out(args, run, "ood"), batch_size=args.batch_size,
                         seed=args.seed, typicality_m=args.typicality_m, in_reference=reference,
                         in_name=picked.data.name, verbose=not args.json, info=info)
    if args.json:
        return _print(summary)
    print(f"wrote {', '.join(summary['files'])}")
    return 0


# --------------------------------------------------------------------------- the parser
def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _dataset_name(text: str) -> str:
    """An argparse type: a name :func:`torchglow.data.load_dataset` can read."""
    from ..data import DatasetError, check_dataset_name

    try:
        return check_dataset_name(text)
    except DatasetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dataset_help() -> str:
    from ..data import DATASETS

    return f"data set: {', '.join(DATASETS)}, or a folder of images"


RUN_HELP = "run folder, .pt checkpoint or pretrained folder"
TOOL_SPLITS = ("train", "test", "val", "all")
DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N"
SEED_HELP = {"evaluate": "seeds the dequantisation noise", "samples": "seeds the draws of the latents"}


def _common_options(p: argparse.ArgumentParser, tool: str, split: str | None, split_help: str = "") -> None:
    """The options evaluate, sample and every latent/OOD tool share; ``tool`` names the output folder
    (``samples`` for sample)."""
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    if tool != "samples":
        p.add_argument("--dataset", type=_dataset_name,
                       help=f"{_dataset_help()} (default: the one the run was trained on)")
        p.add_argument("--data-dir", help="where the data set's files are (default: the run's)")
    if split:
        p.add_argument("--split", choices=TOOL_SPLITS, default=split,
                       help=split_help or "split the images come from (all: every image; val: a folder's val/)")
    p.add_argument("--seed", type=int, default=0,
                   help=SEED_HELP.get(tool, "seeds the choice of images and any random draw"))
    if tool != "samples":
        p.add_argument("--batch-size", type=_count(1), default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if tool == "samples":
        p.add_argument("--max-level", type=_count(0), default=None,
                       help="bin shown as white (default: the top bin of the run's training images when they are "
                            "held in memory, as in the trainer's grids, e.g. 16 for the digits; else 2**n_bits-1)")
    elif tool not in ("evaluate", "ood"):
        p.add_argument("--max-level", type=_count(0), default=None,
                       help="bin shown as white (default: the top bin the images use)")
    if tool != "evaluate":
        p.add_argument("--out", help=f"output folder (default: RUN/{tool})")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..config import (COMPILE_MODES, COUPLINGS, MEMORY_MODES, OPTIMIZERS, PERMUTATIONS, PRECISIONS, TRAIN_PRESETS,
                         TrainConfig)
    from ..tools.sampling import DEFAULT_TEMPERATURES

    parser = Parser(prog="torchglow", formatter_class=HelpFormatter,
                    description="Glow normalizing flows: train, evaluate, sample, and the latent-space and OOD tools.")
    parser.add_argument("--version", action="version", version=f"torchglow {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        """The subcommand ``name``, which calls ``func(args)``."""
        p = sub.add_parser(name, help=help_text, description=description or help_text[0].upper() + help_text[1:] + ".",
                           formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("train", cmd_train, "train a Glow (default: the digits preset on scikit-learn's digits, CPU)",
                "Train a Glow. Precedence: defaults < --preset < --config < flags. The defaults shown are the "
                "digits preset's; --preset NAME brings its own. A folder of images or an .npz file without --preset: "
                "the digits model at 8 bits without its dropout and weight decay, lr 1e-3, 100 epochs, the image "
                "shape read from the images; the run's first line says what applies.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and training defaults (digits)")
    p.add_argument("--config", help="YAML or JSON file of options (flat, or under model:/train:)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    add_dataclass_options(p, GlowConfig, {"coupling": COUPLINGS, "permutation": PERMUTATIONS}, PRESETS["digits"])
    add_dataclass_options(p, TrainConfig, {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "memory": MEMORY_MODES,
                                           "compile_mode": COMPILE_MODES},
                          TRAIN_PRESETS["digits"], helps={"dataset": _dataset_help()})

    p = command("evaluate", cmd_evaluate, "test-set bits/dim of a trained model")
    _common_options(p, "evaluate", "test")
    p.add_argument("--draws", type=_count(1), default=1, help="dequantisation noise draws averaged per image")
    p.add_argument("--out", help="also write the result to this JSON file")
    p.add_argument("--fast", action="store_true",
                   help="compiled forward at a fixed batch (a CUDA graph on CUDA); same bits/dim up to float rounding")

    p = command("sample", cmd_sample, "image grids at one or more temperatures",
                "Sample image grids, one row per temperature (one grid per temperature for a class-conditional "
                "model), into RUN/samples/NAME.png and NAME.json; the default NAME says the temperatures, the "
                "number per row and the seed, so other options never overwrite earlier grids.")
    _common_options(p, "samples", None)
    p.add_argument("--temperatures", type=float, nargs="+", default=list(DEFAULT_TEMPERATURES),
                   help="one row (or grid, class-conditional) per temperature")
    p.add_argument("--n", type=_count(1), default=8, help="samples per row")
    p.add_argument("--name", help="file name stem (default: samples_T<temperatures>_n<n>_seed<seed>)")
    p.add_argument("--fast", action="store_true",
                   help="compiled decode (a CUDA graph on CUDA); same images up to float rounding")

    p = command("reconstruct", cmd_reconstruct, "test images next to decode(encode(x)), with the largest error",
                "Encode n seeded test images at their bin centres and decode them back; writes "
                "reconstruction.png/.json and prints the summary (max_abs_error).")
    _common_options(p, "reconstruct", "test")
    p.add_argument("--n", type=_count(1), default=16, help="images to reconstruct (seeded choice)")
    p.add_argument("--nrow", type=_count(1), default=8, help="images per row of the grid")

    p = command("interpolate", cmd_interpolate, "interpolations between pairs of images through their latents",
                "Interpolate the standardised latents of seeded pairs of images (linear and/or spherical); one "
                "PNG per method, interpolation.json.")
    _common_options(p, "interpolate", "test")
    p.add_argument("--pairs", type=_count(1), default=4, help="pairs of images, one row each")
    p.add_argument("--steps", type=int, default=8, help="images per row, both ends included")
    p.add_argument("--method", nargs="+", choices=("linear", "slerp"), default=["linear", "slerp"],
                   help="interpolation(s) of every level's latent")

    p = command("manipulate", cmd_manipulate, "edit images along attribute directions in latent space",
                "Attribute directions as in the official demo: 1.6 * (mean latent of the images with the "
                "attribute - mean latent of those without), from the data set's attributes (CelebA, --attribute), "
                "a class (--class-attribute), a CSV (--labels-csv) or a saved file (--directions); then n seeded "
                "images are decoded at latent + alpha * direction, one PNG per attribute.")
    _common_options(p, "manipulate", "test", split_help="split of the images to edit")
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
    p.add_argument("--max-images", type=_count(0), default=0,
                   help="use at most this many (seeded) images for the directions; 0 for all")
    p.add_argument("--alphas", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="latent + alpha * direction, one column per alpha")
    p.add_argument("--n", type=_count(1), default=4, help="images to edit (seeded choice), one row each")

    from ..tools.ood import TRANSFORMS
    p = command("ood", cmd_ood, "out-of-distribution detection: AUROC/AUPR/FPR@95 of likelihood-based scores",
                "Score in-distribution test images against OOD sets with bits/dim, the typicality test and the "
                "input-complexity score; prints the table, writes ood.json and bpd_hist.png/complexity_hist.png. "
                "Default OOD sets: flipped, inverted and uniform noise (when no --ood-dataset/--ood-folder is given).")
    _common_options(p, "ood", None)
    p.add_argument("--in-split", choices=TOOL_SPLITS, default="test",
                   help="in-distribution split (all: every image, e.g. of a folder of test images)")
    p.add_argument("--ood", nargs="*", choices=TRANSFORMS, default=None,
                   help="built-in OOD sets from the in-distribution images: upside down, intensities inverted, "
                        "uniform noise over the data's range of bins (default: all three)")
    p.add_argument("--ood-dataset", nargs="+", metavar="NAME", type=_dataset_name,
                   help="other data sets (e.g. svhn for a cifar10 model), converted to the model's channels and "
                        "size (in-memory sets are only zero-padded, e.g. mnist 28->32; celeba is resized)")
    p.add_argument("--ood-split", choices=TOOL_SPLITS, default="test", help="split of the --ood-dataset sets")
    p.add_argument("--ood-data-dir", help="where the --ood-dataset files are (default: their usual place)")
    p.add_argument("--download", action="store_true", help="download --ood-dataset sets whose files are missing")
    p.add_argument("--ood-folder", nargs="+", metavar="DIR", help="folders of images, all used as OOD sets")
    p.add_argument("--typicality-m", type=_count(1), nargs="+", default=[2, 10], metavar="M",
                   help="batch sizes of the typicality test")
    p.add_argument("--reference-split", choices=("train",), default=None,
                   help="in-distribution images for the typicality reference (default: half of the in-split)")
    p.add_argument("--max-images", type=_count(0), default=0, help="at most this many (seeded) images per set; 0 for all")
    p.add_argument("--json", action="store_true", help="print the full JSON summary instead of the table")

    from ..tools import convert
    from .demo import session as demo
    p = command("convert", convert.cmd_convert,
                "import a checkpoint of another Glow implementation (y0ast/Glow-PyTorch)",
                convert.__doc__.split("\n\n")[0])
    convert.add_arguments(p)

    p = command("demo", demo.cmd_demo, "the interactive demo page (samples, your image, edit, mix) for a run",
                demo.__doc__.split("\n\n")[0])
    demo.add_arguments(p)

    for p in sub.choices.values():
        add_threads_option(p)

    from ..train import bench  # after the loop: bench has its own --threads
    p = command("bench", bench.cmd_bench, "training, sampling and evaluation images/s and peak memory",
                bench.__doc__.split("\n\n")[0] + " Prints a summary; --out DIR also writes the full JSON.")
    bench.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..train.checkpoint import CheckpointError
    from ..data import DatasetError
    from ..train import TrainingError
    from ..tools.convert import ConversionError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for the run's config.json and model card
    if args.command != "bench":  # bench sets its own threads (and records them)
        set_threads(args.threads)
    prefix = f"torchglow {args.command}"
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prefix}: warning: {message}\n"  # one line, no source line
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, ConversionError, DatasetError, TrainingError) as e:
        print(f"{prefix}: error: {in_flags(str(getattr(e, 'cli_message', e)))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (CLIError, ConfigError)) else 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
