"""Server time per slider update of ``torchglow demo``: the work behind one move of each slider.

* ``edit``: an attribute slider, :meth:`DemoSession.edit` (ε + Σ α·d, decode one image, PNG);
* ``mix``: the mix slider, :meth:`DemoSession.mix` at one t (slerp of every level, decode, PNG);
* ``samples``: the temperature slider, :meth:`DemoSession.samples` (decode the grid, PNG);
* ``edit_http``: ``edit`` through the whole web stack (Starlette's in-process test client: the Host,
  origin and token checks, JSON in, routing, thread pool, JSON out), without a network.

Models: the digits preset (K=12, width 64, 8x8x1) and a cifar10-shaped model (K=8, width 128,
32x32x3, L=3), both initialised on random images (the timing does not depend on training), with
10 random attribute directions. Rounds are interleaved (every case once per round) and the
median and 90th percentile over rounds are reported, in milliseconds. Everything is timed in a
worker thread, as the server runs the model (Starlette's thread pool): on a loaded 2-core machine,
torch's 2 intra-op threads called from the main thread were 10-25x slower than from a worker.

    python benchmarks/bench_demo.py --rounds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from torchglow import Glow

from torchglow import preset
from torchglow.cli.demo.session import DemoSession
from torchglow.preprocess import dequantize, preprocess

MODELS = {
    "digits (K12 w64, 1x8x8)": dict(name="digits"),
    "cifar10-shaped (K8 w128, 3x32x32)": dict(name="cifar10", n_steps=8, hidden_channels=128),
}


def build(name: str, **overrides) -> tuple[DemoSession, str, str]:
    torch.manual_seed(0)
    model = Glow(preset(name, **overrides))
    cfg = model.config
    x = torch.randint(0, 256, (64, *cfg.image_shape), dtype=torch.uint8)
    model.initialize(dequantize(preprocess(x, cfg.n_bits), cfg.n_bits))
    directions = {f"attr {i}": [0.1 * torch.randn(s) for s in model.latent_shapes] for i in range(10)}
    session = DemoSession(model.eval(), directions=directions)
    a = session.encode(x[:1])["token"]
    b = session.encode(x[1:2])["token"]
    return session, a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    from starlette.testclient import TestClient

    from torchglow.cli.demo.server import create_app

    cases = {}
    for label, spec in MODELS.items():
        session, a, b = build(spec.pop("name"), **spec)
        client = TestClient(create_app(session, token="bench"), base_url="http://127.0.0.1:8000",
                            headers={"X-Torchglow-Token": "bench"})  # as the page sends it
        alphas = lambda r: {"attr 0": 0.5 * (r % 3 - 1), "attr 3": 0.25}  # noqa: E731
        cases[(label, "edit")] = lambda r, s=session, a=a: s.edit(a, alphas(r))
        cases[(label, "mix")] = lambda r, s=session, a=a, b=b: s.mix(a, b, (r % 10) / 10)
        cases[(label, "samples")] = lambda r, s=session: s.samples(0.5 + 0.05 * (r % 5), seed=0)
        cases[(label, "edit_http")] = lambda r, c=client, a=a: c.post(
            "/api/edit", json={"token": a, "alphas": alphas(r)}).raise_for_status()
    times = {k: [] for k in cases}

    def measure() -> None:
        for fn in cases.values():  # warm-up
            fn(0)
        for r in range(args.rounds):
            for key, fn in cases.items():
                t0 = time.perf_counter()
                fn(r)
                times[key].append(1000 * (time.perf_counter() - t0))

    load = os.getloadavg()[0]
    with ThreadPoolExecutor(1) as pool:
        pool.submit(measure).result()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.rounds} interleaved rounds, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'model':<36} {'update':<10} {'median ms':>9} {'p90 ms':>7}")
    for (label, what), ts in times.items():
        p90 = statistics.quantiles(ts, n=10)[-1]
        print(f"{label:<36} {what:<10} {statistics.median(ts):9.1f} {p90:7.1f}")


if __name__ == "__main__":
    main()
