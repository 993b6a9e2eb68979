"""One GPU session's measurements of torchglow, in one command: at most 8 minutes on one GPU.

    python benchmarks/gpu_check.py OUT_DIR [--npz benchmarks/data/cifar10_jpegq75_bytes.npz] [--quick | --smoke]

Every part runs in its own Python process with its own time cap (killed at the cap, recorded as an
error, the next part goes on), all within a total budget (``--budget``, 480 s), in this order:

1. ``data``: the CIFAR-10 JPEG copy (``data``/``offsets``/``y``/``split``) decoded with Pillow on
   a process pool into an ``.npz`` data set of torchglow (in a temporary folder).
2. ``exactness``: fp32 on CUDA, the cifar10 preset: ``decode(encode(x))`` relative error
   ``max|x - x'| / max|x|`` on 64 test images of a freshly initialised model and of the same model
   after 50 training steps (the graphed bf16 step); the ``ReconstructionWarning`` count of the
   invertible backward (``memory="invertible"``, fp32, eager) over 3 steps of each.
3. ``train_b64``, ``train_b256``: the training step, eager fp32 against the fast path (bf16, flow
   steps compiled regionally inside one CUDA graph of the step), interleaved rounds
   (:func:`torchglow.bench.measure_phase`), with kernels per step (:func:`torchglow.bench.count_ops`)
   and the fast step's compile + capture time; ``train_graph_b64``: the same with
   ``compile_mode="graph"`` (the eager step's kernels in the graph, no compilation).
4. ``sample_b256``, ``eval_b256``, ``eval_graph_b256``: eager against
   :func:`torchglow.tools.fast.fast_sampler` (the decode as a CUDA graph) and
   :func:`torchglow.tools.fast.fast_forward` (its flow steps compiled, then captured; ``eval_graph``: the
   eager kernels captured), fp32.
5. ``memory_none_b64``, ``memory_invertible_b64``: peak ``torch.cuda.max_memory_allocated`` of the
   fast training step (bf16) in each memory mode, capture included, and its reconstruction warnings.
6. ``run``: ``torchglow.train.loop`` for ``--minutes`` (3, shortened when the budget is short) on the
   JPEG copy, bf16 on the fast path, scored on all 10,000 test images with the EMA weights.

It prints one markdown table at the end and leaves at most 8 files in OUT_DIR, none in a
subfolder: ``gpu_check.json`` (everything measured, with the environment), ``table.md``,
``curve.png`` (the run's bits/dim against seconds and images), ``samples.png`` (its last sample
grid), ``run_summary.json`` and ``run_metrics.jsonl``.

``--quick``: a first call of about 3 minutes on the GPU: batch 64 only, 3 rounds, 10 training
steps before the exactness check, a 20-second run on 5,000/1,000 images; every code path,
capture included. ``--smoke``: the same code paths on the CPU with a tiny model, the "aot_eager"
compile backend and a 3-second run (the test suite runs it).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchglow import bench, graphs  # noqa: E402
from torchglow.config import TrainConfig, preset  # noqa: E402

DEFAULT_NPZ = ROOT / "benchmarks" / "data" / "cifar10_jpegq75_bytes.npz"
PART_GROUPS = ("data", "exactness", "train", "sample", "eval", "memory", "run")
OUT_FILES = ("gpu_check.json", "table.md", "curve.png", "samples.png", "run_summary.json", "run_metrics.jsonl")


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


# --------------------------------------------------------------------------- the parts (each in a child process)
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


def child(name: str, payload: str) -> int:
    """One part in this (child) process: ``payload`` holds the mode, the function's arguments and
    the file for its JSON result."""
    job = json.loads(payload)
    if job["mode"] == "smoke":
        graphs.COMPILE_BACKEND = "aot_eager"
        torch.set_num_threads(1)
    result = PARTS[name](sizes(job["mode"]), *job["args"])
    Path(job["result"]).write_text(json.dumps(result, default=str))
    return 0


# --------------------------------------------------------------------------- the parent
def run_part(report: dict, name: str, fn: str, args: list, cap: float, mode: str, work: Path, deadline: float) -> None:
    """``fn(*args)`` in a child process, killed after ``cap`` seconds or at the ``deadline``;
    its result (or error) recorded in ``report``."""
    timeout = min(cap, deadline - time.perf_counter())
    t0 = time.perf_counter()
    if timeout < 5:
        report["errors"][name] = "skipped: the time budget is spent"
        return
    result_file = work / f"{name}.json"
    payload = json.dumps({"mode": mode, "args": args, "result": str(result_file)})
    print(f"gpu_check: {name} (cap {timeout:.0f} s) ...", flush=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_part", fn, payload],
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its own workers (compile, data)
        proc.wait()
        rc = None
    seconds = time.perf_counter() - t0
    report["part_seconds"][name] = round(seconds, 1)
    if rc is None:
        report["errors"][name] = f"timed out after {timeout:.0f} s (its cap)"
    elif rc != 0 or not result_file.is_file():
        report["errors"][name] = f"failed with exit code {rc} (its traceback is in the log above)"
    else:
        report[name] = json.loads(result_file.read_text())
    print(f"gpu_check: {name} {'done' if name in report else 'FAILED'} in {seconds:.0f} s", flush=True)


def _fmt(v, digits=0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(report: dict) -> str:
    """The one markdown table of the check."""
    rows = ["| part | eager | fast | speed-up | kernels per call, eager → fast | compile + capture s | notes |",
            "|---|---|---|---|---|---|---|"]
    for name in [k for k in report if k.startswith(("train_", "sample_", "eval_"))]:
        r = report[name]
        ke, kf = r["eager"].get("kernels", {}), r["fast"].get("kernels", {})
        kernels = (f"{_fmt(ke.get('cuda_kernels', ke.get('ops')))} → "
                   f"{_fmt(kf.get('cuda_kernels', kf.get('ops')))}"
                   + (f" in {kf['graph_launches']} graph launch(es)" if kf.get("graph_launches") else ""))
        setup = r.get("capture_seconds", r.get("compile_seconds"))
        rows.append(f"| {name} | {_fmt(r['eager']['images_per_s'])} img/s | {_fmt(r['fast']['images_per_s'])} img/s "
                    f"| {r['speedup']:.2f}x | {kernels} | {_fmt(setup, 1)} | "
                    f"{'graphed' if r.get('graphed') else 'not graphed'}"
                    f"{': ' + r['capture_failure'] if r.get('capture_failure') else ''} |")
    if "exactness" in report:
        e = report["exactness"]
        for which in ("fresh", "trained"):
            inv = e[which]["invertible"]
            rows.append(f"| exactness, {which} model | | | | | | fp32 decode(encode(x)) rel. error "
                        f"{e[which]['relative_error']:.2e}; invertible backward: {inv['warnings']} warnings in "
                        f"{inv['steps']} steps" + (f" (max rel. error {inv['max_relative_error']:.2e})"
                                                   if inv["max_relative_error"] is not None else "") + " |")
    for name in [k for k in report if k.startswith("memory_")]:
        m = report[name]
        rows.append(f"| {name} | | | | | | peak {_fmt(m['peak_mb'])} MiB, "
                    f"{'graphed' if m['graphed'] else 'not graphed'}, {m['reconstruction_warnings']} warnings |")
    if "run" in report:
        r = report["run"]["summary"]
        rows.append(f"| run ({report['run']['minutes']:.2f} min) | | | | | | test {_fmt(r.get('test_bpd'), 4)} bits/dim "
                    f"({report['run']['scored_weights']} weights, {r.get('steps')} steps) |")
    for name, error in report["errors"].items():
        rows.append(f"| {name} | | | | | | ERROR: {error} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_part"]:
        return child(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the check's files (at most 8)")
    parser.add_argument("--npz", default=str(DEFAULT_NPZ), help="the CIFAR-10 JPEG-bytes npz")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="a first, short GPU call: every code path, fewer repeats")
    group.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny sizes")
    parser.add_argument("--minutes", type=float, help="length of the training run (default 3; quick 0.33; smoke 0.05)")
    parser.add_argument("--budget", type=float, help="total seconds (default 480; quick 300): every part's cap ends by then")
    parser.add_argument("--parts", nargs="+", choices=PART_GROUPS, default=PART_GROUPS, metavar="PART",
                        help=f"the parts to run, in their fixed order (default all: {' '.join(PART_GROUPS)})")
    parser.add_argument("--run-compile-mode", default="regional", choices=("regional", "graph"),
                        help="compile_mode of the training run's fast step")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = sizes(mode)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + (args.budget or s["budget"])
    report: dict = {"mode": mode, "torch": torch.__version__, "device": s["device"],
                    "device_name": bench.device_name(torch.device(s["device"])), "git_commit": bench.git_commit(),
                    "git_dirty": bench.git_dirty(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "model": preset("cifar10", **s["overrides"]).to_dict(), "errors": {}, "part_seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    npz = str(work / "cifar10_jpegq75.npz")
    caps = s["caps"]

    def part(name, fn, fn_args, cap):
        if name.split("_")[0] not in args.parts:  # its group: train_graph_b64 is of "train"
            return
        run_part(report, name, fn, fn_args, cap, mode, work, deadline)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    try:
        if Path(args.npz).is_file():
            part("data", "data", [args.npz, npz], caps["data"])
        else:
            report["errors"]["data"] = f"no such file: {args.npz} (the exactness check uses random images; no run)"
        part("exactness", "exactness", [npz], caps["exactness"])
        for batch in s["train_batches"]:
            part(f"train_b{batch}", "time_phase", ["train", batch], caps["train"])
        part(f"train_graph_b{s['graph_batch']}", "time_phase", ["train", s["graph_batch"], "graph"], caps["graph"])
        part(f"sample_b{s['sample_batch']}", "time_phase", ["sample", s["sample_batch"]], caps["sample"])
        part(f"eval_b{s['eval_batch']}", "time_phase", ["eval", s["eval_batch"]], caps["eval"])
        part(f"eval_graph_b{s['eval_batch']}", "time_phase", ["eval", s["eval_batch"], "graph"], caps["eval"])
        for memory in ("none", "invertible"):
            part(f"memory_{memory}_b{s['memory_batch']}", "peak_memory", [memory], caps["memory"])
        if Path(npz).is_file():
            # the run gets what the budget leaves, up to --minutes; 45 s for start-up and the final test
            wanted = args.minutes or s["minutes"]
            minutes = min(wanted, (deadline - time.perf_counter() - 45) / 60)
            if minutes >= min(wanted, 0.25):  # a run shorter than 15 s says nothing (unless asked for)
                part("run", "run", [npz, str(work), str(out), minutes, args.run_compile_mode], minutes * 60 + 45)
            else:
                report["errors"]["run"] = "skipped: the time budget is spent"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = table(report)
    (out / "table.md").write_text(text + "\n")
    print(text, flush=True)
    print(f"gpu_check: {report['total_seconds']:.0f} s, {len(report['errors'])} error(s)", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
