"""Every ```python block of README.md runs as pasted: each in a fresh namespace, in an empty
working directory (the blocks write ``my_glow/`` and ``runs/``). The blocks are written small
enough to run here (the training example says ``epochs=1`` and names the preset's default)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})
