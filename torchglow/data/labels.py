"""Per-image binary attribute labels for the latent tools, from one of three sources: a data set's
class labels ("has class C"), a labels CSV matched on image ids, or a data set's own attributes
(CelebA). :func:`labels_for` picks the source; the others read one each."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch


def bool_labels(labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() == 1:
        labels = labels[:, None]
    if labels.dim() != 2:
        raise ValueError(f"attribute labels must be (N,) or (N, A), got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        return labels
    values = set(torch.unique(labels).tolist())
    if not values <= {-1, 0, 1}:
        raise ValueError(f"attribute labels must be boolean, 0/1 or -1/1, got values {sorted(values)[:10]}")
    return labels > 0


def binary_labels_from_classes(labels, positive_class: int | Sequence[int]) -> tuple[torch.Tensor, list[str]]:
    """One attribute from class labels: True where the label is ``positive_class`` (or one of
    them), e.g. "digit 3" against every other digit. Returns (bool (N, 1), ["class_3"])."""
    labels = torch.as_tensor(labels).reshape(-1)
    pos = [positive_class] if isinstance(positive_class, int) else list(positive_class)
    mask = torch.isin(labels, torch.as_tensor(pos, dtype=labels.dtype))
    return mask[:, None], ["class_" + "_".join(str(p) for p in pos)]


_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "-1", "false", "no", "n", "f"}


def labels_from_csv(path: str | Path, ids: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """Per-image binary attributes from a CSV file.

    Format: a header row; the first column is an image id (e.g. a file name), every other column
    one attribute, named by its header, with values ``1`` (has it) or ``0`` / ``-1`` (has not);
    ``true``/``false`` and ``yes``/``no`` are accepted too. Comma, semicolon or tab separated.
    Kaggle's CelebA ``list_attr_celeba.csv`` (``image_id,5_o_Clock_Shadow,...`` with -1/1) is in
    this format.

    Rows come in file order; pass ``ids`` (the data set's image ids, in its order) to get one row
    per id in that order (every id must be in the file). Returns (bool (N, A), attribute names).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read labels file {path}: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a header row and at least one row of labels")
    delimiter = max(",;\t", key=lines[0].count)
    rows = list(csv.reader(lines, delimiter=delimiter))
    header, body = [h.strip() for h in rows[0]], rows[1:]
    names = header[1:]
    if not names:
        raise ValueError(f"{path}: no attribute columns after the id column")
    row_ids, values = [], []
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
        row_ids.append(row[0].strip())
        vals = []
        for name, v in zip(names, row[1:]):
            v = v.strip().lower()
            if v in _TRUE:
                vals.append(True)
            elif v in _FALSE:
                vals.append(False)
            else:
                raise ValueError(f"{path}:{lineno}: attribute {name!r} has value {v!r}; use 1 or 0/-1")
        values.append(vals)
    labels = torch.tensor(values, dtype=torch.bool)
    if ids is not None:
        index = {r: i for i, r in enumerate(row_ids)}
        missing = [i for i in ids if str(i) not in index]
        if missing:
            raise ValueError(f"{path}: {len(missing)} image id(s) not in the file, e.g. {missing[:3]}")
        labels = labels[torch.tensor([index[str(i)] for i in ids], dtype=torch.long)]
    return labels, names


def attribute_labels(dataset) -> tuple[torch.Tensor, list[str]]:
    """(bool (N, A), names) from a data set with an ``attributes`` tensor (N, A) of -1/1, 0/1 or
    bool values (CelebA), its names from ``attribute_names`` when present."""
    attrs = getattr(dataset, "attributes", None)
    if attrs is None:
        raise ValueError("this data set has no per-image attributes: use class labels or a CSV of labels")
    labels = bool_labels(attrs)
    names = getattr(dataset, "attribute_names", None)
    names = [str(n) for n in names if str(n)] if names is not None else [f"attr_{i}" for i in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} attribute names for {labels.shape[1]} attributes")
    return labels, names


def image_ids(dataset) -> list[str]:
    """The ids a labels CSV names images by: file names for file-backed data sets (CelebA's
    ``000001.jpg``), else the image's 0-based index in the split."""
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return [Path(q).name for q in paths]
    return [str(i) for i in range(len(dataset))]


def select_attributes(names: Sequence[str], wanted: Sequence[str] | None, where: str) -> list[str]:
    """``wanted`` (in order, without repeats) or, when none is asked for, all ``names``; ValueError
    naming ``where`` for an attribute it does not have."""
    if not wanted:
        return list(names)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        shown = ", ".join(names[:50]) + (", ..." if len(names) > 50 else "")
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)} in {where}; available: {shown}")
    return list(dict.fromkeys(wanted))


def _class_index(dataset, cls: int | str) -> int:
    """The label of class ``cls`` of ``dataset``: a class name, or its index (an int or digits)."""
    names = getattr(dataset, "class_names", None) or []
    if isinstance(cls, str) and cls in names:
        return names.index(cls)
    if isinstance(cls, int) or str(cls).isdigit():
        if 0 <= int(cls) < dataset.num_classes:
            return int(cls)
    known = (f"is not a class of {dataset.name} (" + (", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
             + f", or 0..{dataset.num_classes - 1})" if names else f"0..{dataset.num_classes - 1})"))
    raise LabelsError(f"`classes` {cls} {known}")


class LabelsError(ValueError):
    """Attribute labels that cannot come from the source asked for; the message names the
    parameters of :func:`labels_for` in backticks (`` `classes` ``, `` `csv_path` ``, `` `attributes` ``)."""


def labels_for(dataset, index, classes: Sequence[int | str] | None = None, csv_path: str | Path | None = None,
               attributes: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str], str]:
    """Binary attribute labels (len(index), A) of the images of ``dataset`` at ``index``, their names
    and where they came from, from exactly one source:

    * ``classes``: one attribute per class C (a class name or its index), "has class C"
      (:func:`binary_labels_from_classes`), named ``class_<its name>`` (``class_<index>`` without names);
    * ``csv_path``: a labels CSV (:func:`labels_from_csv`) matched on :func:`image_ids`;
    * neither: the data set's own per-image attributes (CelebA), of which ``attributes`` must name
      the ones to use.

    ``attributes`` picks among the CSV's or the data set's attributes. Raises :class:`LabelsError`
    when the source does not fit the data set, ValueError for a CSV that cannot be read or an
    attribute it does not have."""
    index = torch.as_tensor(index, dtype=torch.long)
    if classes is not None:
        if attributes:
            raise LabelsError("`attributes` picks among data set, CSV or saved attributes; "
                              "`classes` already names its attribute(s)")
        if not dataset.num_classes or (torch.as_tensor(dataset.labels) < 0).all():
            raise LabelsError(f"data set {dataset.name} has no class labels: `classes` needs a labelled "
                              f"data set (use `csv_path` or, for CelebA, `attributes`)")
        indices = [_class_index(dataset, c) for c in classes]
        labels = torch.as_tensor(dataset.labels)[index]
        columns = [binary_labels_from_classes(labels, c)[0] for c in dict.fromkeys(indices)]
        class_names = getattr(dataset, "class_names", None)
        names = [f"class_{class_names[c] if class_names else c}" for c in dict.fromkeys(indices)]
        return torch.cat(columns, 1), names, f"classes of {dataset.name}"
    if csv_path is not None:
        labels, names = labels_from_csv(csv_path, image_ids(dataset))
        source = str(csv_path)
    else:
        if getattr(dataset, "attributes", None) is None:
            missing = f"data set {dataset.name} has no per-image attributes"
            raise LabelsError(f"{missing}: pass `classes` C, `csv_path` FILE or `directions` FILE")
        labels, names = attribute_labels(dataset)
        source = f"attributes of {dataset.name}"
        if not attributes:
            choices = f"to choose among the attributes of {dataset.name}: {', '.join(names[:50])}"
            raise LabelsError(f"pass `attributes` NAME (one or more) {choices}")
    chosen = select_attributes(names, attributes, source)
    return labels[index][:, [names.index(n) for n in chosen]], chosen, source
