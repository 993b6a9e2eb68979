"""One GPU session's measurements of torchglow, in one command (about 7 minutes on one GPU).

    python benchmarks/gpu_check.py OUT_DIR [--npz benchmarks/data/cifar10_jpegq75_bytes.npz] [--smoke]

Writes into OUT_DIR: ``gpu_check.json`` (everything measured, with the environment) and
``curve.png`` (bits/dim of the timed training run against seconds and images), and ``run/`` with that
run's small files (metrics, summary, sample grid; its checkpoints stay in a temporary folder).
Parts, each recorded (and the JSON rewritten) as soon as it ends, even when another fails:

1. ``train``: the cifar10 preset's training step, images/s at batch 64 and 256, eager fp32 and the
   fast path (bf16 coupling networks, compiled step, CUDA graphs), timed in interleaved rounds in
   this process; compile time of the fast step.
2. ``sample``: ``Glow.sample`` at batch 256, eager and through the compiled decode.
3. ``eval``: test bits/dim forward at batch 256, eager and compiled.
4. ``memory``: peak ``torch.cuda.max_memory_allocated`` of a training step at batch 64, memory
   modes "none" and "invertible".
5. ``run``: ``torchglow.train`` (the public API) for ``--minutes`` (4) in bf16 on the fast path on the
   CIFAR-10 JPEG copy (decoded here with Pillow into an ``.npz`` data set), then the test bits/dim on
   all its 10,000 test images. Its bits/dim compare only with other runs on this JPEG copy.
6. ``train_whole_b64``: when time is left (``--whole-after``), the fast step compiled whole
   (``compile_mode="whole"``: one graph, one CUDA graph) against eager fp32 at batch 64.

``--smoke`` runs the same code paths on the CPU with tiny sizes (a small model, batches of 4 and 8,
a 15-second run, the "aot_eager" compile backend instead of inductor's code generation) in well
under two minutes; the test suite runs it on a small npz it writes itself.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchglow import bench  # noqa: E402
from torchglow import step as step_module  # noqa: E402
from torchglow.config import TrainConfig, preset  # noqa: E402

DEFAULT_NPZ = ROOT / "benchmarks" / "data" / "cifar10_jpegq75_bytes.npz"


def sizes(smoke: bool) -> dict:
    """The sizes of every part: the cifar10 preset on a GPU, a tiny model on the CPU (--smoke)."""
    if smoke:
        return dict(overrides=dict(n_steps=2, n_levels=1, hidden_channels=8), train_batches=(4, 8),
                    sample_batch=8, eval_batch=8, memory_batch=4, warmup=2, repeats=3, minutes=0.25,
                    run_batch=8, device="cpu", max_train=512, max_test=64)
    return dict(overrides={}, train_batches=(64, 256), sample_batch=256, eval_batch=256, memory_batch=64,
                warmup=3, repeats=10, minutes=4.0, run_batch=64, device="cuda", max_train=None, max_test=None)


def decode_jpeg_npz(src: Path, dst: Path, max_train: int | None = None, max_test: int | None = None) -> dict:
    """The JPEG-bytes npz (``data``, ``offsets``, ``y``, ``split``) decoded with Pillow into an
    ``.npz`` data set of torchglow (``x`` uint8 NHWC, ``y``, ``split``)."""
    from PIL import Image

    t0 = time.perf_counter()
    with np.load(src) as f:
        data, offsets, y, split = f["data"], f["offsets"], f["y"], f["split"]
    keep = np.concatenate([np.flatnonzero(split == 0)[:max_train], np.flatnonzero(split == 1)[:max_test]])
    x = np.stack([np.asarray(Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                  for i in keep])
    np.savez(dst, x=x, y=y[keep], split=split[keep])
    return {"images": len(keep), "train": int((split[keep] == 0).sum()), "test": int((split[keep] == 1).sum()),
            "decode_seconds": time.perf_counter() - t0}


def time_phase(s: dict, phase: str, batch: int, compile_mode: str = "regional") -> dict:
    """Eager fp32 against the fast path, interleaved (``torchglow bench --compare``): training with
    the fast step in bf16, sampling and evaluation in fp32."""
    r = bench._run_phase(phase, "cifar10", s["overrides"], batch, s["device"], "fp32", "none", False,
                         s["warmup"], s["repeats"], 0, compare=True, compile_mode=compile_mode,
                         fast_precision="bf16" if phase == "train" else None)
    return {k: r[k] for k in ("eager", "fast", "speedup", "compile_seconds")}


def peak_memory(s: dict, memory: str) -> dict:
    """Peak CUDA memory (MiB) of eager fp32 training steps in a memory mode (CPU: not measured)."""
    dev = torch.device(s["device"])
    model, _, x_uint8, y = bench._build("cifar10", s["overrides"], s["memory_batch"], dev, "fp32", memory, 0)
    fn = bench._train_step_fn(model, x_uint8, y, "fp32", memory, False, "regional")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):
        fn()
    if dev.type != "cuda":
        return {"peak_mb": None, "note": "CPU: peak CUDA memory is not measured"}
    torch.cuda.synchronize(dev)
    return {"peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20}


def timed_run(s: dict, npz: Path, work: Path, out: Path) -> dict:
    """``torchglow.train`` for ``s["minutes"]`` minutes, bf16 on the fast path, then the test bits/dim
    (the run in ``work``, its small files copied to ``out/run``)."""
    import shutil

    from torchglow.train import train

    model_config = preset("cifar10", **s["overrides"])
    cfg = TrainConfig(dataset=str(npz), out=str(work / "run"), overwrite=True, epochs=1000,
                      max_minutes=s["minutes"], batch_size=s["run_batch"], lr=1e-3, warmup_images=50_000,
                      precision="bf16", fast=True, eval_every=1000, log_every=20, device=s["device"],
                      num_workers=0, sample_temperatures=(0.7,))
    result = train(model_config, cfg, progress=False)
    (out / "run").mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "bpd.png", "config.json"):
        shutil.copy(work / "run" / name, out / "run" / name)
    shutil.copytree(work / "run" / "samples", out / "run" / "samples", dirs_exist_ok=True)
    return {"summary": result.summary, "train_config": cfg.to_dict(), "model_config": model_config.to_dict()}


def plot_curve(run_dir: Path, path: Path) -> list[dict]:
    """bits/dim against seconds and images (train lines, and the final test score)."""
    from torchglow.evaluate import plot_curves

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    baseline = json.loads((run_dir / "summary.json").read_text())["baseline_bpd"]
    plot_curves(records, path, baseline, x_keys=("time_s", "images"))
    return [{k: r[k] for k in ("step", "images", "time_s", "train_bpd" if "train_bpd" in r else "test_bpd")}
            for r in records if "train_bpd" in r or "test_bpd" in r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for gpu_check.json, curve.png and run/")
    parser.add_argument("--npz", default=str(DEFAULT_NPZ), help="the CIFAR-10 JPEG-bytes npz")
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny sizes")
    parser.add_argument("--minutes", type=float, help="length of the timed training run (default 4; smoke 0.25)")
    parser.add_argument("--whole-after", type=float, default=330.0, metavar="SECONDS",
                        help="measure the whole-step compile only if the other parts ended before this (GPU only)")
    args = parser.parse_args(argv)
    s = sizes(args.smoke)
    if args.minutes is not None:
        s["minutes"] = args.minutes
    if args.smoke:
        step_module.COMPILE_BACKEND = "aot_eager"
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"smoke": args.smoke, "torch": torch.__version__, "device": s["device"],
                    "device_name": bench.device_name(torch.device(s["device"])), "git_commit": bench.git_commit(),
                    "git_dirty": bench.git_dirty(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "model": preset("cifar10", **s["overrides"]).to_dict(), "errors": {}}

    def part(name: str, fn, *a):
        t0 = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception as e:  # one failed part must not cost the others: record it, go on
            report["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        report.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
        print(f"gpu_check: {name} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    npz = work / "cifar10_jpegq75.npz"
    part("data", decode_jpeg_npz, Path(args.npz), npz, s["max_train"], s["max_test"])
    for batch in s["train_batches"]:
        part(f"train_b{batch}", time_phase, s, "train", batch)
    part(f"sample_b{s['sample_batch']}", time_phase, s, "sample", s["sample_batch"])
    part(f"eval_b{s['eval_batch']}", time_phase, s, "eval", s["eval_batch"])
    for memory in ("none", "invertible"):
        part(f"memory_{memory}_b{s['memory_batch']}", peak_memory, s, memory)
    if npz.is_file():
        part("run", timed_run, s, npz, work, out)
        if "run" in report:
            part("curve", plot_curve, out / "run", out / "curve.png")
    if not args.smoke and time.perf_counter() - started < args.whole_after:
        part("train_whole_b64", time_phase, s, "train", 64, "whole")
    report["total_seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k in ("errors", "total_seconds")}, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
