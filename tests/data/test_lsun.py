"""LSUN: LMDB folders as the release has them, decoded as the official code does."""

import io
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from torchglow.data import DATASETS, DatasetError, check_dataset_name, load_dataset

from data_checks import assert_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_lsun_lmdb(folder, images):
    """An LMDB folder as the LSUN release has them: sha1-like hex ids as keys, webp images as values."""
    lmdb = pytest.importorskip("lmdb", reason="the LSUN reader needs the optional lmdb package")
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, pixels in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="WEBP", lossless=True)
            txn.put(f"{i:040x}".encode(), buf.getvalue())
    env.close()


def _official_lsun_image(pixels, res):
    """openai/glow generate_tfr/lsun.py: centre_crop, then resize((res, res), ANTIALIAS) (= Lanczos)."""
    h, w = pixels.shape[:2]
    crop = min(h, w)
    pixels = pixels[(h - crop) // 2: (h + crop) // 2, (w - crop) // 2: (w + crop) // 2]
    out = np.asarray(Image.fromarray(pixels, "RGB").resize((res, res), Image.Resampling.LANCZOS))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def test_lsun_lmdb_folders(tmp_path, monkeypatch):
    rng = np.random.RandomState(1)
    train = [rng.randint(0, 256, shape, dtype=np.uint8) for shape in ((30, 41, 3), (43, 30, 3), (24, 24, 3))]
    val = [rng.randint(0, 256, (31, 20, 3), dtype=np.uint8)]
    _write_lsun_lmdb(tmp_path / "tower_train_lmdb", train)
    _write_lsun_lmdb(tmp_path / "tower_val_lmdb", val)
    assert "lsun-tower" in DATASETS

    ds = load_dataset("lsun-tower", data_dir=tmp_path, image_size=8)
    assert_image_dataset(ds, 3, (3, 8, 8), labels=[-1, -1, -1])
    for i, pixels in enumerate(train):  # keys in LMDB order, which is the order written (sorted ids)
        assert torch.equal(ds[i][0], _official_lsun_image(pixels, 8))
    test = load_dataset("lsun-tower", "test", data_dir=tmp_path, image_size=16, channels=1)
    assert_image_dataset(test, 1, (1, 16, 16))
    every = load_dataset("lsun-tower", "all", data_dir=tmp_path, image_size=8)  # both folders, in order
    assert_image_dataset(every, 4, (3, 8, 8), labels=[-1] * 4)
    assert torch.equal(every.take([1, 3])[0], torch.stack([ds[1][0], _official_lsun_image(val[0], 8)]))
    again = pickle.loads(pickle.dumps(ds))  # a spawned DataLoader worker gets it so
    assert torch.equal(again[2][0], ds[2][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)  # a worker process opens its own
    assert torch.equal(next(iter(loader))[0], ds.take([0, 1, 2])[0])

    with pytest.raises(DatasetError, match=r"lsun-bedroom: .*bedroom_train_lmdb/data.mdb not found.*fyu/lsun"):
        load_dataset("lsun-bedroom", data_dir=tmp_path)
    with pytest.raises(DatasetError, match="one data set per category: lsun-bedroom"):
        check_dataset_name("lsun")
    _write_lsun_lmdb(tmp_path / "bedroom_train_lmdb", val)
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if lmdb were not installed
    with pytest.raises(DatasetError, match=r"needs the lmdb package: pip install 'torchglow\[lsun\]'"):
        load_dataset("lsun-bedroom", data_dir=tmp_path)
