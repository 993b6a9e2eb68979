"""Out-of-distribution detection with a Glow's likelihood (Nalisnick et al. 2019, "Do deep
generative models know what they don't know?") and two corrections of it.

Convention: every score is **higher = more out-of-distribution**, and the metrics treat the
OOD images as the positive class:

* ``bpd``: bits/dim of each image (its negative log-likelihood), seeded dequantisation.
* ``typicality_m{M}``: Nalisnick, Matsukawa, Teh & Lakshminarayanan 2019, "Detecting
  out-of-distribution inputs to deep generative models using typicality": a *batch* of M images
  scores ``|mean bits/dim of the batch − Ĥ|``, with Ĥ the mean bits/dim of held-out
  in-distribution images (their estimate of the entropy, the centre of the typical set). Each set
  is cut into disjoint batches of M images (seeded shuffle), so the metrics count batches.
* ``complexity``: Serrà et al. 2020, "Input complexity and out-of-distribution detection with
  likelihood-based generative models": ``S(x) = bpd(x) − L(x)``, with ``L(x)`` the length in
  bits of the image losslessly compressed as PNG (PIL, compress_level=9), per dimension — a
  likelihood ratio against a generic image compressor. The whole PNG file is counted, so its
  fixed overhead (~60 bytes) adds the same amount to ``L`` of every image of one size; that does
  not change any ranking or metric.

Metrics (scikit-learn): ``auroc``; ``aupr`` (average precision with OOD as positive, sometimes
called AUPR-Out); ``fpr_at_95_tpr``, the fraction of in-distribution inputs flagged at the
threshold that flags 95% of the OOD inputs. Non-finite scores count as the most OOD.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import preprocess as pp
from ..files import write_json_atomic
from ..model import Glow
from .images import data_max_level

NOISE_CHUNK = 1024  # dequantisation noise is drawn per chunk of this many images, whatever the batch size


# ---------------------------------------------------------------------------- scores
@torch.no_grad()
def scores_bpd(model: Glow, images_uint8: torch.Tensor, batch_size: int = 256, seed: int = 0,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Bits/dim of every image (float64, CPU, shape (N,)).

    The dequantisation noise ``U(0, 1/n_bins)`` comes from a CPU generator seeded with ``seed``,
    drawn in chunks of :data:`NOISE_CHUNK` images, so the scores depend on the seed but not on
    ``batch_size`` or the device. A class-conditional model without ``labels`` is scored by its
    marginal ``p(x) = Σ_y p(x|y) / num_classes`` (uniform class prior), the only likelihood that
    applies to unlabelled OOD inputs.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise TypeError("images must be a uint8 tensor (N, C, H, W)")
    if tuple(images_uint8.shape[1:]) != tuple(model.config.image_shape):
        raise ValueError(f"images of shape {tuple(images_uint8.shape[1:])} do not fit the model's "
                         f"{tuple(model.config.image_shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = model.device, model.dtype
    config = model.config
    n_bits, k = config.n_bits, config.num_classes
    if labels is not None and not k:
        raise ValueError("this model is not class-conditional: do not pass labels")
    gen = torch.Generator().manual_seed(seed)
    out = []
    n = images_uint8.shape[0]
    for c0 in range(0, n, NOISE_CHUNK):
        chunk = images_uint8[c0 : c0 + NOISE_CHUNK].cpu()
        x_chunk = pp.dequantize(pp.preprocess(chunk, n_bits), n_bits, gen)
        for b0 in range(0, chunk.shape[0], batch_size):
            x = x_chunk[b0 : b0 + batch_size].to(device=device, dtype=dtype)
            if not k:
                lp = model.log_prob(x)
            elif labels is not None:
                y = torch.as_tensor(labels[c0 + b0 : c0 + b0 + x.shape[0]], dtype=torch.long).to(device)
                lp = model.log_prob(x, y)
            else:
                lps = torch.stack([model.log_prob(x, torch.full((x.shape[0],), c, dtype=torch.long, device=device))
                                   for c in range(k)])
                lp = torch.logsumexp(lps.double(), 0) - math.log(k)
            out.append(pp.bits_per_dim_from_log_prob(lp.double(), config.n_dims, n_bits).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def png_bits_per_dim(images_uint8: torch.Tensor, n_bits: int | None = None) -> torch.Tensor:
    """``L(x)``: bits of each image's PNG file (PIL, compress_level=9) per dimension (float64 (N,)).
    With ``n_bits``, the image is first reduced to ``n_bits`` (low bits cleared) — what the model
    sees. Grey images are stored as 8-bit grey, colour as RGB."""
    from PIL import Image

    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] not in (1, 3):
        raise TypeError("images must be a uint8 tensor (N, 1 or 3, H, W)")
    x = images_uint8.cpu()
    if n_bits is not None:
        x = pp.to_uint8(pp.preprocess(x, n_bits), n_bits)
    arr = x.permute(0, 2, 3, 1).numpy()
    dims = arr[0].size if len(arr) else 1
    out = torch.empty(len(arr), dtype=torch.float64)
    for i, a in enumerate(arr):
        img = Image.fromarray(np.ascontiguousarray(a[:, :, 0] if a.shape[2] == 1 else a))  # L or RGB
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=9)
        out[i] = 8.0 * buf.tell() / dims
    return out


def complexity_scores(bpd: torch.Tensor, images_uint8: torch.Tensor, n_bits: int | None = None) -> torch.Tensor:
    """Serrà et al.'s ``S(x) = bpd(x) − L(x)`` from precomputed bits/dim (higher = more OOD)."""
    return bpd.double().cpu() - png_bits_per_dim(images_uint8, n_bits)


def typicality_scores(bpd: torch.Tensor, reference_bpd: float, m: int, seed: int = 0) -> torch.Tensor:
    """Nalisnick et al.'s typicality test statistic of disjoint batches of ``m`` images:
    ``|mean bpd of the batch − reference_bpd|`` (float64, ``len(bpd) // m`` batches; the images
    are shuffled with ``seed`` first and a remainder of fewer than ``m`` is dropped)."""
    if m < 1:
        raise ValueError(f"the typicality batch size must be >= 1, got {m}")
    bpd = bpd.double().cpu()
    n_batches = bpd.numel() // m
    perm = torch.randperm(bpd.numel(), generator=torch.Generator().manual_seed(seed))
    batches = bpd[perm[: n_batches * m]].reshape(n_batches, m)
    return (batches.mean(1) - float(reference_bpd)).abs()


# ---------------------------------------------------------------------------- metrics
def _labels_and_scores(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    s_in = np.asarray(torch.as_tensor(scores_in).double().cpu(), dtype=np.float64).reshape(-1)
    s_out = np.asarray(torch.as_tensor(scores_out).double().cpu(), dtype=np.float64).reshape(-1)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    s = np.concatenate([s_in, s_out])
    big = np.finfo(np.float64).max
    s = np.nan_to_num(s, nan=big, posinf=big, neginf=-big)  # non-finite = most OOD (NaN), or least (-inf)
    y = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    return y, s


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve, OOD positive, higher score = more OOD: the probability that a
    random OOD input scores above a random in-distribution one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    y, s = _labels_and_scores(scores_in, scores_out)
    return float(roc_auc_score(y, s))


def aupr(scores_in, scores_out) -> float:
    """Area under the precision-recall curve (average precision), OOD positive."""
    from sklearn.metrics import average_precision_score

    y, s = _labels_and_scores(scores_in, scores_out)
    return float(average_precision_score(y, s))


def fpr_at_95_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """False-positive rate (in-distribution inputs flagged) at the highest threshold that flags at
    least ``tpr`` of the OOD inputs (flagged: score >= threshold)."""
    from sklearn.metrics import roc_curve

    y, s = _labels_and_scores(scores_in, scores_out)
    fpr, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    i = int(np.searchsorted(tprs, tpr - 1e-12, side="left"))
    return float(fpr[min(i, len(fpr) - 1)])


def metrics(scores_in, scores_out) -> dict[str, float]:
    return {"auroc": auroc(scores_in, scores_out), "aupr": aupr(scores_in, scores_out),
            "fpr_at_95_tpr": fpr_at_95_tpr(scores_in, scores_out)}


# ---------------------------------------------------------------------------- OOD sets
def flipped(x_uint8: torch.Tensor) -> torch.Tensor:
    """Images upside down (flipped along the height)."""
    return x_uint8.flip(-2).contiguous()


def inverted(x_uint8: torch.Tensor, n_bits: int, max_level: int | None = None) -> torch.Tensor:
    """Intensities inverted within the data's own range, in ``n_bits`` bins:
    ``bin -> max_level - bin``, stored back as ``bin * 2**(8 - n_bits)``. ``max_level`` defaults to
    the largest bin in ``x_uint8`` (one value for the whole tensor), so data that use part of the
    range stay in it: the digits (levels 0..16 stored as ``level * 8``, ``n_bits=5``) invert as
    ``128 - x``; full-range 8-bit data as ``255 - x``."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x_uint8.dtype}")
    shift = 8 - n_bits
    levels = x_uint8.to(torch.int32) >> shift
    top = int(levels.max()) if max_level is None else int(max_level)
    if not 0 <= top < 2**n_bits:
        raise ValueError(f"max_level must be in 0..{2**n_bits - 1}, got {top}")
    return ((top - levels).clamp_(0, top) << shift).to(torch.uint8)


def uniform_noise(n: int, shape: Sequence[int], n_bits: int, seed: int = 0,
                  max_level: int | None = None) -> torch.Tensor:
    """``n`` images of independent uniform bins ``0..max_level`` (default ``2**n_bits - 1``),
    stored as ``bin * 2**(8 - n_bits)`` (uint8 (n, *shape)), seeded."""
    top = 2**n_bits - 1 if max_level is None else int(max_level)
    if not 0 <= top < 2**n_bits:
        raise ValueError(f"max_level must be in 0..{2**n_bits - 1}, got {top}")
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, top + 1, (n, *shape), generator=gen, dtype=torch.int32)
    return (levels << (8 - n_bits)).to(torch.uint8)


TRANSFORMS = ("flipped", "inverted", "noise")
# A metric from fewer scores than this on either side (images, or typicality batches) is flagged: an
# AUROC from n_in x n_out pairs moves in steps of 1/(n_in n_out), and from 1 or 2 batches is 0 or 1.
MIN_SCORES = 20


def ood_sets(x_in: torch.Tensor, n_bits: int, transforms: Sequence[str] = TRANSFORMS, datasets: Sequence[str] = (),
             folders: Sequence[str] = (), split: str = "test", data_dir: str | None = None, download: bool = False,
             max_images: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """OOD sets of uint8 images shaped like the in-distribution images ``x_in`` (N, C, H, W):

    * ``transforms`` of ``x_in`` (:data:`TRANSFORMS`): :func:`flipped`, :func:`inverted` and
      :func:`uniform_noise` over the bins ``x_in`` uses (N images);
    * ``datasets``: the ``split`` of other data sets (:func:`torchglow.data.load_dataset`),
      converted to the channels and size of ``x_in``;
    * ``folders``: every image of each folder (all of its splits), named ``folder:PATH``.

    Data sets and folders give at most ``max_images`` images each (seeded choice; 0: all).
    Raises ValueError for an unknown transform and :class:`~torchglow.data.DatasetError` for data
    that cannot be loaded or converted."""
    from ..data import load_dataset, pick_indices

    unknown = sorted(set(transforms) - set(TRANSFORMS))
    if unknown:
        raise ValueError(f"unknown OOD transform(s) {', '.join(unknown)}; choose from {', '.join(TRANSFORMS)}")
    top = data_max_level(x_in, n_bits)
    make = {"flipped": lambda: flipped(x_in), "inverted": lambda: inverted(x_in, n_bits, top),
            "noise": lambda: uniform_noise(x_in.shape[0], x_in.shape[1:], n_bits, seed=seed, max_level=top)}
    sets = {t: make[t]() for t in dict.fromkeys(transforms)}
    c, h, _ = x_in.shape[1:]
    for name in dict.fromkeys(datasets):
        ds = load_dataset(name, split, data_dir=data_dir, download=download, image_size=h, channels=c)
        sets[ds.name] = ds.take(pick_indices(len(ds), max_images, seed))[0]
    for folder in dict.fromkeys(folders):
        ds = load_dataset(f"folder:{folder}", "all", image_size=h, channels=c)
        sets[f"folder:{folder}"] = ds.take(pick_indices(len(ds), max_images, seed))[0]
    return sets


# ---------------------------------------------------------------------------- report
def _histogram(values: dict[str, torch.Tensor], in_name: str, path: Path, xlabel: str, title: str) -> None:
    """One panel per OOD set, overlaid on the in-distribution histogram with bins spanning just
    those two sets: on a shared axis, far-away sets (noise) squeeze the close ones into a few bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = {k: v[torch.isfinite(v)].numpy() for k, v in values.items()}
    others = [k for k in finite if k != in_name]
    fig = Figure(figsize=(7, 2.6 * max(len(others), 1)))
    FigureCanvasAgg(fig)
    for i, name in enumerate(others or [in_name]):
        ax = fig.add_subplot(max(len(others), 1), 1, i + 1)
        pair = {k: finite[k] for k in dict.fromkeys([in_name, name])}
        allv = np.concatenate([v for v in pair.values() if v.size] or [np.zeros(1)])
        lo, hi = float(allv.min()), float(allv.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 51)
        for k, v in pair.items():
            if v.size:
                ax.hist(v, bins=bins, density=True, alpha=0.5, label=f"{k} (n={v.size})", histtype="stepfilled")
        ax.set_ylabel("density")
        ax.set_title(f"{title}: {in_name} vs {name}" if name != in_name else title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _table(rows: list[tuple[str, str, dict[str, float]]], few: set[tuple[str, str]] = frozenset()) -> str:
    """The printed table; rows in ``few`` (set, score) are marked ``*``, with a footnote."""
    w1 = max([len("OOD set")] + [len(r[0]) for r in rows])
    w2 = max([len("score")] + [len(r[1]) for r in rows])
    lines = [f"{'OOD set':<{w1}}  {'score':<{w2}}  {'AUROC':>6}  {'AUPR':>6}  {'FPR@95':>6}"]
    for name, score, m in rows:
        mark = "  *" if (name, score) in few else ""
        lines.append(f"{name:<{w1}}  {score:<{w2}}  {m['auroc']:6.3f}  {m['aupr']:6.3f}  "
                     f"{m['fpr_at_95_tpr']:6.3f}{mark}")
    if few:
        lines.append(f"* from fewer than {MIN_SCORES} scores on one side (images, or batches of M for typicality): "
                     f"noisy; score more images (`in_split` all, `max_images` 0)")
    return "\n".join(lines)


def _stats(v: torch.Tensor) -> dict[str, Any]:
    f = v[torch.isfinite(v)]
    return {"n": int(v.numel()), "nonfinite": int(v.numel() - f.numel()),
            "mean": float(f.mean()) if f.numel() else None, "std": float(f.std()) if f.numel() > 1 else None}


def _typicality_reference(model: Glow, in_bpd: torch.Tensor, in_reference: torch.Tensor | None, batch_size: int,
                          seed: int) -> tuple[float, torch.Tensor, str]:
    """Ĥ (the mean finite bits/dim of held-out in-distribution images), the in-distribution bits/dim
    the typicality batches are made of, and where Ĥ came from: ``in_reference``, or one half of a
    seeded shuffle of the in-distribution images, whose other half makes the batches."""
    if in_reference is not None:
        reference_bpd, batch_bpd, reference = scores_bpd(model, in_reference, batch_size, seed), in_bpd, "in_reference"
    else:
        perm = torch.randperm(in_bpd.shape[0], generator=torch.Generator().manual_seed(seed))
        half = in_bpd.shape[0] // 2
        reference_bpd, batch_bpd, reference = in_bpd[perm[:half]], in_bpd[perm[half:]], "half of in_images"
    finite = reference_bpd[torch.isfinite(reference_bpd)]
    if finite.numel() == 0:
        raise ValueError("no finite bits/dim on the in-distribution reference images")
    return float(finite.mean()), batch_bpd, reference


def _set_metrics(scores: dict[str, dict[str, torch.Tensor]], in_name: str, name: str, typicality_in: dict,
                 h_hat: float, seed: int) -> tuple[dict[str, Any], list[str], set[tuple[str, str]]]:
    """The metrics of OOD set ``name`` against ``in_name`` for every score, the scores skipped (as
    lines of the summary's ``skipped``) and the (set, score) pairs from fewer than :data:`MIN_SCORES`."""
    bpd, complexity = scores["bpd"], scores["complexity"]
    skipped: list[str] = []
    few: set[tuple[str, str]] = set()
    res = {"bpd": metrics(bpd[in_name], bpd[name]), "complexity": metrics(complexity[in_name], complexity[name])}
    for m, t_in in typicality_in.items():
        t_out = typicality_scores(bpd[name], h_hat, m, seed)
        if t_in.numel() == 0 or t_out.numel() == 0:
            skipped.append(f"typicality_m{m} for {name}: fewer than {m} images")
            continue
        res[f"typicality_m{m}"] = {**metrics(t_in, t_out), "batches_in": int(t_in.numel()),
                                   "batches_out": int(t_out.numel())}
        if min(t_in.numel(), t_out.numel()) < MIN_SCORES:
            few.add((name, f"typicality_m{m}"))
    if min(bpd[in_name].numel(), bpd[name].numel()) < MIN_SCORES:
        few.update((name, score) for score in ("bpd", "complexity"))
    return res, skipped, few


@torch.no_grad()
def ood_report(model: Glow, in_images: torch.Tensor, out_sets: dict[str, torch.Tensor], out_dir: str | Path,
               batch_size: int = 256, seed: int = 0, typicality_m: int | Sequence[int] = (2, 10),
               in_reference: torch.Tensor | None = None, in_name: str = "in-distribution",
               verbose: bool = True, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score in-distribution test images against OOD sets with ``bpd``, ``typicality_m{M}`` (one
    per M in ``typicality_m``) and ``complexity``; AUROC, AUPR and FPR@95%TPR for every pair.

    Typicality needs held-out in-distribution images for Ĥ: ``in_reference`` (e.g. training or
    validation images). Without it, ``in_images`` is split by a seeded shuffle: one half
    estimates Ĥ, the other half's batches are the in-distribution side of the typicality metrics
    (``bpd`` and ``complexity`` always use all of ``in_images``).

    Writes ``ood.json``, ``bpd_hist.png`` (bits/dim histograms, one panel per OOD set against
    the in-distribution set) and ``complexity_hist.png``; prints the table when ``verbose``;
    returns the summary, whose ``"table"`` is the printed table, with ``info`` added. A metric from
    fewer than :data:`MIN_SCORES` scores on either side is marked ``*`` in the table, listed under
    ``caveats`` and warned about.
    """
    if not out_sets:
        raise ValueError("give at least one OOD set")
    if in_name in out_sets:
        raise ValueError(f"an OOD set may not be called {in_name!r}")
    ms = [typicality_m] if isinstance(typicality_m, int) else list(typicality_m)
    n_bits = model.config.n_bits
    out_dir = Path(out_dir)
    sets = {in_name: in_images, **out_sets}
    bpd = {k: scores_bpd(model, v, batch_size, seed) for k, v in sets.items()}
    png = {k: png_bits_per_dim(v, n_bits) for k, v in sets.items()}
    scores = {"bpd": bpd, "complexity": {k: bpd[k] - png[k] for k in sets}}
    h_hat, batch_bpd, reference = _typicality_reference(model, bpd[in_name], in_reference, batch_size, seed)
    typicality_in = {m: typicality_scores(batch_bpd, h_hat, m, seed) for m in ms}
    results, skipped, few = {}, [], set()
    for name in out_sets:
        results[name], set_skipped, set_few = _set_metrics(scores, in_name, name, typicality_in, h_hat, seed)
        skipped += set_skipped
        few |= set_few
    rows = [(name, score, mm) for name, res in results.items() for score, mm in res.items()]
    table = _table(rows, few)
    _histogram(bpd, in_name, out_dir / "bpd_hist.png", "bits/dim", "bits/dim per image")
    _histogram(scores["complexity"], in_name, out_dir / "complexity_hist.png", "S(x) = bits/dim - PNG bits/dim",
               "input-complexity score")
    summary = {
        "tool": "ood", "convention": "higher score = more OOD; OOD is the positive class",
        "seed": seed, "n_bits": n_bits, "typicality_m": ms, "typicality_reference": reference,
        "typicality_reference_bpd": h_hat, "bpd": {k: _stats(v) for k, v in bpd.items()},
        "png_bits_per_dim": {k: _stats(v) for k, v in png.items()},
        "complexity": {k: _stats(v) for k, v in scores["complexity"].items()}, "metrics": results,
        "skipped": skipped, "caveats": [f"{score} of {name}: fewer than {MIN_SCORES} scores on one side"
                                        for name, score in sorted(few)],
        "min_scores": MIN_SCORES, "table": table,
        "files": [str(out_dir / "bpd_hist.png"), str(out_dir / "complexity_hist.png"), str(out_dir / "ood.json")],
        **(info or {}),
    }
    write_json_atomic(out_dir / "ood.json", summary)
    if verbose:
        print(table)
    if few:
        warnings.warn(f"{len(few)} of the {len(rows)} OOD metrics rest on fewer than {MIN_SCORES} scores on one "
                      f"side (marked *, listed under caveats in ood.json)", stacklevel=2)
    return summary
