"""Model configuration: a frozen, validated dataclass and the named presets of the official runs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv", "shuffle", "reverse")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


@dataclass(frozen=True)
class GlowConfig:
    """Architecture of a Glow model.

    Attributes:
        image_shape: (C, H, W) of the input images.
        n_levels: L, the number of multi-scale levels (a split between two levels).
        n_steps: K, flow steps (ActNorm -> permutation -> coupling) per level.
        hidden_channels: width of the coupling networks.
        coupling: "affine" (scale and shift) or "additive" (shift only, volume preserving).
        permutation: "invconv" (learned 1x1 convolution), "shuffle" or "reverse" (fixed).
        lu: LU-decomposed 1x1 convolution (only with permutation="invconv").
        learn_top: learn the mean and log-std of the top-level prior (else standard normal).
        n_bits: bits per colour channel the images are reduced to (1..8).
        num_classes: number of classes for a class-conditional model; None for unconditional.
        weight_y: weight of the classification loss (bits of y) in the objective.
        dropout: dropout rate on the coupling networks' hidden features in the training objective
            (forward in training mode; encode, decode and sample never drop); not in the official
            code, whose presets keep 0: a regulariser for small data sets.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    n_levels: int = 3
    n_steps: int = 32
    hidden_channels: int = 512
    coupling: str = "affine"
    permutation: str = "invconv"
    lu: bool = True
    learn_top: bool = True
    n_bits: int = 8
    num_classes: int | None = None
    weight_y: float = 0.01
    dropout: float = 0.0

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape) if isinstance(self.image_shape, (list, tuple)) else None
        if shape is not None:
            object.__setattr__(self, "image_shape", shape)
        if shape is None or len(shape) != 3 or not all(_is_int(s) and s > 0 for s in shape):
            raise ConfigError(f"image_shape must be three positive integers (C, H, W), got {self.image_shape!r}")
        for name in ("n_levels", "n_steps", "hidden_channels", "n_bits"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_bits > 8:
            raise ConfigError(f"n_bits must be between 1 and 8, got {self.n_bits}")
        c, h, w = shape
        # (n_levels beyond the image's bit length cannot divide it; 2**n_levels is not computed then)
        if self.n_levels > max(h, w).bit_length() or h % 2**self.n_levels or w % 2**self.n_levels:
            factor = 2**self.n_levels if self.n_levels <= 64 else f"2**{self.n_levels}"
            raise ConfigError(
                f"image_shape {h}x{w} is not divisible by 2**n_levels = {factor}; "
                f"use fewer levels or another image size"
            )
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.permutation not in PERMUTATIONS:
            raise ConfigError(f"permutation must be one of {PERMUTATIONS}, got {self.permutation!r}")
        for name in ("lu", "learn_top"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 2):
            raise ConfigError(f"num_classes must be None or an integer >= 2, got {self.num_classes!r}")
        if (isinstance(self.weight_y, bool) or not isinstance(self.weight_y, (int, float))
                or not math.isfinite(self.weight_y) or self.weight_y < 0):
            raise ConfigError(f"weight_y must be a non-negative number, got {self.weight_y!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0 <= self.dropout < 1):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

    @property
    def n_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GlowConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GlowConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"model config {path} must hold a JSON object")
        return cls.from_dict(d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The official runs (openai/glow README), width 512 unless stated. `digits` and `mnist` are ours:
# digits is sized to train on 2 CPU cores in minutes (with 1,497 training images it overfits
# without the coupling dropout); mnist follows the official 3-level layout on MNIST padded to
# 32x32 as the official data loader does.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(image_shape=(3, 32, 32), n_levels=3, n_steps=32, hidden_channels=512,
                    coupling="affine", permutation="invconv", lu=True, learn_top=True, n_bits=8),
    "imagenet32": dict(image_shape=(3, 32, 32), n_levels=3, n_steps=48, hidden_channels=512,
                       coupling="affine", permutation="invconv", lu=True, learn_top=True, n_bits=8),
    "imagenet64": dict(image_shape=(3, 64, 64), n_levels=4, n_steps=48, hidden_channels=512,
                       coupling="affine", permutation="invconv", lu=True, learn_top=True, n_bits=8),
    "celeba64": dict(image_shape=(3, 64, 64), n_levels=4, n_steps=32, hidden_channels=512,
                     coupling="additive", permutation="invconv", lu=True, learn_top=True, n_bits=5),
    "celeba256": dict(image_shape=(3, 256, 256), n_levels=6, n_steps=32, hidden_channels=512,
                      coupling="additive", permutation="invconv", lu=True, learn_top=True, n_bits=5),
    "mnist": dict(image_shape=(1, 32, 32), n_levels=3, n_steps=32, hidden_channels=512,
                  coupling="affine", permutation="invconv", lu=True, learn_top=True, n_bits=8),
    "digits": dict(image_shape=(1, 8, 8), n_levels=2, n_steps=12, hidden_channels=64,
                   coupling="affine", permutation="invconv", lu=True, learn_top=True, n_bits=5, dropout=0.2),
}


def preset(name: str, **overrides: Any) -> GlowConfig:
    """The config of a named preset, with fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return GlowConfig(**{**PRESETS[name], **overrides})
