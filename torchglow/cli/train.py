"""``torchglow train``: the options derived from :class:`GlowConfig` and :class:`TrainConfig`, the
config file, and the configs built from them. Precedence: field defaults < preset < config file
(``--config``) < flags."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import (COMPILE_MODES, COUPLINGS, MEMORY_MODES, OPTIMIZERS, PERMUTATIONS, PRECISIONS, PRESETS,
                      TRAIN_PRESETS, ConfigError, GlowConfig, TrainConfig)
from .errors import CLIError, in_flags
from .options import add_dataclass_options, dataset_help


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
        raise CLIError(f"--dataset: {e}") from None
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
    from ..data import IMAGE_EXTENSIONS, IN_MEMORY_SHAPES, DatasetError, check_dataset_name, is_folder, user_path

    if not isinstance(dataset, str):
        return  # TrainConfig names the field
    try:
        check_dataset_name(dataset)
    except DatasetError as e:
        raise CLIError(f"--dataset: {e}") from None
    if data_dir and not dataset_given and not is_folder(dataset):
        folder = user_path(data_dir)
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


def cmd_train(args: argparse.Namespace) -> int:
    """Train a Glow. Precedence: defaults < --preset < --config < flags. The defaults shown are the
    digits preset's; --preset NAME brings its own. A folder of images or an .npz file without
    --preset: the digits model at 8 bits without its dropout and weight decay, lr 1e-3, 100 epochs,
    the image shape read from the images; the run's first line says what applies.

    Prints the human summary (rank 0); exits 0 when finished, 130/143 when stopped by SIGINT/SIGTERM
    (the run is resumable), 1 otherwise."""
    import os
    import shlex

    from ..train import train
    from ..train.text import summary_text

    given = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "config", "resume", "preset", "threads", "argv")}
    command = shlex.join(["torchglow", *args.argv])
    if args.resume:
        run_config = _resumed_run_config(args.resume)
        model_config, train_config = run_config.model, run_config.train
        if args.preset or args.config or any(k in {f.name for f in dataclasses.fields(GlowConfig)} for k in given):
            raise CLIError("--resume continues a run with its own config: drop --preset, --config and model options")
        train_config = dataclasses.replace(train_config, out=args.resume, **given)
        summary = train(model_config, train_config, resume=True, defaults="resumed with the run's own config",
                        say=_say).summary
    else:
        values = read_config_file(args.config) if args.config else {}
        values.update(given)
        model_config, train_config, defaults = build_configs(values, args.preset)
        summary = train(model_config, train_config, defaults=defaults, command=command, say=_say).summary
    text = summary_text(summary)
    if os.environ.get("RANK", "0") == "0" and text:
        print(text)
    if summary["interrupted_by"]:
        return 128 + int(signal.Signals[summary["interrupted_by"]])
    return 0 if summary["finished"] else 1


def _resumed_run_config(run: str):
    """The configs of the run ``--resume`` names; a folder that has none says it cannot be resumed."""
    from ..train.checkpoint import CheckpointError
    from ..train.runs import read_run_config

    try:
        return read_run_config(run)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None


def _say(line: str) -> None:
    """The trainer's progress lines, in the command line's words."""
    print(in_flags(line), file=sys.stderr)


def add_commands(command) -> None:
    """Add ``train`` through ``command(name, func, help, description)``, which returns its parser."""
    p = command("train", cmd_train, "train a Glow (default: the digits preset on scikit-learn's digits, CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and training defaults (digits)")
    p.add_argument("--config", help="YAML or JSON file of options (flat, or under model:/train:)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    add_dataclass_options(p, GlowConfig, {"coupling": COUPLINGS, "permutation": PERMUTATIONS}, PRESETS["digits"])
    add_dataclass_options(p, TrainConfig, {"optimizer": OPTIMIZERS, "precision": PRECISIONS, "memory": MEMORY_MODES,
                                           "compile_mode": COMPILE_MODES},
                          TRAIN_PRESETS["digits"], helps={"dataset": dataset_help()})
