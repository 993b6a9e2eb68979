"""One phase of ``torchglow bench`` in a fresh process, for :func:`torchglow.bench.measure_isolated`:
``python -m torchglow.bench '{"phase": ..., "config": {...}}'`` prints the phase's result as one
JSON line. Not a command for people: run ``torchglow bench``."""

import json
import sys

import torch

from ..config import ConfigError
from .config import BenchConfig
from .harness import EXIT_CONFIG_ERROR
from .phases import measure_phase


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("python -m torchglow.bench only measures one phase for the torchglow bench command: run that",
              file=sys.stderr)
        return 2
    request = json.loads(argv[0])
    try:
        config = BenchConfig(**request["config"])
        if config.threads:
            torch.set_num_threads(config.threads)
        print(json.dumps(measure_phase(config, request["phase"])))
    except ConfigError as e:
        print(json.dumps({"config_error": str(e)}))
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
