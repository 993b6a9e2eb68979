"""benchmarks/gpu_check.py --smoke: the GPU session's script runs its code paths on the CPU."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))


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


@pytest.mark.slow  # about 40 s on 2 busy cores: nine subprocesses that import torch, compile and train
def test_gpu_check_smoke(tmp_path):
    write_jpeg_npz(tmp_path / "small.npz")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--npz", str(tmp_path / "small.npz"), "--smoke"],
                          capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["errors"] == {}
    assert report["data"] == {**report["data"], "images": 52, "train": 40, "test": 12}
    assert list(report["part_seconds"]) == ["data", "exactness", "train_b4", "train_graph_b4", "sample_b8", "eval_b8",
                                            "eval_graph_b8", "memory_none_b4", "memory_invertible_b4", "run"]
    for which in ("fresh", "trained"):
        assert report["exactness"][which]["relative_error"] < 1e-5
        assert report["exactness"][which]["invertible"]["steps"] == 3
    for part in ("train_b4", "train_graph_b4", "sample_b8", "eval_b8", "eval_graph_b8"):
        r = report[part]
        assert r["speedup"] == r["eager"]["seconds_median"] / r["fast"]["seconds_median"]
        assert r["eager"]["kernels"]["ops"] > 0
    summary = report["run"]["summary"]
    assert summary["finished"] and summary["test_bpd"] is not None and summary["steps"] > 0
    assert report["run"]["train_config"]["fast"] and report["run"]["train_config"]["precision"] == "bf16"
    files = sorted(p.name for p in out.rglob("*"))
    assert files == sorted(["gpu_check.json", "table.md", "curve.png", "samples.png", "run_summary.json",
                            "run_metrics.jsonl"])
    table = (out / "table.md").read_text()
    assert table.startswith("| part |") and "train_b4" in table and "exactness, trained model" in table
    assert table.strip() in proc.stdout


def test_a_part_over_its_cap_is_killed_and_recorded(tmp_path, monkeypatch):
    """A part that runs past its cap is killed (its whole process group) and recorded as an
    error; the check goes on."""
    import gpu_check

    report = {"errors": {}, "part_seconds": {}}
    real_popen = gpu_check.subprocess.Popen
    # the child sleeps instead of running a part: what matters here is the cap
    monkeypatch.setattr(gpu_check.subprocess, "Popen",
                        lambda cmd, **kw: real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kw))
    t0 = time.perf_counter()
    gpu_check.check_part(report, "sleepy", "sleep", [], 6, "smoke", tmp_path, time.perf_counter() + 100)
    assert time.perf_counter() - t0 < 20
    assert "timed out after 6 s" in report["errors"]["sleepy"] and "sleepy" not in report
    gpu_check.check_part(report, "late", "sleep", [], 60, "smoke", tmp_path, time.perf_counter() + 2)
    assert report["errors"]["late"] == "skipped: the time budget is spent"


def test_gpu_check_parts_runs_only_the_named_groups(tmp_path):
    """``--parts sample``: the sampling part alone (no data, no run), for a short follow-up call."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--npz", str(tmp_path / "absent.npz"), "--smoke",
                           "--parts", "sample"], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["part_seconds"]) == ["sample_b8"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["sample_b8"]["fast"]["images_per_s"] > 0
