"""The cost of the official edge padding: the same model with padding "zero" and "edge", timed in one
process with torchglow bench's own step, sampler, forward and timer, interleaved call by call, so
that other work on a shared machine slows both alike.

    python benchmarks/edge_padding.py --n-steps 8 --hidden-channels 128 --batch-size 16 --threads 1 \
        --out benchmarks/results/cifar10-K8-w128-b16-cpu-fp32-edge-vs-zero-t1.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from torchglow import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--n-steps", type=int, default=8)
    p.add_argument("--hidden-channels", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base = dict(n_steps=args.n_steps, hidden_channels=args.hidden_channels)
    result = dict(preset=args.preset, **base, batch_size=args.batch_size, threads=args.threads,
                  device=bench.device_name(device), torch=torch.__version__, commit=bench.git_commit(),
                  load_average_before=bench.load_average(), phases={})
    for phase in ("train", "sample", "eval"):
        fns = {}
        for padding in ("zero", "edge"):
            config = bench.BenchConfig(args.preset, args.batch_size, "cpu", overrides={**base, "padding": padding})
            calls, _ = bench.phase_calls(config, phase)
            fns[padding] = calls["eager"]
        times = bench.time_calls(fns, device, args.warmup, args.repeats)
        rates = {k: args.batch_size / statistics.median(v["timed"]) for k, v in times.items()}
        ratios = [z / e for z, e in zip(times["zero"]["timed"], times["edge"]["timed"])]
        result["phases"][phase] = dict(images_per_s=rates, edge_over_zero_rate=statistics.median(ratios),
                                       seconds={k: v["timed"] for k, v in times.items()})
        print(f"{phase}: zero {rates['zero']:.1f} images/s, edge {rates['edge']:.1f} images/s, "
              f"edge/zero rate {statistics.median(ratios):.3f} (median of {args.repeats} interleaved rounds)")
    result["load_average_after"] = bench.load_average()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
