"""benchmarks/gpu_check.py --smoke: the GPU session's script runs its code paths on the CPU."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def write_jpeg_npz(path, n_train=40, n_test=12, seed=0):
    """A small npz in the format of the CIFAR-10 JPEG copy: ``data`` (all JPEG files concatenated),
    ``offsets`` (N + 1), ``y``, ``split`` (0 train, 1 test)."""
    rng = np.random.RandomState(seed)
    files = []
    for _ in range(n_train + n_test):
        buf = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=75)
        files.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])])
    np.savez(path, data=np.concatenate(files), offsets=offsets, y=rng.randint(0, 10, len(files)).astype(np.uint8),
             split=np.array([0] * n_train + [1] * n_test, dtype=np.uint8))


@pytest.mark.slow  # 22 s on 2 busy cores: a subprocess that imports torch and trains
def test_gpu_check_smoke(tmp_path):
    write_jpeg_npz(tmp_path / "small.npz")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--npz", str(tmp_path / "small.npz"), "--smoke",
                           "--minutes", "0.1"], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["errors"] == {}
    assert report["data"] == {**report["data"], "images": 52, "train": 40, "test": 12}
    for part in ("train_b4", "train_b8", "sample_b8"):
        r = report[part]
        assert set(r) == {"eager", "fast", "speedup", "compile_seconds"}
        assert r["speedup"] == r["eager"]["seconds_median"] / r["fast"]["seconds_median"]
    summary = report["run"]["summary"]
    assert summary["finished"] and summary["test_bpd"] is not None and summary["steps"] > 0
    assert report["run"]["train_config"]["fast"] and report["run"]["train_config"]["precision"] == "bf16"
    assert (out / "curve.png").is_file() and (out / "run" / "metrics.jsonl").is_file()
    assert [p["images"] for p in report["curve"]] == sorted(p["images"] for p in report["curve"])
    assert report["curve"][-1]["test_bpd"] == summary["test_bpd"]
