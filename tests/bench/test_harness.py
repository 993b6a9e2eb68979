"""Smoke tests of the benchmark on a tiny config: it runs, returns the documented keys and positive
numbers, in this process and with each phase in its own. No timing assertions."""

import pytest
from bench_checks import PHASES, TINY, check_result

from torchglow import bench
from torchglow.bench import phases
from torchglow.config import ConfigError


@pytest.mark.parametrize("memory", ["none", "checkpoint", "invertible"])
def test_benchmark_in_process(memory):
    r = bench.benchmark(bench.BenchConfig("digits", 4, "cpu", overrides=TINY, memory=memory, warmup=1, repeats=2,
                                          isolate=False))
    check_result(r)
    assert r["config"]["n_steps"] == 2 and r["memory"] == memory
    assert r["peak_memory_kind"] == "process_peak_rss_so_far"


def test_benchmark_bf16_conditional_subset_of_phases():
    r = bench.benchmark(bench.BenchConfig("digits", 4, "cpu", precision="bf16", overrides={**TINY, "num_classes": 3},
                                          warmup=0, repeats=1, phases=("train", "eval"), isolate=False))
    check_result(r, ("train", "eval"))
    assert "sample" not in r and "sample_images_per_s" not in r


def test_benchmark_isolated_phases_report_their_own_peak():
    r = bench.benchmark(bench.BenchConfig("digits", 4, "cpu", overrides=TINY, warmup=1, repeats=2,
                                          phases=("train", "sample"), threads=1))
    check_result(r, ("train", "sample"))
    assert r["isolated_phases"] and r["peak_memory_kind"] == "peak_rss_of_a_fresh_process_per_phase"
    for phase in ("train", "sample"):
        assert r[phase]["peak_rss_mb"] >= r[phase]["baseline_rss_mb"] > 0


def test_an_isolated_phase_raises_the_models_config_error_here():
    """The model refuses invertible memory with dropout in the phase's own process; the error comes back."""
    config = bench.BenchConfig("digits", 4, "cpu", overrides={**TINY, "dropout": 0.1}, memory="invertible",
                               warmup=0, repeats=1, phases=("train",), count=False)
    with pytest.raises(ConfigError, match="invertible"):
        bench.benchmark(config)


def test_compare_times_eager_and_fast_side_by_side(monkeypatch):
    """compare: both steps timed in alternation in one process, their ratio and the compile time
    reported. (The compiled step is swapped for the eager one here: compiling is the slow test's job.)"""
    monkeypatch.setattr(phases, "compile_step", lambda step, mode: step)
    r = bench.benchmark(bench.BenchConfig("digits", 4, "cpu", overrides=TINY, warmup=1, repeats=3, phases=("train",),
                                          isolate=False, compare=True))
    t = r["train"]
    assert set(t["eager"]) >= {"images_per_s", "seconds"} and set(t["fast"]) >= {"images_per_s", "seconds"}
    assert t["speedup"] == t["eager"]["seconds_median"] / t["fast"]["seconds_median"]
    assert len(t["speedup_per_round"]) == 3 and r["train_images_per_s"] == t["fast"]["images_per_s"]
    assert t["compile_seconds"] == t["fast"]["warmup_seconds"][0] - t["fast"]["seconds_median"]


def test_benchmark_reports_kernels_per_call():
    r = bench.benchmark(bench.BenchConfig("digits", 4, "cpu", overrides=TINY, warmup=0, repeats=1, isolate=False))
    for phase in PHASES:
        k = r[phase]["kernels"]
        assert k["ops"] == sum(k["ops_by_name"].values()) > 0
    assert r["train"]["kernels"]["ops"] > r["eval"]["kernels"]["ops"]
    assert "aten::convolution_backward" in r["train"]["kernels"]["ops_by_name"]
    assert not r["train"]["graphed"]
