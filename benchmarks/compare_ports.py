"""torchglow against two public PyTorch ports of Glow, side by side on the CPU, in one process.

    python benchmarks/compare_ports.py --ports /work/ports [--before /tmp/torchglow-before] [--rounds 5]

The ports are imported from ``--ports`` (``y0ast/`` holding y0ast/Glow-PyTorch, ``rosinality/``
holding rosinality/glow-pytorch, e.g. ``git archive`` of each repository); nothing of theirs is
in this project. ``--before`` optionally adds another torchglow source tree (a ``git archive`` of
an earlier commit that has the package ``torchglow.bench`` with ``BenchConfig``, ``build`` and
``train_step``) as a fourth contestant, imported as its own package.

Every model: fp32, cifar10 shapes (3x32x32), K=8 steps, L=3 levels, coupling width 128, affine
couplings, LU 1x1 convolutions, batch 16, one thread. rosinality's coupling width is fixed at 512
by its ``Flow`` class, so its ``AffineCoupling`` default ``filter_size`` is set to 128 here.
- train: one optimiser step on a fixed batch (torchglow: its ``TrainStep``, with EMA; y0ast:
  its forward, ``nll.mean()``, Adamax; rosinality: its forward and loss, Adam);
- sample: 16 samples at temperature 1 under ``no_grad`` in eval mode.
Rounds are interleaved (each round times every contestant in turn, ``--calls`` calls each), so
that other work on the shared machine slows all alike; the report gives the median time per call
over all rounds, images/s, and the per-round ratios of torchglow's rate to each other's.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

K, L, WIDTH, BATCH = 8, 3, 128, 16


@contextlib.contextmanager
def _on_path(folder: Path, shadowed: tuple[str, ...]):
    """Import from ``folder`` first, then forget its top-level module names (the ports both have
    a ``model.py``)."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in shadowed:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def _old_torch_qr():
    """The ports build their rotations with ``torch.qr``, removed from recent torch: the same
    reduced QR for the duration of their construction."""
    removed = torch.qr
    torch.qr = lambda a, some=True: torch.linalg.qr(a, mode="reduced" if some else "complete")
    try:
        yield
    finally:
        torch.qr = removed


def _load(name: str, path: Path, shadowed: tuple[str, ...]):
    with _on_path(path.parent, shadowed):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)


def _model_space(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 256 - 0.5 + torch.rand(x_uint8.shape, generator=torch.Generator().manual_seed(1)) / 256


def torchglow_fns(package):
    """(train, sample) callables of a torchglow package (this tree's or ``--before``'s)."""
    bench = importlib.import_module(f"{package}.bench")
    torch.manual_seed(0)
    config = bench.BenchConfig("cifar10", BATCH, "cpu", overrides=dict(n_steps=K, n_levels=L, hidden_channels=WIDTH))
    train = bench.train_step(config, bench.build(config))
    sampler = bench.build(config).model
    sampler.eval()
    return train, lambda: sampler.sample(BATCH)


def y0ast_fns(folder: Path):
    module = _load("y0ast_model", folder / "model.py", ("model", "modules", "utils"))
    torch.manual_seed(0)

    def build():
        with _old_torch_qr():
            return module.Glow((32, 32, 3), WIDTH, K, L, 1.0, "invconv", "affine", True, 10, True, False)

    model = build()
    x = _model_space(_batch())
    with torch.no_grad():
        model(x, None)  # data-dependent ActNorm initialisation on the first batch
    optimizer = torch.optim.Adamax(model.parameters(), lr=5e-4)

    def train():
        _, nll, _ = model(x, None)
        optimizer.zero_grad()
        nll.mean().backward()
        optimizer.step()

    sampler = build()
    with torch.no_grad():
        sampler(x, None)
    sampler.eval()
    top = sampler.flow.output_shapes[-1][1:]

    def sample():
        with torch.no_grad():
            return sampler(z=torch.randn(BATCH, *top), temperature=1.0, reverse=True)

    return train, sample


def rosinality_fns(folder: Path):
    module = _load("rosinality_model", folder / "model.py", ("model",))
    module.AffineCoupling.__init__.__defaults__ = (WIDTH, True)  # filter_size: its Flow passes none
    torch.manual_seed(0)
    n_pixel, n_bins = 3 * 32 * 32, 256.0

    def build():
        with _old_torch_qr():
            return module.Glow(3, K, L, affine=True, conv_lu=True)

    model = build()
    x = _model_space(_batch())
    with torch.no_grad():
        model(x)  # ActNorm initialisation
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train():
        log_p, logdet, _ = model(x)
        loss = (-(log_p + logdet - math.log(n_bins) * n_pixel) / (math.log(2) * n_pixel)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    sampler = build()
    with torch.no_grad():
        sampler(x)
    sampler.eval()
    shapes, c, size = [], 3, 32
    for _ in range(L - 1):
        size //= 2
        c *= 2
        shapes.append((c, size, size))
    shapes.append((c * 4, size // 2, size // 2))

    def sample():
        with torch.no_grad():
            return sampler.reverse([torch.randn(BATCH, *s) for s in shapes])

    return train, sample


def _time_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=Path, required=True, help="folder with y0ast/ and rosinality/")
    parser.add_argument("--before", type=Path, help="an earlier torchglow source tree, timed as 'before'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per contestant and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every timing here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    contestants = {"torchglow": torchglow_fns("torchglow")}
    if args.before:
        spec = importlib.util.spec_from_file_location(
            "torchglow_before", args.before / "torchglow" / "__init__.py",
            submodule_search_locations=[str(args.before / "torchglow")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["torchglow_before"] = package
        spec.loader.exec_module(package)
        contestants["torchglow_before"] = torchglow_fns("torchglow_before")
    contestants["y0ast"] = y0ast_fns(args.ports / "y0ast")
    contestants["rosinality"] = rosinality_fns(args.ports / "rosinality")
    times = {phase: {name: [] for name in contestants} for phase in ("train", "sample")}
    for name, fns in contestants.items():
        for fn in fns:
            _time_call(fn, args.warmup)
    for _ in range(args.rounds):
        for p, phase in enumerate(times):
            for name, fns in contestants.items():
                times[phase][name].append(_time_call(fns[p], args.calls))
    report = {"threads": 1, "batch": BATCH, "K": K, "L": L, "width": WIDTH, "torch": torch.__version__,
              "rounds": args.rounds, "calls": args.calls, "times_s": times, "images_per_s": {}, "ratios": {}}
    for phase, per in times.items():
        rates = {name: BATCH / statistics.median(t) for name, t in per.items()}
        report["images_per_s"][phase] = rates
        print(f"{phase}: " + ", ".join(f"{n} {r:.1f} img/s" for n, r in rates.items()))
        for other in per:
            if other == "torchglow":
                continue
            rounds = [o / t for t, o in zip(per["torchglow"], per[other])]
            report["ratios"][f"{phase}_vs_{other}"] = {"median_rate_ratio": rates["torchglow"] / rates[other],
                                                        "per_round": rounds}
            print(f"  torchglow / {other}: {rates['torchglow'] / rates[other]:.2f}x "
                  f"(per round {min(rounds):.2f} / {statistics.median(rounds):.2f} / {max(rounds):.2f})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
