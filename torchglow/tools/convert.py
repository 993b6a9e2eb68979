"""Import Glow checkpoints of y0ast/Glow-PyTorch into torchglow pretrained folders.

y0ast's ``Glow(image_shape=(H, W, C), ...)`` saves ``model.state_dict()`` (``glow_model_N.pt``) with
its training options in ``hparams.json``. Its layout and numerics (``model.py``/``modules.py`` of
github.com/y0ast/Glow-PyTorch), and where each tensor goes:

- ``flow.layers``: per level a squeeze (no tensors), K flow steps, then a ``Split2d`` except after the
  last level; step k of level i is layer ``i·(K+2) + 1 + k``, the split after level i layer ``i·(K+2) + K + 1``.
  Squeeze, coupling halves ("split": first C/2 channels), the split's halves and its prior's
  ``mean = h[:, 0::2]``, ``logs = h[:, 1::2]`` ("cross"), and the affine coupling's
  ``shift = h[:, 0::2]``, ``scale = sigmoid(h[:, 1::2] + 2)``, ``(x_b + shift)·scale`` are ours exactly.
- ``ActNorm2d``: ``(x + bias)·exp(logs)`` with ``logs`` stored raw; we store ``logs / 3``. Its
  ``inited`` flag is a plain attribute, never saved: the converted layers are marked initialised.
- ``InvertibleConv1x1``: ``weight``, or LU ``p, sign_s, lower, upper, log_s`` with
  ``W = p·(lower·mask + I)·(upper·maskᵀ + diag(sign_s·exp(log_s)))``, our parametrisation
  (``p`` is our ``perm``; the masks and identity are rebuilt, y0ast does not save them).
- Coupling ``block``: ``Conv2d``+``ActNorm2d`` 3x3, ReLU, 1x1, ReLU, ``Conv2dZeros`` 3x3, whose
  ``(conv(x) + b)·exp(3·logs)`` keeps ``logs`` as (C, 1, 1); ours is (1, C, 1, 1).
- ``prior_h``: the zero input of the top prior, shape (1, 2C, H/2^L, W/2^L), so it gives the image
  size; ``learn_top_fn`` is our ``top.learned``.
- ``LinearZeros`` (``project_ycond``, ``project_class``): ``(x·Wᵀ + b)·exp(3·logs)``, our
  ``class_layers="linear_zeros"`` exactly (W, b and logs copied as they are).
- Convolutions: y0ast pads its 3x3 convolutions with zeros only (no official edge channel), so the
  converted config has ``padding="zero"``.
- ``Permute2d``: "reverse" is ours; "shuffle" draws its order from the random generator when the
  model is built and never saves it, so a shuffle model cannot be converted exactly and is refused.
- Data: ``x/256 - 0.5`` plus ``U(0, 1/256)`` and ``-D·log 256`` in the objective: ``n_bits = 8``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError, GlowConfig
from ..files import default_folder_mode, make_readable
from ..actnorm import LOGSCALE_FACTOR
from ..networks import ConvActNorm, ZeroConv2d
from ..model import Glow

# hparams.json keys that define the architecture (all required), and the training options the
# versions of y0ast's train.py also write (ignored here).
MODEL_HPARAMS = ("K", "L", "hidden_channels", "flow_permutation", "flow_coupling", "LU_decomposed",
                 "learn_top", "y_condition")
TRAINING_HPARAMS = ("actnorm_scale", "augment", "batch_size", "cuda", "dataroot", "dataset", "download",
                    "epochs", "eval_batch_size", "lr", "max_grad_clip", "max_grad_norm", "n_init_batches",
                    "n_workers", "output_dir", "saved_model", "saved_optimizer", "seed", "warmup",
                    "warmup_steps", "y_weight")
DATASET_SHAPES = {"cifar10": (3, 32, 32), "svhn": (3, 32, 32)}  # y0ast's data sets, (C, H, W)

_STEP = re.compile(r"flow\.layers\.(\d+)\.actnorm\.bias")
_SPLIT = re.compile(r"flow\.layers\.(\d+)\.conv\.conv\.weight")

# our key, the y0ast keys it is made from, and how
Rule = tuple[str, tuple[str, ...], Callable[..., torch.Tensor]]


class ConversionError(RuntimeError):
    """A checkpoint or hparams file that cannot be converted; the message names the file and key."""


# --------------------------------------------------------------------------- reading
def load_y0ast_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a y0ast checkpoint file (a ``nn.DataParallel`` "module." prefix removed)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects other than tensors
        # torch's message is paragraphs about weights_only; its kind says enough
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (torch.load failed with "
                              f"{type(e).__name__}): expected the .pt file of a y0ast Glow-PyTorch run") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConversionError(f"{path} is not a y0ast Glow state dict (expected a mapping of names to tensors, "
                              f"as saved by model.state_dict())")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_hparams(path: str | Path) -> dict[str, Any]:
    """y0ast's ``hparams.json``: every architecture key present, no key it never writes."""
    path = Path(path)
    try:
        hparams = json.loads(path.read_text())
    except OSError as e:
        raise ConversionError(f"cannot read hparams file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"hparams file {path} is not JSON ({e})") from None
    if not isinstance(hparams, dict):
        raise ConversionError(f"hparams file {path} must hold a JSON object")
    unknown = sorted(set(hparams) - set(MODEL_HPARAMS) - set(TRAINING_HPARAMS))
    if unknown:
        raise ConversionError(f"hparams file {path}: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in MODEL_HPARAMS if k not in hparams]
    if missing:
        raise ConversionError(f"hparams file {path}: missing key(s) {', '.join(missing)}")
    return hparams


# --------------------------------------------------------------------------- the config
def _tensor(state: dict[str, torch.Tensor], key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"{source}: missing key {key!r}")
    if state[key].dim() != ndim:
        raise ConversionError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def _check_hparams(hparams: dict[str, Any], found: dict[str, Any], image_shape: tuple[int, int, int],
                   source: str) -> None:
    """Every architecture value of ``hparams`` equals what the tensors say (``found``)."""
    for key, value in found.items():
        if hparams[key] != value or type(hparams[key]) is not type(value):
            raise ConversionError(f"{source}: {key} is {hparams[key]!r} but the checkpoint's tensors say {value!r}")
    if "dataset" in hparams:
        shape = DATASET_SHAPES.get(hparams["dataset"])
        if shape is None:
            raise ConversionError(f"{source}: dataset {hparams['dataset']!r} is not one of y0ast's "
                                  f"({', '.join(DATASET_SHAPES)})")
        if shape != image_shape:
            raise ConversionError(f"{source}: dataset {hparams['dataset']!r} has images {shape} but the "
                                  f"checkpoint's key 'prior_h' says {image_shape}")


def infer_config(state: dict[str, torch.Tensor], hparams: dict[str, Any] | None = None,
                 source: str = "checkpoint", hparams_source: str = "hparams") -> GlowConfig:
    """The torchglow config of a y0ast state dict, from its tensors' names and shapes, checked
    against ``hparams`` when given."""
    if hparams is not None and hparams["flow_permutation"] == "shuffle":
        raise ConversionError(
            f"{hparams_source}: flow_permutation 'shuffle' cannot be converted: y0ast draws each step's channel "
            "shuffle from the random generator when the model is built and does not save it in the state dict")
    n_steps_total = sum(1 for k in state if _STEP.fullmatch(k))
    n_levels = sum(1 for k in state if _SPLIT.fullmatch(k)) + 1
    if not n_steps_total:
        raise ConversionError(f"{source} is not a y0ast Glow state dict: missing key 'flow.layers.1.actnorm.bias'")
    if n_steps_total % n_levels:
        raise ConversionError(f"{source}: {n_steps_total} flow steps do not divide into {n_levels} levels "
                              f"(one more than its {n_levels - 1} splits)")
    n_steps = n_steps_total // n_levels

    first = "flow.layers.1"
    c0 = _tensor(state, f"{first}.actnorm.bias", 4, source).shape[1]  # 4x the image's channels
    if c0 % 4:
        raise ConversionError(f"{source}: key '{first}.actnorm.bias' has {c0} channels, not 4x the image's channels")
    hidden_channels = _tensor(state, f"{first}.block.0.conv.weight", 4, source).shape[0]
    out_channels = _tensor(state, f"{first}.block.4.conv.weight", 4, source).shape[0]
    coupling = "affine" if out_channels == c0 else "additive"
    if f"{first}.invconv.lower" in state or f"{first}.invconv.weight" in state:
        permutation, lu = "invconv", f"{first}.invconv.lower" in state
    elif hparams is None:
        raise ConversionError(
            f"{source} has no 1x1-convolution weights, so its permutation is 'reverse' or 'shuffle', which its state "
            "dict cannot tell apart: pass its hparams.json (`hparams_path`)")
    else:
        permutation, lu = "reverse", False
    prior_h = _tensor(state, "prior_h", 4, source)
    if prior_h.any():
        raise ConversionError(f"{source}: key 'prior_h' is not all zeros (y0ast never changes it)")
    image_shape = (c0 // 4, prior_h.shape[2] * 2**n_levels, prior_h.shape[3] * 2**n_levels)
    num_classes = None
    if "project_ycond.linear.weight" in state:
        num_classes = _tensor(state, "project_ycond.linear.weight", 2, source).shape[1]
    learn_top = any(k.startswith("learn_top_fn.") for k in state)

    if hparams is not None:
        found = dict(K=n_steps, L=n_levels, hidden_channels=hidden_channels, flow_permutation=permutation,
                     flow_coupling=coupling, learn_top=learn_top, y_condition=num_classes is not None)
        if permutation == "invconv":  # y0ast ignores LU_decomposed for the fixed permutations
            found["LU_decomposed"] = lu
        _check_hparams(hparams, found, image_shape, hparams_source)
    try:
        return GlowConfig(image_shape=image_shape, n_levels=n_levels, n_steps=n_steps,
                          hidden_channels=hidden_channels, coupling=coupling, permutation=permutation, lu=lu,
                          learn_top=learn_top, n_bits=8, num_classes=num_classes,
                          weight_y=(hparams or {}).get("y_weight", GlowConfig.weight_y),
                          padding="zero", class_layers="linear_zeros")
    except ConfigError as e:
        raise ConversionError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- the tensors
def _rules(model: Glow) -> tuple[list[Rule], dict[str, tuple[int, ...]]]:
    """How each of our tensors is made from y0ast's, and the shape every y0ast key must have."""
    ours = model.state_dict()
    rules: list[Rule] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def same(dst: str, src: str) -> None:
        shapes[src] = tuple(ours[dst].shape)
        rules.append((dst, (src,), lambda t: t))

    def actnorm(dst: str, src: str) -> None:
        same(f"{dst}.bias", f"{src}.bias")
        shapes[f"{src}.logs"] = tuple(ours[f"{dst}.logs"].shape)
        rules.append((f"{dst}.logs", (f"{src}.logs",), lambda t: t / LOGSCALE_FACTOR))

    def zero_conv(dst: str, src: str) -> None:
        same(f"{dst}.conv.weight", f"{src}.conv.weight")
        same(f"{dst}.conv.bias", f"{src}.conv.bias")
        shapes[f"{src}.logs"] = (ours[f"{dst}.logs"].shape[1], 1, 1)
        rules.append((f"{dst}.logs", (f"{src}.logs",), lambda t: t.reshape(1, -1, 1, 1)))

    def linear_zeros(dst: str, src: str) -> None:
        same(f"{dst}.weight", f"{src}.linear.weight")
        same(f"{dst}.bias", f"{src}.linear.bias")
        same(f"{dst}.logs", f"{src}.logs")

    config = model.config
    stride = config.n_steps + 2  # squeeze, K steps, split
    for i, level in enumerate(model.levels):
        for k, step in enumerate(level):
            src, dst = f"flow.layers.{i * stride + 1 + k}", f"levels.{i}.{k}"
            actnorm(f"{dst}.actnorm", f"{src}.actnorm")
            if config.permutation == "invconv" and config.lu:
                for a, b in (("perm", "p"), ("sign_s", "sign_s"), ("lower", "lower"), ("upper", "upper"),
                             ("log_s", "log_s")):
                    same(f"{dst}.permute.{a}", f"{src}.invconv.{b}")
            elif config.permutation == "invconv":
                same(f"{dst}.permute.weight", f"{src}.invconv.weight")
            # y0ast's block is Sequential(conv, relu, conv, relu, zero conv); ours may hold more layers
            convs = [j for j, m in enumerate(step.coupling.nn) if isinstance(m, (ConvActNorm, ZeroConv2d))]
            for j, (ours_j, theirs_j) in enumerate(zip(convs, (0, 2, 4))):
                net, block = f"{dst}.coupling.nn.{ours_j}", f"{src}.block.{theirs_j}"
                if j < 2:
                    same(f"{net}.conv.weight", f"{block}.conv.weight")
                    actnorm(f"{net}.actnorm", f"{block}.actnorm")
                else:
                    zero_conv(net, block)
        if i < len(model.splits):
            zero_conv(f"splits.{i}.conv", f"flow.layers.{i * stride + config.n_steps + 1}.conv")
    if config.learn_top:
        zero_conv("top.learned", "learn_top_fn")
    if config.num_classes:
        linear_zeros("top.y_emb", "project_ycond")
        linear_zeros("classifier", "project_class")
    c, h, w = model.latent_shapes[-1]
    shapes["prior_h"] = (1, 2 * c, h, w)
    return rules, shapes


def y0ast_to_glow(state: dict[str, torch.Tensor], hparams: dict[str, Any] | None = None,
                  source: str = "checkpoint", hparams_source: str = "hparams") -> Glow:
    """A torchglow :class:`Glow` (eval mode, ActNorm initialised) computing exactly what y0ast's
    ``Glow`` computes with the weights ``state``, in their dtype (float64 weights give a float64 model)."""
    config = infer_config(state, hparams, source, hparams_source)
    model = Glow(config)
    rules, shapes = _rules(model)
    unknown = sorted(set(state) - set(shapes))
    if unknown:
        raise ConversionError(f"{source}: unknown key {unknown[0]!r} for a y0ast Glow with K={config.n_steps}, "
                              f"L={config.n_levels}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ConversionError(f"{source}: missing key {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
    dtype = state["prior_h"].dtype if state["prior_h"].is_floating_point() else torch.float32
    model.to(dtype)
    ours = model.state_dict()
    with torch.no_grad():
        for dst, srcs, fn in rules:
            ours[dst] = fn(*(state[s].to(torch.float64) for s in srcs)).to(dtype)
    for key in ours:
        if key.endswith("actnorm.initialized"):
            ours[key] = torch.tensor(True)
    model.load_state_dict(ours)
    return model.eval()


# --------------------------------------------------------------------------- files
def convert_y0ast(checkpoint_path: str | Path, out_dir: str | Path, hparams_path: str | Path | None = None,
                  command: str | None = None) -> Path:
    """Convert a y0ast checkpoint (+ its ``hparams.json``) into the pretrained folder ``out_dir``
    (``config.json``, ``model.safetensors``, ``README.md``), written all at once: on any error
    nothing is left behind. ``out_dir`` must not exist or be empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output folder {out} already exists and is not empty")
    hparams = read_hparams(hparams_path) if hparams_path is not None else None
    model = y0ast_to_glow(load_y0ast_state(checkpoint_path), hparams, str(checkpoint_path), str(hparams_path))
    dataset = (hparams or {}).get("dataset")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        model.float().save_pretrained(tmp, model_card_kwargs=dict(dataset=dataset, command=command))
        make_readable(tmp)  # the modes of files and a folder made the usual way, not mkdtemp's 0700
        os.chmod(tmp, default_folder_mode())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise ConversionError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
