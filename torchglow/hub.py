"""Sharing models through the Hugging Face Hub: model cards and file resolution.

:class:`torchglow.Glow` inherits ``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` from
huggingface_hub's ``ModelHubMixin``; the folder format stays torchglow's own (``config.json`` holding
:meth:`GlowConfig.to_dict` + ``model.safetensors``), so a folder on disk and a Hub repository are
read by the same code, and a local folder never touches the network. The model card (``README.md``
in the folder) records the config, the data set, the test bits/dim and the command that made it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download

from .config import GlowConfig

CARD_NAME = "README.md"
LIBRARY_NAME = "torchglow"
TAGS = ["glow", "normalizing-flow", "pytorch"]
PIPELINE_TAG = "unconditional-image-generation"
PAPER_URL = "https://arxiv.org/abs/1807.03039"


def resolve_file(name_or_path: str | Path, filename: str, **hub_kwargs) -> Path:
    """``filename`` inside a local folder (no network), else downloaded from the Hub repository
    ``name_or_path`` ("user/name") into the local cache; ``hub_kwargs`` (revision, token,
    cache_dir, force_download, local_files_only) go to ``hf_hub_download``."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path) / filename
    return Path(hf_hub_download(repo_id=str(name_or_path), filename=filename, **hub_kwargs))


def model_card(config: GlowConfig, dataset: str | None = None, test_bpd: float | None = None,
               command: str | None = None) -> ModelCard:
    """A model card: Hub metadata, then the data set, test bits/dim, the command that made the
    model (each when known) and the full config."""
    data = ModelCardData(library_name=LIBRARY_NAME, tags=TAGS, pipeline_tag=PIPELINE_TAG)
    c, h, w = config.image_shape
    kind = f"A class-conditional ({config.num_classes} classes)" if config.num_classes else "An unconditional"
    facts = [("data set", dataset), ("test bits/dim", None if test_bpd is None else f"{test_bpd:.4f}"),
             ("made with", None if command is None else f"`{command}`")]
    rows = "".join(f"| {name} | {value} |\n" for name, value in facts if value is not None)
    table = f"| | |\n|---|---|\n{rows}\n" if rows else ""
    body = (
        f"# Glow {c}x{h}x{w}\n\n"
        f"{kind} Glow normalizing flow ([Kingma & Dhariwal 2018]({PAPER_URL})), "
        f"L={config.n_levels} levels of K={config.n_steps} steps, {config.coupling} coupling, "
        f"{config.hidden_channels} hidden channels, {config.n_bits}-bit images, saved by torchglow.\n\n"
        f"{table}"
        "```python\nfrom torchglow import Glow\n\nmodel = Glow.from_pretrained(\"user/name\")  # or a local folder\n```\n\n"
        f"## Config\n\n```json\n{json.dumps(config.to_dict(), indent=2)}\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(directory: str | Path, config: GlowConfig, dataset: str | None = None,
                     test_bpd: float | None = None, command: str | None = None) -> Path:
    """Write (or overwrite) ``directory/README.md``; e.g. after the final test evaluation."""
    path = Path(directory) / CARD_NAME
    model_card(config, dataset, test_bpd, command).save(path)
    return path
