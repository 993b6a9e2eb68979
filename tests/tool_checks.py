"""Shared helpers of the tool tests (sampling, latent, OOD, images, CLI, data): digits-like images, a
small perturbed model, PNG reading and writing."""

import numpy as np
import torch
from PIL import Image

from torchglow import Glow

from torchglow import preset
from torchglow.preprocess import dequantize, preprocess

from flow_checks import perturb


def digits_like(n, seed=0, c=1, h=8, w=8):
    """uint8 images like scikit-learn's digits: 17 levels stored as level * 8 (0..128)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 17, (n, c, h, w), generator=g) * 8).to(torch.uint8)


def make_model(seed=1, **overrides) -> Glow:
    """A 2-step digits model in eval mode, ActNorm initialised on digits-like images and every
    parameter perturbed, so that the couplings and priors are not the identity."""
    torch.manual_seed(seed)
    model = Glow(preset("digits", n_steps=2, hidden_channels=16, **overrides))
    x = digits_like(64, seed=1)
    y = torch.arange(64) % model.config.num_classes if model.config.num_classes else None
    model.initialize(dequantize(preprocess(x, 5), 5), y)
    perturb(model, 0.05)
    return model.eval()


def open_png(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def grid_shape(img, h=8, scale=4, pad=2):
    """(rows, columns) of a grid of h x h images upscaled by `scale` with `pad` px padding."""
    cell = h * scale + pad
    return (img.height - pad) // cell, (img.width - pad) // cell


def write_image(path, size=(12, 10), value=None, mode="RGB", seed=0, fmt=None):
    """An image file of ``size`` (width, height): every pixel ``value``, or seeded noise when it is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    pixels = np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8) if value is None else \
        np.full(shape, value, np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)


def image_folder(root, n, **kwargs):
    """A folder of ``n`` noise PNGs (img000.png, ...), each of another seed."""
    for i in range(n):
        write_image(root / f"img{i:03d}.png", seed=i, **kwargs)
    return root


def split_folder(root, n_train=12, n_test=4, size=(8, 8), classes=("cat", "ship"), fmt=("png", "jpg")):
    """``root/{train,test}/{cat,ship}/``: images of one grey value per class (40, 190), PNG in
    ``train/`` and JPEG in ``test/`` by default (``fmt``: the extensions of the two splits)."""
    for split, n, ext in (("train", n_train, fmt[0]), ("test", n_test, fmt[1])):
        for label, name in enumerate(classes):
            for i in range(n):
                write_image(root / split / name / f"{i:02d}.{ext}", size=size, value=40 + 150 * label)
    return root
