"""The public parts of one phase that benchmarks/ builds its own timings from."""

import torch
from bench_checks import TINY

from torchglow import bench


def config(**changes):
    return bench.BenchConfig("digits", 4, "cpu", **{"overrides": TINY, "warmup": 0, "repeats": 2, **changes})


def test_build_is_seeded_and_initialised():
    a, b = bench.build(config()), bench.build(config())
    assert a.x_uint8.shape == (4, 1, 8, 8) and a.x_uint8.dtype == torch.uint8 and a.y is None
    assert torch.equal(a.x_uint8, b.x_uint8)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.model.config.n_steps == 2 and a.model.memory_mode == "none"


def test_build_labels_for_a_conditional_model():
    built = bench.build(config(overrides={**TINY, "num_classes": 3}))
    assert built.y.shape == (4,) and int(built.y.max()) < 3


def test_train_step_trains():
    built = bench.build(config())
    before = [p.detach().clone() for p in built.model.parameters()]
    step = bench.train_step(config(), built)
    step()
    assert step.graphed is None
    assert any(not torch.equal(p, q) for p, q in zip(before, built.model.parameters()))


def test_time_calls_interleaves_and_measure_phase_reports():
    calls, n_params = bench.phase_calls(config(), "sample")
    assert list(calls) == ["eager"] and n_params > 0
    order = []
    times = bench.time_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             torch.device("cpu"), warmup=1, repeats=2)
    assert order == ["a", "b"] * 3 and [len(times["a"][k]) for k in ("warm", "timed", "cpu")] == [1, 2, 2]
    r = bench.measure_phase(config(count=False), "eval")
    assert r["images_per_s"] > 0 and len(r["seconds"]) == 2 and r["n_params"] == n_params
    assert "kernels" not in r and not r["graphed"]
