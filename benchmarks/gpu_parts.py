"""The parts of ``benchmarks/gpu_check.py`` that each run in a child process (data, exactness,
timings, peak memory, the training run), and :func:`sizes`, the sizes and time caps of each mode.
Imported by gpu_check.py, which puts the checkout on ``sys.path`` first."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from torchglow import bench
from torchglow.config import TrainConfig, preset


def sizes(mode: str) -> dict:
    """Sizes and time caps (seconds) of every part: "full" and "quick" on a GPU, "smoke" on the CPU."""
    if mode == "smoke":
        return dict(overrides=dict(n_steps=2, n_levels=2, hidden_channels=8), train_batches=(4,), graph_batch=4,
                    sample_batch=8, eval_batch=8, memory_batch=4, warmup=1, repeats=2, trained_steps=3,
                    exact_images=8, minutes=0.05, run_batch=8, device="cpu", max_train=None, max_test=None,
                    budget=300, caps=dict(data=60, exactness=60, train=60, graph=60, sample=40, eval=40, memory=40))
    full = mode == "full"
    return dict(overrides={}, train_batches=(64, 256) if full else (64,), graph_batch=64, sample_batch=256,
                eval_batch=256, memory_batch=64, warmup=2 if full else 1, repeats=10 if full else 3,
                trained_steps=50 if full else 10, exact_images=64, minutes=3.0 if full else 0.33, run_batch=64,
                device="cuda", max_train=None if full else 5000, max_test=None if full else 1000,
                budget=480 if full else 300,
                caps=dict(data=30, exactness=50, train=90, graph=45, sample=40, eval=75, memory=25) if full else
                dict(data=20, exactness=35, train=75, graph=40, sample=30, eval=30, memory=20))


def _decode_chunk(chunk: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])


def decode_jpeg_npz(s: dict, src: str, dst: str) -> dict:
    """The JPEG-bytes npz decoded on a pool of processes into a torchglow ``.npz`` data set
    (``x`` uint8 NHWC, ``y``, ``split``): ``max_train``/``max_test`` first images of each split."""
    t0 = time.perf_counter()
    with np.load(src) as f:
        data, offsets, y, split = f["data"], f["offsets"], f["y"], f["split"]
    keep = np.concatenate([np.flatnonzero(split == 0)[:s["max_train"]], np.flatnonzero(split == 1)[:s["max_test"]]])
    files = [data[offsets[i]:offsets[i + 1]].tobytes() for i in keep]
    chunks = [files[i:i + 1000] for i in range(0, len(files), 1000)]
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 16)) as pool:
        x = np.concatenate(pool.map(_decode_chunk, chunks))
    np.savez(dst, x=x, y=y[keep], split=split[keep])
    return {"images": len(keep), "train": int((split[keep] == 0).sum()), "test": int((split[keep] == 1).sum()),
            "decode_seconds": time.perf_counter() - t0}


def _images(npz: str, s: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 NCHW images of the decoded copy, or random ones when it is absent."""
    if Path(npz).is_file():
        with np.load(npz) as f:
            x, split = torch.from_numpy(f["x"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(f["split"])
        return x[split == 0].to(device), x[split == 1].to(device)
    shape = preset("cifar10", **s["overrides"]).image_shape
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (512, *shape), dtype=torch.uint8, generator=g).to(device),
            torch.randint(0, 256, (64, *shape), dtype=torch.uint8, generator=g).to(device))


def _reconstruction_error(model, x_uint8: torch.Tensor) -> float:
    """fp32 ``max|x - decode(encode(x))| / max|x|`` in model space (eval mode, no autocast)."""
    from torchglow import preprocess as pp

    model.set_autocast(None)
    model.eval()
    n_bits = model.config.n_bits
    with torch.no_grad():
        x = pp.dequantize(pp.preprocess(x_uint8, n_bits), n_bits)
        z, _ = model.encode(x)
        return float((model.decode(z) - x).abs().max() / x.abs().max())


def _invertible_warnings(model, x_uint8: torch.Tensor, steps: int) -> dict:
    """ReconstructionWarnings of ``steps`` eager fp32 training steps of a copy of ``model`` with
    ``memory="invertible"``, and the largest relative error they report."""
    import copy
    import re

    from torchglow.memory import ReconstructionWarning
    from torchglow.train.step import TrainStep

    model = copy.deepcopy(model)
    model.set_autocast(None)
    model.set_memory("invertible")
    model.train()
    cfg = TrainConfig(batch_size=len(x_uint8), lr=1e-4, warmup_images=0, memory="invertible", ema=False)
    step = TrainStep(model, cfg, beta2=0.999)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            step(x_uint8)
    found = [w for w in caught if issubclass(w.category, ReconstructionWarning)]
    errors = [float(m.group(1)) for w in found if (m := re.search(r"relative error ([0-9.eE+-]+)", str(w.message)))]
    return {"warnings": len(found), "steps": steps, "max_relative_error": max(errors, default=None)}


def exactness(s: dict, npz: str) -> dict:
    """fp32 reconstruction of a fresh and a trained cifar10 model, and the invertible backward's warnings."""
    from torchglow import preprocess as pp
    from torchglow.model import Glow
    from torchglow.train.step import TrainStep, compile_step

    dev = torch.device(s["device"])
    torch.manual_seed(0)
    train_x, test_x = _images(npz, s, dev)
    test_x, batch = test_x[:s["exact_images"]], s["memory_batch"]
    model = Glow(preset("cifar10", **s["overrides"])).to(dev)
    n_bits = model.config.n_bits
    model.initialize(pp.dequantize(pp.preprocess(train_x[:256], n_bits), n_bits))
    result = {"tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              "fresh": {"relative_error": _reconstruction_error(model, test_x),
                        "invertible": _invertible_warnings(model, train_x[:batch], 3)}}
    model.train()
    model.set_autocast(torch.bfloat16)
    cfg = TrainConfig(batch_size=batch, lr=1e-3, warmup_images=batch * s["trained_steps"] // 2, precision="bf16")
    fn = compile_step(TrainStep(model, cfg, beta2=0.999), "graph")
    for i in range(s["trained_steps"]):
        start = (i * batch) % (len(train_x) - batch)
        out = fn(train_x[start:start + batch])
    result["trained"] = {"steps": s["trained_steps"], "last_loss": float(out["loss"]),
                         "relative_error": _reconstruction_error(model, test_x),
                         "invertible": _invertible_warnings(model, train_x[:batch], 3)}
    return result


def time_phase(s: dict, phase: str, batch: int, compile_mode: str = "regional") -> dict:
    """Eager fp32 against the fast path, interleaved (``torchglow bench --compare``), kernels per call
    counted: training with the fast step in bf16, sampling and evaluation in fp32."""
    config = bench.BenchConfig("cifar10", batch, s["device"], overrides=s["overrides"], warmup=s["warmup"],
                               repeats=s["repeats"], compare=True, compile_mode=compile_mode,
                               fast_precision="bf16" if phase == "train" else None)
    r = bench.measure_phase(config, phase)
    return {k: r[k] for k in ("eager", "fast", "speedup", "compile_seconds", "graphed", "capture_seconds",
                              "capture_failure", "peak_cuda_mb") if k in r}


def peak_memory(s: dict, memory: str) -> dict:
    """Peak CUDA memory (MiB) of the fast training step (bf16, compile_mode "graph": captured when
    the memory mode allows) over 3 steps, and its reconstruction warnings (CPU: not measured)."""
    from torchglow.memory import ReconstructionWarning

    dev = torch.device(s["device"])
    config = bench.BenchConfig("cifar10", s["memory_batch"], s["device"], precision="bf16", overrides=s["overrides"],
                               memory=memory, fast=True, compile_mode="graph")
    built = bench.build(config)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    fn = bench.train_step(config, built)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fn()
    result = {"graphed": fn.graphed is not None and fn.graphed.captured,
              "reconstruction_warnings": sum(issubclass(w.category, ReconstructionWarning) for w in caught)}
    if dev.type != "cuda":
        return {**result, "peak_mb": None, "note": "CPU: peak CUDA memory is not measured"}
    torch.cuda.synchronize(dev)
    return {**result, "peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20}


def timed_run(s: dict, npz: str, work: str, out: str, minutes: float, compile_mode: str) -> dict:
    """``torchglow.train.loop`` for ``minutes``, bf16 on the fast path, then the test bits/dim of the EMA
    weights on every test image; the run's summary, metrics, last sample grid and curve into ``out``."""
    from torchglow.tools.evaluate import plot_curves
    from torchglow.train.loop import train

    run_dir, out = Path(work) / "run", Path(out)
    model_config = preset("cifar10", **s["overrides"])
    cfg = TrainConfig(dataset=npz, out=str(run_dir), overwrite=True, epochs=1000, max_minutes=minutes,
                      batch_size=s["run_batch"], lr=1e-3, warmup_images=50_000, precision="bf16", fast=True,
                      compile_mode=compile_mode, eval_every=1000, log_every=20, device=s["device"], num_workers=0,
                      sample_temperatures=(0.7,))
    result = train(model_config, cfg, progress=False)
    shutil.copy(run_dir / "summary.json", out / "run_summary.json")
    shutil.copy(run_dir / "metrics.jsonl", out / "run_metrics.jsonl")
    grids = sorted((run_dir / "samples").glob("*.png"))
    if grids:
        shutil.copy(grids[-1], out / "samples.png")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plot_curves(records, out / "curve.png", result.summary.get("baseline_bpd"), x_keys=("time_s", "images"))
    curve = [{k: r[k] for k in ("step", "images", "time_s", "train_bpd" if "train_bpd" in r else "test_bpd")}
             for r in records if "train_bpd" in r or "test_bpd" in r]
    return {"summary": result.summary, "minutes": minutes, "train_config": cfg.to_dict(), "curve": curve,
            "scored_weights": "EMA (with warm-up)" if cfg.ema else "raw"}


PARTS = {"data": decode_jpeg_npz, "exactness": exactness, "time_phase": time_phase, "peak_memory": peak_memory,
         "run": timed_run}
