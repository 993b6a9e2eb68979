import json
import os

import pytest

from torchglow.files import write_json_atomic


def test_write_json_atomic(tmp_path):
    path = write_json_atomic(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert path == tmp_path / "a" / "b.json" and json.loads(path.read_text()) == {"x": [1, 2]}
    write_json_atomic(path, {"x": 3})
    assert json.loads(path.read_text()) == {"x": 3} and os.listdir(path.parent) == ["b.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"ok": True} and os.listdir(tmp_path) == ["r.json"]
