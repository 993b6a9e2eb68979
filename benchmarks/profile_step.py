"""Where the eager training step spends its time: ``torch.profiler`` over a few steps.

    python benchmarks/profile_step.py [--precision bf16] [--steps 3] [--n-steps 8] [--hidden-channels 128] [--batch-size 16]

The cifar10 preset (reduced by the options) on the CPU, one thread; prints the operators by
self CPU time.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchglow import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--n-steps", type=int, default=8)
    parser.add_argument("--hidden-channels", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = dict(n_steps=args.n_steps, hidden_channels=args.hidden_channels)
    model, _, x, y = bench._build("cifar10", overrides, args.batch_size, torch.device("cpu"), args.precision,
                                  "none", 0)
    step = bench._train_step_fn(model, x, y, args.precision, "none", False, "regional")
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
