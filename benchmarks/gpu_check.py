"""One GPU session's measurements of torchglow, in one command: at most 8 minutes on one GPU.

    python benchmarks/gpu_check.py OUT_DIR [--npz benchmarks/data/cifar10_jpegq75_bytes.npz] [--quick | --smoke]

Every part (its code in ``benchmarks/gpu_parts.py``) runs in its own Python process with its own
time cap (killed at the cap, recorded as an error, the next part goes on), all within a total
budget (``--budget``, 480 s), in this order:

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
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_parts import PARTS, sizes  # noqa: E402
from torchglow import bench, graphs  # noqa: E402
from torchglow.config import preset  # noqa: E402

DEFAULT_NPZ = ROOT / "benchmarks" / "data" / "cifar10_jpegq75_bytes.npz"
PART_GROUPS = ("data", "exactness", "train", "sample", "eval", "memory", "run")
OUT_FILES = ("gpu_check.json", "table.md", "curve.png", "samples.png", "run_summary.json", "run_metrics.jsonl")


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


def check_part(report: dict, name: str, fn: str, args: list, cap: float, mode: str, work: Path, deadline: float) -> None:
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


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _all_parts(part, args: argparse.Namespace, s: dict, report: dict, work: Path, deadline: float) -> None:
    """Every part asked for, in order, through ``part(name, fn, fn_args, cap)``."""
    npz, out, caps = str(work / "cifar10_jpegq75.npz"), Path(args.out), s["caps"]
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_part"]:
        return child(argv[1], argv[2])
    args = _parser().parse_args(argv)
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

    def part(name, fn, fn_args, cap):
        if name.split("_")[0] not in args.parts:  # its group: train_graph_b64 is of "train"
            return
        check_part(report, name, fn, fn_args, cap, mode, work, deadline)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    try:
        _all_parts(part, args, s, report, work, deadline)
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
