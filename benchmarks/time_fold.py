"""The fold of ActNorm and 1x1 convolution: batched over a level's K steps, or step by step.

    python benchmarks/time_fold.py [--rounds 15]

The cifar10 preset's 3 levels of K=32 steps (12, 24 and 48 channels), on the CPU, one thread:
``fold_steps`` of each level in one call (stacks, ``addcmul``, ``bmm``) against one call per step,
each followed by the backward of a sum of the folded weights, biases and log-dets (the same
reduction for both). Interleaved rounds; prints the median time of each.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchglow import Glow, bench  # noqa: E402
from torchglow.fold import fold_steps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Glow.from_preset("cifar10", hidden_channels=8)  # the coupling width does not enter the fold
    inputs = [torch.randn(2, c, h, w) for c, h, w in [(12, 16, 16), (24, 8, 8), (48, 4, 4)]]

    def backward(levels) -> None:
        sum(w.sum() + b.sum() + ld for level in levels for w, b, ld in level).backward()

    variants = {
        "batched per level": lambda: backward([fold_steps(list(steps), x) for steps, x in zip(model.levels, inputs)]),
        "step by step": lambda: backward([[fold_steps([s], x)[0] for s in steps]
                                          for steps, x in zip(model.levels, inputs)]),
    }
    times = bench.time_calls(variants, torch.device("cpu"), warmup=1, repeats=args.rounds)
    for name, t in times.items():
        print(f"{name}: {statistics.median(t['timed']) * 1e3:.2f} ms (forward and backward, 96 steps)")


if __name__ == "__main__":
    main()
