"""Hugging Face Hub integration (torchglow.hub and Glow's ModelHubMixin methods), offline.

Every test runs with outgoing connections refused (a socket guard that fails any network attempt);
Hub repositories are read from a local Hub cache laid out as huggingface_hub lays it out.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from conftest import tiny_config, tiny_glow
from torchglow import Glow, GlowConfig
from torchglow.train.checkpoint import load_model
from torchglow.hub import write_model_card

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_model(a: Glow, b: Glow) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_writes_the_folder_format_and_a_card(tmp_path):
    model = tiny_glow("conditional", torch.float32)
    model.save_pretrained(tmp_path, model_card_kwargs=dict(dataset="digits", test_bpd=2.0942, command="torchglow train"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.to_dict()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "torchglow" and "normalizing-flow" in card.data.tags
    for fact in ("| data set | digits |", "| test bits/dim | 2.0942 |", "`torchglow train`"):
        assert fact in card.text
    config_block = card.text.split("```json\n")[1].split("```")[0]
    assert GlowConfig.from_dict(json.loads(config_block)) == model.config


def test_from_pretrained_round_trip_and_positional_map_location(tmp_path):
    model = tiny_glow("conditional", torch.float32)
    model.save_pretrained(tmp_path)
    for loaded in (Glow.from_pretrained(tmp_path), Glow.from_pretrained(str(tmp_path), "cpu")):
        assert_same_model(model, loaded)
        assert not loaded.training  # eval mode, as Hugging Face's from_pretrained
        assert loaded._hub_mixin_config == model.config  # so push_to_hub of a loaded model writes it too
    x = torch.rand(3, *model.config.image_shape) - 0.5
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(Glow.from_pretrained(tmp_path)(x, y).log_prob, model(x, y).log_prob, rtol=0, atol=0)


def test_folders_written_before_the_mixin_still_load(tmp_path):
    """The format of earlier versions (config.json + model.safetensors, no card) as they wrote it."""
    model = tiny_glow("conditional", torch.float32)
    model.config.save(tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "torchglow"})
    assert_same_model(model, Glow.from_pretrained(tmp_path))
    assert_same_model(model, load_model(tmp_path))


def test_a_hub_repository_is_read_from_the_cache(tmp_path):
    """``from_pretrained("user/name")`` goes through hf_hub_download; with local_files_only it reads
    the Hub cache (models--user--name/snapshots/<commit>, refs/main) and needs no network."""
    model = tiny_glow("conditional", torch.float32)
    model.save_pretrained(tmp_path / "saved")
    repo = tmp_path / "cache" / "models--user--tiny-glow"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tmp_path / "saved", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = Glow.from_pretrained("user/tiny-glow", cache_dir=tmp_path / "cache", local_files_only=True)
    assert_same_model(model, loaded)
    with pytest.raises(Exception, match="local_files_only|outgoing traffic"):
        Glow.from_pretrained("user/absent", cache_dir=tmp_path / "cache", local_files_only=True)


def test_a_folder_without_config_names_the_file(tmp_path):
    tiny_glow("conditional", torch.float32).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        Glow.from_pretrained(tmp_path)


def test_write_model_card_rewrites_the_card(tmp_path):
    model = tiny_glow("affine_lu", torch.float32)
    model.save_pretrained(tmp_path)
    assert "test bits/dim" not in (tmp_path / "README.md").read_text()
    path = write_model_card(tmp_path, model.config, dataset="digits", test_bpd=2.5, command="torchglow train --preset digits")
    text = path.read_text()
    assert path == tmp_path / "README.md"
    assert "| test bits/dim | 2.5000 |" in text and "`torchglow train --preset digits`" in text
    assert "An unconditional Glow" in text
    assert_same_model(model, Glow.from_pretrained(tmp_path))  # the card does not disturb loading


@pytest.mark.slow
def test_local_folder_loads_with_hf_hub_offline(tmp_path):
    tiny_glow("conditional", torch.float32).save_pretrained(tmp_path / "m")
    code = "import sys; from torchglow import Glow; print(Glow.from_pretrained(sys.argv[1]).config.n_steps)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tiny_config().n_steps)
