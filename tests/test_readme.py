"""Every ```python block of README.md runs as pasted and produces what its comments say: each in a
fresh namespace, in an empty working directory but for ``my_images/``, the folder of images the
README's folder example names (the blocks write ``my_glow/`` and ``runs/``). The blocks are written
small enough to run here (the training example says ``epochs=1`` and names the preset's default).
The blocks that load the digits run again with that folder in their place, as a user's own images
would be. Every ``torchglow.x.y`` name the README's prose mentions resolves by import, and every
source file it names exists."""

import importlib
import math
import re
from pathlib import Path

import pytest
import torch

from tool_checks import write_image

README_TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README_TEXT, re.S | re.M)
# the digits in a block, and what a folder of 8x8 grey images puts there
TO_FOLDER = {'load_dataset("digits", "train")': 'load_dataset("my_images", "train")',
             'train_preset("digits", ': 'train_preset("digits", dataset="my_images", '}
PROSE = re.sub(r"^```.*?^```", "", README_TEXT, flags=re.S | re.M)
DOTTED = sorted(set(re.findall(r"\btorchglow(?:\.[A-Za-z_]\w*)+", PROSE)))
FILES = sorted(set(re.findall(r"`((?:torchglow|tests|benchmarks)/[\w/]+\.py)`", PROSE)))
MY_IMAGES = {"train": 40, "test": 8}  # per class, classes "a" and "b"

pytestmark = pytest.mark.usefixtures("one_thread")


def write_my_images(root: Path) -> None:
    """``my_images/{train,test}/{a,b}/``: 8x8 grey PNGs, 40 + 8 per class, as the digits' shape."""
    for split, n in MY_IMAGES.items():
        for label, name in enumerate("ab"):
            for i in range(n):
                write_image(root / "my_images" / split / name / f"{i:02d}.png", size=(8, 8), mode="L",
                            seed=1000 * label + i)


def check_model_block(ns: dict, out: str) -> None:
    """The model in Python: encode/decode exact, scores finite, samples and images shaped, the
    saved folder loads back in eval mode with the same density."""
    from torchglow import Glow

    images, labels, x, n_bits = ns["images_uint8"], ns["labels"], ns["x"], ns["n_bits"]
    assert images.shape == (64, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert x.dtype == torch.float32 and x.shape == images.shape and -0.5 <= x.min() and x.max() < 0.5
    latents, eps = ns["latents"], ns["eps"]
    assert sum(z[0].numel() for z in latents) == 64  # one latent per split, together the image's size
    assert [z.shape for z in eps] == [z.shape for z in latents] and all(z.isfinite().all() for z in eps)
    assert ns["logdet"].shape == (64,) and ns["logdet"].isfinite().all()
    torch.testing.assert_close(ns["x_rec"], x, rtol=0, atol=1e-4)
    assert ns["log_px"].shape == (64,) and ns["log_px"].isfinite().all()
    bpd = ns["bpd"]
    assert bpd.shape == (64,) and bpd.isfinite().all() and (bpd > 0).all()
    assert ns["samples"].shape == (16, 1, 8, 8) and ns["samples"].isfinite().all()
    assert ns["images"].shape == (16, 1, 8, 8) and ns["images"].dtype == torch.uint8
    assert n_bits == 5
    assert {p.name for p in Path("my_glow").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    model = ns["model"]
    assert isinstance(model, Glow) and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), ns["log_px"], rtol=1e-5, atol=1e-4)


def check_folder_block(ns: dict, out: str) -> None:
    """A folder of images: the shape read from the images or given, the classes, the counts."""
    train_set, test_set, images, labels = ns["train_set"], ns["test_set"], ns["images"], ns["labels"]
    n_train, n_test = 2 * MY_IMAGES["train"], 2 * MY_IMAGES["test"]
    assert train_set.image_shape == (1, 8, 8) and test_set.image_shape == (3, 8, 8)
    assert (len(train_set), len(test_set)) == (n_train, n_test)
    assert list(train_set.class_names) == ["a", "b"]
    assert images.shape == (n_train, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * (n_train // 2) + [1] * (n_train // 2)
    assert test_set.take(range(n_test))[0].shape == (n_test, 3, 8, 8)
    assert out.strip() == f"(1, 8, 8) {train_set.class_names} {ns['folder_layout']('my_images').counts()}"
    assert ns["folder_layout"]("my_images").counts() == {"train": n_train, "test": n_test}


def check_train_block(ns: dict, out: str) -> None:
    """Everything the CLI does: one epoch, a finite test bits/dim, printed, and a model that samples."""
    config, result = ns["config"], ns["result"]
    assert config.epochs == 1 and config.out == "runs/digits"
    test_bpd = result.summary["test_bpd"]
    assert math.isfinite(test_bpd) and test_bpd > 0
    assert out.strip() == str(test_bpd)
    assert result.summary["epochs"] == 1 and (Path(config.out) / "config.json").is_file()
    samples = result.eval_model.sample(8)
    assert samples.shape == (8, *ns["preset"]("digits").image_shape) and samples.isfinite().all()


# each block by a line only it has
CHECKS = {"model.save_pretrained(": check_model_block, "folder_layout(": check_folder_block,
          "result = train(": check_train_block}


def check_for(block: str):
    checks = [check for marker, check in CHECKS.items() if marker in block]
    assert len(checks) == 1, f"a README block without its one check:\n{block}"
    return checks[0]


def run_block(block: str, name: str, capsys) -> None:
    namespace = {"__name__": "__readme__"}
    exec(compile(block, name, "exec"), namespace)
    check_for(block)(namespace, capsys.readouterr().out)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
    assert sum(any(old in block for old in TO_FOLDER) for block in BLOCKS) >= 2
    assert {check_for(block) for block in BLOCKS} == set(CHECKS.values())


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_my_images(tmp_path)
    run_block(BLOCKS[index], f"README.md python block {index + 1}", capsys)


@pytest.mark.parametrize("index", [i for i, block in enumerate(BLOCKS) if any(old in block for old in TO_FOLDER)],
                         ids=lambda i: f"block{i + 1}")
def test_python_block_runs_on_a_folder(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_my_images(tmp_path)
    block = BLOCKS[index]
    for old, new in TO_FOLDER.items():
        block = block.replace(old, new)
    run_block(block, f"README.md python block {index + 1} on my_images/", capsys)


def resolve(dotted: str):
    """The module or attribute ``dotted`` names: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if not f"{dotted}.".startswith(f"{e.name}."):  # a module this one imports is missing, not this one
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_readme_mentions_many_dotted_names():
    assert len(DOTTED) >= 5, DOTTED


@pytest.mark.parametrize("dotted", DOTTED)
def test_dotted_name_in_the_prose_resolves(dotted):
    assert resolve(dotted) is not None


@pytest.mark.parametrize("path", FILES)
def test_file_in_the_prose_exists(path):
    assert (Path(__file__).resolve().parents[1] / path).is_file()
