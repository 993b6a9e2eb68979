"""Smoke tests of the benchmark harness on a tiny config: it runs, returns the documented keys and
positive numbers, and the command line writes its JSON. No timing assertions."""

import json

import pytest
import torch

from torchglow.train import bench
from torchglow.train import step as step_module

TINY = dict(image_shape=(1, 8, 8), n_levels=2, n_steps=2, hidden_channels=8, dropout=0.0)
PHASES = ("train", "sample", "eval")


def check_result(r, phases=PHASES):
    for key in ("preset", "overrides", "config", "batch_size", "device", "device_name", "precision", "memory",
                "fast", "compare", "compile_mode", "threads", "torch", "git_commit", "peak_memory_mb", "peak_memory_kind",
                "load_average_before", "load_average_after"):
        assert key in r, key
    assert r["device_name"] and r["torch"] and r["git_commit"]
    assert r["threads"] >= 1
    for phase in phases:
        assert r[f"{phase}_images_per_s"] > 0
        p = r[phase]
        assert p["seconds_median"] > 0 and len(p["seconds"]) == r["repeats"]
        assert p["cpu_seconds_median"] >= 0
        assert r["peak_memory_mb"][phase] > 0
    json.dumps(r)  # JSON-serialisable


@pytest.mark.parametrize("memory", ["none", "checkpoint", "invertible"])
def test_run_benchmark_in_process(memory):
    r = bench.run_benchmark("digits", 4, "cpu", overrides=TINY, memory=memory, warmup=1, repeats=2, isolate=False)
    check_result(r)
    assert r["config"]["n_steps"] == 2 and r["memory"] == memory
    assert r["peak_memory_kind"] == "process_peak_rss_so_far"


def test_run_benchmark_bf16_conditional_subset_of_phases():
    r = bench.run_benchmark("digits", 4, "cpu", precision="bf16", overrides={**TINY, "num_classes": 3},
                            warmup=0, repeats=1, phases=("train", "eval"), isolate=False)
    check_result(r, ("train", "eval"))
    assert "sample" not in r and "sample_images_per_s" not in r


def test_run_benchmark_isolated_phases_report_their_own_peak():
    r = bench.run_benchmark("digits", 4, "cpu", overrides=TINY, warmup=1, repeats=2, phases=("train", "sample"),
                            threads=1)
    check_result(r, ("train", "sample"))
    assert r["isolated_phases"] and r["peak_memory_kind"] == "peak_rss_of_a_fresh_process_per_phase"
    for phase in ("train", "sample"):
        assert r[phase]["peak_rss_mb"] >= r[phase]["baseline_rss_mb"] > 0


def test_run_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bench.run_benchmark("digits", 4, "cpu", overrides=TINY, memory="nope")
    with pytest.raises(ValueError):
        bench.run_benchmark("digits", 4, "cpu", overrides=TINY, precision="fp8")
    with pytest.raises(ValueError):
        bench.run_benchmark("digits", 4, "cpu", overrides=TINY, phases=("train", "fly"))


MAIN_ARGS = ["--preset", "digits", "--batch-size", "4", "--device", "cpu", "--n-steps", "2", "--hidden-channels", "8",
             "--set", "n_levels=2", "--warmup", "0", "--repeats", "1", "--no-isolate", "--threads", "1"]


def test_main_prints_only_by_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(MAIN_ARGS) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_images_per_s"] > 0 and "written" not in printed
    assert list(tmp_path.iterdir()) == []


def test_main_writes_json(tmp_path, capsys):
    rc = bench.main([*MAIN_ARGS, "--out", str(tmp_path)])
    assert rc == 0
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["digits-K2-L2-w8-b4-cpu-fp32-t1.json"]
    r = json.loads(files[0].read_text())
    assert r["name"] == files[0].stem
    check_result(r)
    assert r["overrides"] == {"n_levels": 2, "n_steps": 2, "hidden_channels": 8}
    assert r["threads"] == 1
    assert str(files[0]) in capsys.readouterr().out


def test_compare_times_eager_and_fast_side_by_side(monkeypatch):
    """--compare: both steps timed in alternation in one process, their ratio and the compile time
    reported. (The compiled step is swapped for the eager one here: compiling is the slow test's job.)"""
    monkeypatch.setattr(step_module, "compile_step", lambda step, mode: step)
    r = bench.run_benchmark("digits", 4, "cpu", overrides=TINY, warmup=1, repeats=3, phases=("train",),
                            isolate=False, compare=True)
    t = r["train"]
    assert set(t["eager"]) >= {"images_per_s", "seconds"} and set(t["fast"]) >= {"images_per_s", "seconds"}
    assert t["speedup"] == t["eager"]["seconds_median"] / t["fast"]["seconds_median"]
    assert len(t["speedup_per_round"]) == 3 and r["train_images_per_s"] == t["fast"]["images_per_s"]
    assert t["compile_seconds"] == t["fast"]["warmup_seconds"][0] - t["fast"]["seconds_median"]


def test_count_ops_counts_top_level_kernel_ops():
    """The rule of count_ops on hand-made calls: views and metadata ops count 0, an op counts once
    however many aten ops it calls inside, a no-op ``.to``/``.contiguous`` counts 0 and a copying one 1;
    autograd's backward ops count one each."""
    x = torch.randn(4, 3)
    w = torch.randn(3, 5, requires_grad=True)
    assert bench.count_ops(lambda: x.view(3, 4).t()[1:].unsqueeze(0).expand(2, -1, -1))["ops"] == 0
    assert bench.count_ops(lambda: x.to(torch.float32).contiguous())["ops"] == 0
    counts = bench.count_ops(lambda: (x.t().contiguous(), x.to(torch.float64)))
    assert counts["ops"] == 2 and counts["ops_by_name"] == {"aten::contiguous": 1, "aten::to": 1}
    # linear = one top-level op (its addmm/matmul inside not again); mul, sum; backward: mm etc.
    forward = bench.count_ops(lambda: (torch.nn.functional.linear(x, w.t()) * 2).sum())
    assert forward["ops"] == 3 and set(forward["ops_by_name"]) == {"aten::linear", "aten::mul", "aten::sum"}
    both = bench.count_ops(lambda: torch.autograd.grad((x @ w * 2).sum(), w))
    assert both["ops"] > 3 and "aten::mm" in both["ops_by_name"]


def test_run_benchmark_reports_kernels_per_call():
    r = bench.run_benchmark("digits", 4, "cpu", overrides=TINY, warmup=0, repeats=1, isolate=False)
    for phase in PHASES:
        k = r[phase]["kernels"]
        assert k["ops"] == sum(k["ops_by_name"].values()) > 0
    assert r["train"]["kernels"]["ops"] > r["eval"]["kernels"]["ops"]
    assert "aten::convolution_backward" in r["train"]["kernels"]["ops_by_name"]
    assert not r["train"]["graphed"]
