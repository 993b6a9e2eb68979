"""Label sources of the latent tools: class labels, a labels CSV, a data set's own attributes. The
CLI shows the same one-line errors with the flags of ``torchglow manipulate`` (``in_flags``)."""

import pytest
import torch

from torchglow.cli.errors import in_flags
from torchglow.data import labels as label_sources


def test_labels_from_csv(tmp_path):
    path = tmp_path / "attrs.csv"
    path.write_text("image_id,Smiling,Eyeglasses,Young\n"
                    "a.png,1,-1,1\n"
                    "b.png,-1,1,0\n"
                    "c.png,1,1,true\n")
    labels, names = label_sources.labels_from_csv(path)
    assert names == ["Smiling", "Eyeglasses", "Young"]
    assert labels.dtype == torch.bool
    assert labels.tolist() == [[True, False, True], [False, True, False], [True, True, True]]
    reordered, _ = label_sources.labels_from_csv(path, ids=["c.png", "a.png"])
    assert reordered.tolist() == [[True, True, True], [True, False, True]]
    with pytest.raises(ValueError, match="not in the file"):
        label_sources.labels_from_csv(path, ids=["zzz.png"])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,Smiling\nx.png,2\n")
    with pytest.raises(ValueError, match="Smiling"):
        label_sources.labels_from_csv(bad)


def test_attribute_labels_from_a_dataset():
    class Fake:
        attributes = torch.tensor([[1, -1], [-1, 1]])
        attribute_names = ["Smiling", "Male"]

    labels, names = label_sources.attribute_labels(Fake())
    assert names == ["Smiling", "Male"] and labels.tolist() == [[True, False], [False, True]]

    class NoAttrs:
        pass

    with pytest.raises(ValueError, match="no per-image attributes"):
        label_sources.attribute_labels(NoAttrs())


class _Data:
    """A labelled in-memory data set as the tools see it."""

    name = "toy"
    num_classes = 4
    labels = torch.tensor([0, 3, 1, 3, 2, 3])

    def __len__(self):
        return len(self.labels)


def test_classes_by_name():
    class Named(_Data):
        class_names = ["cat", "dog", "emu", "fox"]

    labels, names, _ = label_sources.labels_for(Named(), [1, 2, 3], classes=["fox", "1", 3])
    assert names == ["class_fox", "class_dog"] and labels.tolist() == [[True, False], [False, True], [True, False]]
    with pytest.raises(label_sources.LabelsError, match="gnu is not a class of toy .cat, dog, emu, fox, or 0..3.") as e:
        label_sources.labels_for(Named(), [0], classes=["gnu"])
    assert in_flags(str(e.value)).startswith("--class-attribute gnu is not a class of toy")


def test_labels_for_classes_csv_and_attributes(tmp_path):
    labels, names, source = label_sources.labels_for(_Data(), [1, 2, 3], classes=[3, 1, 3])
    assert names == ["class_3", "class_1"] and source == "classes of toy"
    assert labels.tolist() == [[True, False], [False, True], [True, False]]
    with pytest.raises(label_sources.LabelsError, match=r"^`classes` 4 is not a class of toy \(0..3\)$") as e:
        label_sources.labels_for(_Data(), [0], classes=[4])
    assert in_flags(str(e.value)) == "--class-attribute 4 is not a class of toy (0..3)"
    with pytest.raises(label_sources.LabelsError, match="^`attributes` picks") as e:
        label_sources.labels_for(_Data(), [0], classes=[1], attributes=["b"])
    assert "--class-attribute" in in_flags(str(e.value)) and "--" not in str(e.value)
    csv = tmp_path / "l.csv"
    csv.write_text("id,a,b\n" + "".join(f"{i},{i % 2},{int(i > 2)}\n" for i in range(6)))
    labels, names, source = label_sources.labels_for(_Data(), [5, 0], csv_path=csv, attributes=["b"])
    assert names == ["b"] and source == str(csv) and labels.tolist() == [[True], [False]]
    with pytest.raises(ValueError, match="unknown attribute.*available: a, b"):
        label_sources.labels_for(_Data(), [0], csv_path=csv, attributes=["c"])
    with pytest.raises(label_sources.LabelsError, match="no per-image attributes: pass `classes` C, `csv_path` FILE or `directions` FILE$") as e:
        label_sources.labels_for(_Data(), [0])
    assert in_flags(str(e.value)).endswith("pass --class-attribute C, --labels-csv FILE or --directions FILE")

    class Unlabelled(_Data):
        labels = torch.full((6,), -1)

    with pytest.raises(label_sources.LabelsError, match=r"toy has no class labels: `classes` needs a labelled data set \(use `csv_path`") as e:
        label_sources.labels_for(Unlabelled(), [0], classes=[1])
    assert in_flags(str(e.value)).endswith("(use --labels-csv or, for CelebA, --attribute)")

    class Faces(_Data):
        attributes = torch.tensor([[1, -1], [-1, 1], [1, 1]])
        attribute_names = ["Smiling", "Male"]

    labels, names, _ = label_sources.labels_for(Faces(), [2, 0], attributes=["Male"])
    assert names == ["Male"] and labels.tolist() == [[True], [False]]
    with pytest.raises(label_sources.LabelsError, match="^pass `attributes` NAME .*Smiling, Male") as e:
        label_sources.labels_for(Faces(), [0])
    assert in_flags(str(e.value)).startswith("pass --attribute NAME")


def test_image_ids():
    class Files:
        paths = ["/data/celeba/000001.jpg", "/data/celeba/000002.jpg"]

    assert label_sources.image_ids(Files()) == ["000001.jpg", "000002.jpg"]
    assert label_sources.image_ids([10, 20, 30]) == ["0", "1", "2"]
