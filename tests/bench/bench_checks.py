"""What every benchmark result must hold; the tiny model the bench tests time."""

import json

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
