"""CelebA: attributes, partitions and the centre crop, from small files in the real layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.data import DatasetError, ImageFileDataset, load_dataset

from data_checks import assert_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.RandomState(0)


def write_celeba(root, partitions):
    """Faces 178x218 with a red band of 20 rows at top and bottom (outside the centre square)."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    face = np.zeros((218, 178, 3), np.uint8)
    face[:, :] = (0, 0, 255)
    face[:20], face[-20:] = (255, 0, 0), (255, 0, 0)
    for name in names:
        Image.fromarray(face).save(folder / "img_align_celeba" / name, quality=95)
    attribute_names = [f"Attribute_{k}" for k in range(40)]
    values = RNG.choice([-1, 1], (len(names), 40))
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (folder / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(attribute_names), *rows]) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    return values > 0


def test_celeba_attributes_partitions_and_centre_crop(tmp_path):
    attributes = write_celeba(tmp_path, [0, 0, 1, 2, 0, 2])
    train = load_dataset("celeba", "train", data_dir=tmp_path)
    assert isinstance(train, ImageFileDataset)
    assert_image_dataset(train, 3, (3, 64, 64), [-1, -1, -1])
    assert train.num_classes is None and train.attribute_names[:2] == ["Attribute_0", "Attribute_1"]
    assert train.attributes.dtype == torch.bool and torch.equal(
        train.attributes, torch.from_numpy(attributes[[0, 1, 4]])
    )
    image, _ = train[0]
    assert image[2].float().mean() > 240 and image[0].float().mean() < 15  # the red bands are cropped away
    test = load_dataset("celeba", "test", data_dir=tmp_path, image_size=32, channels=1)
    assert_image_dataset(test, 2, (1, 32, 32))
    assert torch.equal(test.attributes, torch.from_numpy(attributes[[3, 5]]))
    (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").unlink()  # e.g. images unzipped one level too deep
    with pytest.raises(DatasetError, match="000001.jpg not found"):
        load_dataset("celeba", "train", data_dir=tmp_path)
