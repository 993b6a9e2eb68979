"""Image folders: splits, classes, the inferred shape, unreadable files, and training on them through the CLI."""

import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from torchglow.cli.errors import in_flags
from torchglow.data import (
    DatasetError,
    ImageFileDataset,
    check_dataset_name,
    folder_layout,
    infer_image_shape,
    load_dataset,
)

from conftest import FUZZ, assert_one_error_line, cli
from data_checks import assert_image_dataset
from tool_checks import image_folder, split_folder, write_image

pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_folder_classes_split_and_corrupt_file(tmp_path):
    for i in range(30):
        write_image(tmp_path / "cat" / f"{i:02d}.png", value=10)
        write_image(tmp_path / "dog" / "sub" / f"{i:02d}.jpg", value=200)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_dataset(str(tmp_path), "train", image_size=8)
        test = load_dataset(f"folder:{tmp_path}", "test", image_size=8)
    assert len(caught) == 1 and "1 unreadable" in str(caught[0].message) and "broken.png" in str(caught[0].message)
    assert isinstance(train, ImageFileDataset) and train.class_names == ["cat", "dog"]
    assert len(train) + len(test) == 60 and len(test) in (5, 6)  # 61 files: 6 in test, before dropping broken.png
    assert set(train.paths).isdisjoint(test.paths)
    for dataset in (train, test):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
            assert image.float().mean().item() == pytest.approx(10 if label == 0 else 200, abs=2)
    assert torch.equal(load_dataset(str(tmp_path), "test", image_size=8).labels, test.labels)  # deterministic


def test_flat_image_folder_is_unlabelled_and_reads_all_formats(tmp_path):
    for i, fmt in enumerate(["png", "jpeg", "bmp", "webp", "gif"] * 4):
        write_image(tmp_path / f"{i:02d}.{fmt}", size=(20, 12), value=100, fmt=fmt)
    train = load_dataset(str(tmp_path), image_size=6, channels=1)
    assert_image_dataset(train, 18, (1, 6, 6), [-1] * 18)  # 20 files, 10% of them in the test split
    assert train.num_classes is None and train.class_names is None
    assert all(train[i][0].float().mean().item() == pytest.approx(100, abs=3) for i in range(len(train)))


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_dataset(f"folder:{tmp_path}", image_size=8)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="no readable images"):
        load_dataset(str(tmp_path), image_size=8)
    for i in range(9):  # too few files for a test split (10%, rounded down)
        write_image(tmp_path / "small" / f"{i}.png")
    assert len(load_dataset(str(tmp_path / "small"), "train", image_size=8)) == 9
    with pytest.raises(DatasetError, match="test split.*10% of its images .seed 0.* it has 9, at least 10 are needed"):
        load_dataset(str(tmp_path / "small"), "test", image_size=8)
    write_image(tmp_path / "small" / "9.png")
    assert len(load_dataset(str(tmp_path / "small"), "test", image_size=8)) == 1
    with pytest.raises(DatasetError, match="no such folder .*missing"):
        load_dataset(f"folder:{tmp_path / 'missing'}", image_size=8)


def test_split_folders_are_splits_and_their_subfolders_the_classes(tmp_path):
    """train/ and test/ are the splits (never classes), cat/ and ship/ below them the classes; the
    shape is read from the images (8x8 RGB PNGs and JPEGs); "all" is every image."""
    folder = split_folder(tmp_path / "cats_and_ships")
    layout = folder_layout(folder)
    assert layout.split_folders and layout.test_from == "test/" and layout.counts() == {"train": 24, "test": 8}
    train, test, every = (load_dataset(str(folder), split) for split in ("train", "test", "all"))
    assert train.class_names == test.class_names == ["cat", "ship"]
    assert_image_dataset(train, 24, (3, 8, 8), [0] * 12 + [1] * 12)
    assert_image_dataset(test, 8, (3, 8, 8), [0] * 4 + [1] * 4)
    assert len(every) == 32 and set(every.paths) == set(train.paths) | set(test.paths)
    assert all(p.parts[-3] == "test" and p.suffix == ".jpg" for p in test.paths)
    images, labels = test.take(range(len(test)))
    assert images.shape == (8, 3, 8, 8)
    for image, label in zip(images, labels):  # JPEG: close to the written grey value
        assert image.float().mean().item() == pytest.approx(40 + 150 * label.item(), abs=4)
    with pytest.raises(DatasetError, match="no val split"):
        load_dataset(str(folder), "val")


def test_val_folder_or_a_share_of_train_is_the_test_split(tmp_path):
    for i in range(20):
        write_image(tmp_path / "tv" / "train" / f"{i}.png", size=(8, 8), seed=i)
    for i in range(3):
        write_image(tmp_path / "tv" / "val" / f"{i}.png", size=(8, 8), seed=100 + i)
    layout = folder_layout(tmp_path / "tv")
    assert layout.test_from == "val/" and layout.class_names is None
    assert load_dataset(str(tmp_path / "tv"), "test").paths == load_dataset(str(tmp_path / "tv"), "val").paths
    assert len(load_dataset(str(tmp_path / "tv"), "all")) == 23  # val/ counted once
    (tmp_path / "tv" / "val").rename(tmp_path / "tv" / "other")  # train/ alone: 10% of it; other/ not read
    layout = folder_layout(tmp_path / "tv")
    assert layout.test_from == "10% of train/ (seed 0)" and layout.counts() == {"train": 18, "test": 2}
    assert layout.ignored == ["other/"]
    with pytest.warns(UserWarning, match="read as the splits train/; not read: other/"):
        load_dataset(str(tmp_path / "tv"), "train")


def test_flat_folder_is_split_with_a_fixed_seed_and_share(tmp_path):
    """A folder of class subfolders without split folders: 10% of its files (rounded down) are the
    test split, drawn with seed 0 whatever the seed asked for."""
    for name in ("cat", "ship"):
        for i in range(20):
            write_image(tmp_path / "flat" / name / f"{i:02d}.png", size=(8, 8), seed=i)
    layout = folder_layout(tmp_path / "flat")
    assert not layout.split_folders and layout.test_from == "10% of its images (seed 0)"
    assert layout.counts() == {"train": 36, "test": 4} and layout.class_names == ["cat", "ship"]
    tests = [load_dataset(str(tmp_path / "flat"), "test", seed=seed).paths for seed in (0, 7)]
    assert tests[0] == tests[1] == layout.files["test"]


def test_image_shape_is_read_from_the_images(tmp_path):
    """The most common size when square and shared by most images; grey only when every image is."""
    for i in range(6):
        write_image(tmp_path / "mixed" / f"a{i}.jpg", size=(16, 16), seed=i, fmt="JPEG")
    write_image(tmp_path / "mixed" / "wide.png", size=(30, 12))
    write_image(tmp_path / "mixed" / "grey.png", size=(9, 9), mode="L")
    assert infer_image_shape(tmp_path / "mixed") == (3, 16, 16)
    data = load_dataset(str(tmp_path / "mixed"), "all")
    assert data.image_shape == (3, 16, 16) and data.take([0])[0].shape == (1, 3, 16, 16)
    for i in range(3):
        write_image(tmp_path / "grey" / f"{i}.png", size=(12, 12), mode="L")
    assert load_dataset(str(tmp_path / "grey"), "all").image_shape == (1, 12, 12)
    assert load_dataset(str(tmp_path / "grey"), "all", image_shape=(3, 8, 8)).image_shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="contradicts"):
        load_dataset(str(tmp_path / "grey"), "all", image_shape=(3, 8, 8), image_size=16)
    for i, size in enumerate([(8, 8), (10, 10), (12, 12), (16, 16)]):  # no size shared by most
        write_image(tmp_path / "sizes" / f"{i}.png", size=size)
    with pytest.raises(DatasetError, match=r"4 image sizes, the most common .* in 1 of 4 images.*`image_shape` 3 S S"
                       ) as error:
        load_dataset(str(tmp_path / "sizes"), "all")
    assert "pass --image-shape 3 S S to centre-crop" in in_flags(str(error.value))
    write_image(tmp_path / "oblong" / "0.png", size=(12, 8))
    with pytest.raises(DatasetError, match="every image is 12x8, not square"):
        load_dataset(str(tmp_path / "oblong"), "all")
    assert len(load_dataset(str(tmp_path / "sizes"), "all", image_size=8)) == 4


def test_each_header_is_read_once_when_the_shape_is_inferred(tmp_path, monkeypatch):
    """The train split's shape comes from every image of the folder: each file's header is read once."""
    from torchglow.data import folders

    image_folder(tmp_path / "imgs", 20, size=(8, 8))
    read = []
    header = folders._header
    monkeypatch.setattr(folders, "_header", lambda path: read.append(path) or header(path))
    train = load_dataset(str(tmp_path / "imgs"), "train")
    assert len(train) == 18 and train.image_shape == (3, 8, 8)
    assert sorted(read) == sorted((tmp_path / "imgs").iterdir())


def test_a_missing_folder_says_no_such_folder_with_the_closest(tmp_path, monkeypatch):
    split_folder(tmp_path / "cats_and_ships", 1, 1)
    for name in (str(tmp_path / "cats_and_shps"), f"folder:{tmp_path / 'cats_and_shps'}"):
        with pytest.raises(DatasetError, match=f"no such folder '{tmp_path / 'cats_and_shps'}': did you mean "
                                               f"'{tmp_path / 'cats_and_ships'}'"):
            check_dataset_name(name)
    monkeypatch.chdir(tmp_path)
    for name in ("cats_and_shps", "./cats_and_shps"):
        with pytest.raises(DatasetError, match="no such folder 'cats_and_shps': did you mean 'cats_and_ships'"):
            check_dataset_name(name)
    with pytest.raises(DatasetError, match="no such folder 'nowhere/x' .nor is there a folder nowhere."):
        check_dataset_name("nowhere/x")
    with pytest.raises(DatasetError, match="unknown data set 'cifar1' .*did you mean 'cifar10'"):
        check_dataset_name("cifar1")


# The model of the training runs on image folders (through the CLI): 3x8x8, tiny, one epoch.
FOLDER_MODEL = ["--image-shape", "3", "8", "8", "--n-levels", "2", "--n-steps", "1", "--hidden-channels", "8",
                "--batch-size", "8", "--epochs", "1", "--init-images", "8", "--eval-batch-size", "64",
                "--sample-temperatures", "0", "1", "--device", "cpu", "--num-workers", "0"]


def test_training_on_an_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "empty", "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, tmp_path / "empty", "holds no images")


def test_training_on_a_folder_of_unreadable_files_only(capsys, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder, "no readable images")


def test_unreadable_files_are_skipped_with_one_warning(capsys, tmp_path):
    """Empty, non-image and garbage files (with image extensions) are skipped with one warning that
    counts them; grey, RGBA and palette images of any size are converted to RGB and cropped/resized
    to the model's 8x8; the run finishes."""
    folder = image_folder(tmp_path / "imgs", 24)
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "rgba.png", size=(40, 17), mode="RGBA")
    write_image(folder / "pal.gif", size=(5, 5), mode="P")
    write_image(folder / "big.jpg", size=(64, 64), fmt="JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "noise.webp").write_bytes(os.urandom(500))
    (folder / "README.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    assert "bits/dim" in out and f"torchglow sample {tmp_path / 'run'}" in out
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert skipped and all("skipped" in m for m in skipped)
    assert sum(int(m.split("skipped ")[1].split()[0]) for m in skipped) == 3  # over the train and test splits


def test_grey_and_odd_sized_images_are_converted(tmp_path):
    """Grey images become RGB (the grey plane repeated); any size is centre-cropped to a square
    and resized (Lanczos) to the model's size."""
    folder = tmp_path / "imgs"
    write_image(folder / "grey.png", size=(13, 9), mode="L")
    write_image(folder / "wide.png", size=(40, 17), mode="RGBA")
    data = load_dataset(str(folder), "train", image_size=8, channels=3)
    assert len(data) == 2
    for i in range(len(data)):
        x, _ = data[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    grey = data[[p.name for p in data.paths].index("grey.png")][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_truncated_image_is_named(capsys, tmp_path):
    """A truncated PNG passes PIL's header check; decoding it fails, and the error names the file
    (image folders are decoded once at start-up, for the per-pixel baseline)."""
    folder = image_folder(tmp_path / "imgs", 24)
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "zz_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, folder / "zz_truncated.png", "truncated")


def test_data_set_smaller_than_the_batch(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 21)  # 19 training images, 2 test images
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--batch-size", "32")
    assert_one_error_line(rc, err, "has 19 images, fewer than --batch-size 32")
    # under 10 images the 10% test split is empty
    small = image_folder(tmp_path / "small", 5)
    rc, _, err = cli(capsys, "train", "--dataset", small, "--out", tmp_path / "run", *FOLDER_MODEL)
    assert_one_error_line(rc, err, small, "no readable images in its test split")


def test_num_classes_without_class_subfolders(capsys, tmp_path):
    folder = image_folder(tmp_path / "imgs", 24)
    rc, _, err = cli(capsys, "train", "--dataset", folder, "--out", tmp_path / "run", *FOLDER_MODEL,
                     "--num-classes", "3")
    assert_one_error_line(rc, err, "--num-classes 3", "has no labels")


def test_training_on_an_unknown_data_set(capsys, tmp_path):
    rc, _, err = cli(capsys, "train", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_error_line(rc, err, "nowhere")


def _image_bytes(kind, seed, cut):
    buf = io.BytesIO()
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (9, 7, 3), dtype=np.uint8)).save(buf, kind)
    data = buf.getvalue()
    return data[: int(len(data) * cut)]


FILE_CONTENT = st.one_of(
    st.binary(max_size=300),
    st.builds(_image_bytes, st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]), st.integers(0, 9),
              st.floats(0.0, 1.0)),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp"]), FILE_CONTENT),
                min_size=1, max_size=6))
def test_fuzz_image_folders(tmp_path_factory, files):
    """Random bytes and truncated images of every format: loading and iterating a folder raises
    nothing but DatasetError (one line, naming the folder or file) and warns about skipped files,
    counting them; what it yields is well-formed: uint8 images of the data set's shape, labels -1."""
    folder = tmp_path_factory.mktemp("imgs")
    for i, (ext, content) in enumerate(files):
        (folder / f"f{i}{ext}").write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = load_dataset(str(folder), "train", image_size=8)
        except DatasetError as error:
            assert str(folder) in str(error) and "\n" not in str(error)
            return
    # under 10 files the test split (10%, rounded down) is empty: every file is in train or skipped
    skipped = sorted(set(folder.iterdir()) - set(data.paths))
    assert len(data) + len(skipped) == len(files)
    warned = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert warned == ([f"image folder {folder}: skipped {len(skipped)} unreadable file(s), the first {skipped[0]}"]
                      if skipped else [])
    channels = data.image_shape[0]
    assert data.image_shape == (channels, 8, 8) and channels in (1, 3) and data.class_names is None
    for i in range(len(data)):
        try:
            x, y = data[i]
        except DatasetError as error:  # a file whose header reads but whose pixels do not
            assert str(data.paths[i]) in str(error) and "\n" not in str(error)
            continue
        assert x.dtype == torch.uint8 and x.shape == data.image_shape
        assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == -1
