"""Checkpoints: atomic writes, and loading a model from whatever a user points at.

A training checkpoint (``last.pt``, ``best.pt`` in a run folder) is one ``torch.save`` file holding
everything needed to resume exactly; it is written to a temporary file in the same folder,
fsynced and renamed over the old one, so a crash or a full disk mid-write leaves the previous
checkpoint intact. A pretrained folder (``config.json`` + ``model.safetensors``) holds weights only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, GlowConfig
from ..files import default_file_mode
from ..model import CONFIG_NAME, WEIGHTS_NAME, Glow

FORMAT = "torchglow-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file."""


class _WriteErrors:
    """A binary file that remembers the first OSError of a write: ``torch.save`` reports a failed
    write (a full disk) as an opaque RuntimeError of its zip writer."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file + fsync + rename (never a half-written file).

    Any failure (a full disk, an unwritable folder, an exception or signal mid-write) leaves the
    previous file at ``path`` untouched and removes the temporary file; OSErrors become a
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _WriteErrors(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp made it 0600
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint, with a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of something else, not a torch file at all
        raise CheckpointError(f"{path} is not a readable torchglow checkpoint: truncated, corrupt or not a "
                              f"torch file ({type(e).__name__}: {_brief(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a torchglow checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in ("model_config", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete torchglow checkpoint (no {', '.join(missing)})")
    return ckpt


def _brief(e: BaseException, limit: int = 120) -> str:
    """The first sentence of an exception's first line (torch's messages run to paragraphs)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3].rsplit(" ", 1)[0] + "..."  # never mid-word


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``"hidden_channels 16 vs 8, n_steps 2 vs 3"``: the fields where two config dicts differ."""
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))


def find_checkpoint(run_dir: str | Path, prefer: tuple[str, ...] = ("best.pt", "last.pt")) -> Path:
    run_dir = Path(run_dir)
    for name in prefer:
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"no checkpoint ({' or '.join(prefer)}) in run folder {run_dir}")


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True, source: str = "checkpoint") -> Glow:
    try:
        config = GlowConfig.from_dict(ckpt["model_config"])
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source} holds an invalid model config ({e})") from None
    model = Glow(config)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    load_state(model, state, source=source)
    return model


def load_state(model: Glow, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with a message that says which config does not match."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # mismatched shapes or keys; not a state dict
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{source} does not match the model config ({first})") from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True) -> Glow:
    """A Glow in eval mode from a run folder (best, else last checkpoint), a ``.pt`` checkpoint or a
    pretrained folder. Checkpoints give their EMA weights when they have them and ``use_ema``."""
    path = Path(path)
    if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        try:
            return Glow.from_pretrained(path, map_location).eval()
        except Exception as e:  # a bad config.json, truncated safetensors (SafetensorError), wrong shapes
            raise CheckpointError(f"cannot load pretrained model {path}: {type(e).__name__}: {_brief(e, 200)}") from None
    if path.is_dir():
        path = find_checkpoint(path)
    elif not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run folder, a .pt checkpoint or a pretrained folder)")
    return model_from_checkpoint(load_checkpoint(path), use_ema, source=str(path)).to(map_location).eval()
