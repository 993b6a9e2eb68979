"""Image data sets: uint8 images (C, H, W) in 0..255 with int64 labels, read from the files on disk.

Every data set yields ``(image, label)``: ``image`` a uint8 tensor (C, H, W), ``label`` an int64
scalar tensor, -1 where the data set has no classes. :func:`load_dataset` is the entry point:

=============== ============ ======================================================================
name            shape        files (under ``data_dir``)
=============== ============ ======================================================================
digits          (1, 8, 8)    none: scikit-learn's bundled ``load_digits()`` (pixels ``level * 8``)
mnist           (1, 28, 28)  ``train-images-idx3-ubyte[.gz]`` ... in ``data_dir`` or ``MNIST/raw/``
fashion-mnist   (1, 28, 28)  the same idx files, in ``data_dir`` or ``FashionMNIST/raw/``
cifar10         (3, 32, 32)  ``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``
svhn            (3, 32, 32)  ``train_32x32.mat``, ``test_32x32.mat``
celeba          (3, 64, 64)  ``celeba/img_align_celeba/``, ``list_attr_celeba.txt``,
                             ``list_eval_partition.txt`` (loaded lazily, 40 binary attributes)
imagenet32/64   (3, s, s)    ``*train_data_batch_*.npz`` and ``val_data.npz`` anywhere below
lsun-CATEGORY   (3, 64, 64)  ``<category>_train_lmdb/``, ``<category>_val_lmdb/`` (LSUN's LMDB
                             folders, loaded lazily; CATEGORY: bedroom, church_outdoor, tower;
                             needs the ``lmdb`` package)
a folder path   (c, s, s)    any images below it (loaded lazily): ``train/``, ``test/``, ``val/``
                             subfolders are splits, the subfolders below them (or of a flat
                             folder) classes (:class:`FolderLayout`); the shape is read from the
                             images unless given (:func:`infer_image_shape`)
=============== ============ ======================================================================

Where the files are: ``data_dir``, or by default ``~/.cache/torchglow/<name>``; the environment
variable ``TORCHGLOW_DATA`` replaces the root ``~/.cache/torchglow``. Fashion-MNIST is also found
in ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) when no
``data_dir`` is given. Missing files raise :class:`DatasetError`, whose one-line message names the
expected path and how to get the files.

Downloads (``download=True``): torchvision fetches and md5-checks the official files, but the files
are then parsed here rather than by torchvision's data set classes. Those classes refuse any file
whose md5 differs from the official one (CIFAR-10, SVHN, CelebA), so one parser per format serves a
torchvision download, other layouts of the same files (a Debian package, gzip-compressed idx files)
and the small files the tests write.

Sets that fit in memory are :class:`TensorImageDataset` (the trainer moves ``.images`` to the GPU);
CelebA and image folders are :class:`ImageFileDataset`, which decodes one file per item. Every data
set gives images and labels with :meth:`ImageDataset.take`.

The modules: ``base`` (the data set classes, :class:`DatasetError`), ``registry`` (the names,
:func:`load_dataset`), ``arrays`` (the sets held in memory, ``.npz`` files), ``folders`` (image
folders), ``celeba``, ``lsun``, ``sources`` (finding and fetching files) and ``labels`` (label
sources for the tools).
"""

from .base import SPLITS, ConcatImageDataset, DatasetError, DecodedImageDataset, ImageDataset, TensorImageDataset, user_path
from .folders import (
    IMAGE_EXTENSIONS,
    FolderLayout,
    ImageFileDataset,
    folder_layout,
    infer_image_shape,
    missing_folder_error,
    read_image,
)
from .lsun import LSUN_CATEGORIES, LSUNDataset, load_lsun
from .arrays import IN_MEMORY_SHAPES, load_npz
from .registry import DATASETS, absolute_dataset, check_dataset_name, is_folder, load_dataset, pick_indices

__all__ = [
    "DATASETS", "IMAGE_EXTENSIONS", "IN_MEMORY_SHAPES", "LSUN_CATEGORIES", "SPLITS",
    "ConcatImageDataset", "DatasetError", "DecodedImageDataset", "FolderLayout", "ImageDataset", "ImageFileDataset",
    "LSUNDataset", "TensorImageDataset",
    "absolute_dataset", "check_dataset_name", "folder_layout", "infer_image_shape", "is_folder", "load_dataset",
    "load_lsun", "load_npz", "missing_folder_error", "pick_indices", "read_image", "user_path",
]  # fmt: skip
