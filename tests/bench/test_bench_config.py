"""BenchConfig refuses what cannot work before any time is spent, naming the field, never a flag."""

import json

import pytest
from bench_checks import TINY

from torchglow.bench import BenchConfig
from torchglow.config import ConfigError


@pytest.mark.parametrize("changes, field", [
    (dict(memory="nope"), "memory"),
    (dict(precision="fp8"), "precision"),
    (dict(fast_precision="fp8"), "precision"),
    (dict(compile_mode="fastest"), "compile_mode"),
    (dict(compare=True, compile_mode="whole", memory="checkpoint"), "compile_mode"),
    (dict(batch_size=0), "batch_size"),
    (dict(repeats=0), "`repeats`"),
    (dict(warmup=-1), "`warmup`"),
    (dict(phases=("train", "fly")), "`phases`"),
    (dict(phases=()), "`phases`"),
    (dict(preset="nope"), "preset"),
    (dict(overrides={"n_steps": 0}), "n_steps"),
])
def test_bad_values_are_refused_with_the_field_name(changes, field):
    with pytest.raises(ConfigError) as e:
        BenchConfig(**{"preset": "digits", "batch_size": 4, "device": "cpu", "overrides": TINY, **changes})
    assert field in str(e.value) and "--" not in str(e.value)


def test_to_dict_round_trips_through_json():
    config = BenchConfig("digits", 4, "cpu", overrides=TINY, phases=["train"], fast_precision="bf16")
    assert config.phases == ("train",)
    again = BenchConfig(**json.loads(json.dumps(config.to_dict())))
    assert json.dumps(again.to_dict()) == json.dumps(config.to_dict())
