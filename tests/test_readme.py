"""Every ```python block of README.md runs as pasted: each in a fresh namespace, in an empty
working directory but for ``my_images/``, the folder of images the README's folder example names
(the blocks write ``my_glow/`` and ``runs/``). The blocks are written small enough to run here (the
training example says ``epochs=1`` and names the preset's default). The blocks that load the
digits run again with that folder in their place, as a user's own images would be."""

import re
from pathlib import Path

import pytest

from tool_checks import write_image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
# the digits in a block, and what a folder of 8x8 grey images puts there
TO_FOLDER = {'load_dataset("digits", "train")': 'load_dataset("my_images", "train")',
             'train_preset("digits", ': 'train_preset("digits", dataset="my_images", '}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_my_images(root: Path) -> None:
    """``my_images/{train,test}/{a,b}/``: 8x8 grey PNGs, 40 + 8 per class, as the digits' shape."""
    for split, n in (("train", 40), ("test", 8)):
        for label, name in enumerate("ab"):
            for i in range(n):
                write_image(root / "my_images" / split / name / f"{i:02d}.png", size=(8, 8), mode="L",
                            seed=1000 * label + i)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2
    assert sum(any(old in block for old in TO_FOLDER) for block in BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_my_images(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})


@pytest.mark.parametrize("index", [i for i, block in enumerate(BLOCKS) if any(old in block for old in TO_FOLDER)],
                         ids=lambda i: f"block{i + 1}")
def test_python_block_runs_on_a_folder(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_my_images(tmp_path)
    block = BLOCKS[index]
    for old, new in TO_FOLDER.items():
        block = block.replace(old, new)
    exec(compile(block, f"README.md python block {index + 1} on my_images/", "exec"), {"__name__": "__readme__"})
