"""Image data for the image benchmarks (DDPM, SiT, ControlNet): offline by default, any folder, or CIFAR-10
one flag away; the parts of their batch streams and held-out sets they share; and PNG grids of images.

Three sources, all returned as an :class:`ImageData` of float32 tensors ``(N, C, H, W)`` in
``[-1, 1]`` (the range DDPM trains in) with integer labels and a fixed held-out split:

* :func:`digit_images` (the default): scikit-learn's bundled handwritten digits (1797 grayscale
  8x8 images, 10 classes; nothing is downloaded), resized with bilinear interpolation to the
  preset's resolution, and repeated to 3 channels for RGB presets. 20% are held out, stratified
  by class with a fixed seed, so every run is scored on the same images.
* :func:`folder_images`: every image file under a folder (``*.png``, ``*.jpg``, ...), center-cropped
  to a square and resized. Class labels are the names of the first-level subfolders when there
  are at least two of them; otherwise :data:`PSEUDO_CLASSES` k-means clusters of the training
  pixels stand in for classes (the labels only train the feature network of the Frechet
  distance, see :mod:`coap_bench.frechet`). An image is held out when a hash of its
  relative path says so (:func:`is_heldout_path`), so adding a file never moves another one
  between the splits.
* :func:`cifar10_images`: CIFAR-10 from the Hugging Face Hub through ``datasets`` (needs
  internet and ``pip install datasets``): its train split for training, its test split held out.

Each job's training stream draws its batches from a :class:`ShuffledBatches` (a seeded permutation per
epoch, resumable) and its held-out set from :func:`heldout_draws` (every image ``repeats`` times, with
stratified times and noise from :data:`HELDOUT_SEED`); :func:`save_sample_grid` writes images as a PNG grid.

Example (needs scikit-learn):

>>> data = digit_images(resolution=16, channels=1)
>>> tuple(data.train.shape[1:]), data.num_classes
((1, 16, 16), 10)
>>> len(data.train) + len(data.heldout)
1797
>>> bool(data.train.min() >= -1) and bool(data.train.max() <= 1)
True
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._deps import require
from .report import _pyplot

__all__ = [
    "HELDOUT_FRACTION",
    "HELDOUT_SEED",
    "IMAGE_SUFFIXES",
    "ImageData",
    "ShuffledBatches",
    "cifar10_images",
    "digit_images",
    "folder_images",
    "heldout_draws",
    "image_sha256",
    "is_heldout_path",
    "load_image_data",
    "resize_images",
    "save_sample_grid",
]

#: Share of the images held out (digits: stratified by class; folders: by path hash).
HELDOUT_FRACTION = 0.2
#: Seed of the digits' stratified split: fixed, so every ``--seed`` is scored on the same images.
SPLIT_SEED = 0
#: Seed of the held-out sets' (t, noise) draws: fixed, so every ``--seed`` is scored on the same set.
HELDOUT_SEED = 1234
#: File suffixes read from an image folder (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Number of k-means clusters used as labels for a folder without class subfolders.
PSEUDO_CLASSES = 10
#: The CIFAR-10 dataset on the Hugging Face Hub (columns ``img`` and ``label``).
CIFAR10_DATASET = "uoft-cs/cifar10"


@dataclass
class ImageData:
    """Training and held-out images, ``(N, C, H, W)`` float32 in ``[-1, 1]``, with integer labels.

    ``label_source`` says where the labels come from (``"classes"``: real classes;
    ``"kmeans"``: clusters of the training pixels); ``source`` describes the images.
    """

    train: Tensor
    train_labels: Tensor
    heldout: Tensor
    heldout_labels: Tensor
    num_classes: int
    source: dict[str, Any] = field(default_factory=dict)
    label_source: str = "classes"

    @property
    def resolution(self) -> int:
        return int(self.train.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.train.shape[1])

    def describe(self) -> dict[str, Any]:
        """What the JSON records about the data: source, sizes and sha256 of the tensors."""
        return {
            **self.source,
            "resolution": self.resolution,
            "channels": self.channels,
            "train_images": len(self.train),
            "heldout_images": len(self.heldout),
            "num_classes": self.num_classes,
            "label_source": self.label_source,
            "train_sha256": image_sha256(self.train),
            "heldout_sha256": image_sha256(self.heldout),
            "labels_sha256": image_sha256(torch.cat([self.train_labels, self.heldout_labels]).float()),
        }


def image_sha256(images: Tensor) -> str:
    """sha256 of ``images`` as contiguous little-endian float32 (the same on every machine).

    >>> image_sha256(torch.zeros(2, 1, 2, 2)) == image_sha256(torch.zeros(2, 1, 2, 2, dtype=torch.float64))
    True
    """
    array = images.detach().to("cpu", torch.float32).contiguous().numpy()
    if sys.byteorder == "big":  # pragma: no cover
        array = array.byteswap()
    return hashlib.sha256(array.tobytes()).hexdigest()


def resize_images(images: Tensor, resolution: int, channels: int) -> Tensor:
    """``images`` (N, C, H, W) in any range, resized (bilinear, antialiased when shrinking) to
    ``resolution`` and converted to ``channels`` (gray repeated to RGB, RGB averaged to gray).

    >>> resize_images(torch.zeros(3, 1, 8, 8), 16, 3).shape
    torch.Size([3, 3, 16, 16])
    """
    if images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if images.shape[-2:] != (resolution, resolution):
        shrink = images.shape[-1] > resolution
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink
        )
    return images.contiguous()


def _to_unit_range(images: Tensor) -> Tensor:
    """Images in ``[0, 1]`` -> ``[-1, 1]``, clamped (interpolation may overshoot slightly)."""
    return (images * 2 - 1).clamp_(-1, 1)


def digit_images(resolution: int = 16, channels: int = 1) -> ImageData:
    """scikit-learn's bundled digits, resized, in ``[-1, 1]``, 20% held out (stratified, fixed seed)."""
    datasets = require("sklearn.datasets", package="scikit-learn")
    model_selection = require("sklearn.model_selection", package="scikit-learn")
    np = require("numpy")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = _to_unit_range(resize_images(images, resolution, channels))
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, heldout_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    train_idx, heldout_idx = torch.as_tensor(train_idx), torch.as_tensor(heldout_idx)
    return ImageData(
        train=images[train_idx].contiguous(),
        train_labels=labels[train_idx],
        heldout=images[heldout_idx].contiguous(),
        heldout_labels=labels[heldout_idx],
        num_classes=10,
        source={
            "name": "digits",
            "origin": "sklearn.datasets.load_digits (8x8 grayscale, bundled)",
            "split": f"stratified {HELDOUT_FRACTION:g} held out, seed {SPLIT_SEED}",
        },
    )


def is_heldout_path(relative_path: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether the image at ``relative_path`` (POSIX, relative to the folder) is held out.

    >>> is_heldout_path("a/b.png") == is_heldout_path("a/b.png")
    True
    """
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _square(image: Any) -> Any:
    """A PIL image center-cropped to a square."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _kmeans_labels(train: Tensor, heldout: Tensor, clusters: int) -> tuple[Tensor, Tensor, int]:
    cluster = require("sklearn.cluster", package="scikit-learn")
    clusters = max(1, min(clusters, len(train)))
    km = cluster.KMeans(n_clusters=clusters, n_init=4, random_state=SPLIT_SEED)
    km.fit(train.flatten(1).numpy())
    to_labels = lambda x: torch.as_tensor(km.predict(x.flatten(1).numpy()), dtype=torch.long)
    return to_labels(train), to_labels(heldout) if len(heldout) else torch.zeros(0, dtype=torch.long), clusters


def folder_images(folder: str | Path, resolution: int, channels: int, *, max_images: int | None = None) -> ImageData:
    """Every image under ``folder`` (sorted by path), square-cropped and resized, in ``[-1, 1]``.

    Raises :class:`FileNotFoundError` when the folder is missing or holds no image, and
    :class:`ValueError` when the hash split leaves either side empty (too few images).
    """
    image_module = require("PIL.Image", package="pillow")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--image-dir {str(folder)!r} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if max_images is not None:
        paths = paths[:max_images]
    if not paths:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_SUFFIXES)}) under {str(folder)!r}")
    mode = "L" if channels == 1 else "RGB"
    tensors, relative, classes = [], [], []
    for path in paths:
        with image_module.open(path) as image:
            image = _square(image.convert(mode)).resize((resolution, resolution), image_module.Resampling.BICUBIC)
            array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensors.append(array.reshape(resolution, resolution, channels).permute(2, 0, 1))
        rel = path.relative_to(root)
        relative.append(rel.as_posix())
        classes.append(rel.parts[0] if len(rel.parts) > 1 else "")
    images = _to_unit_range(torch.stack(tensors).float() / 255.0)
    held = torch.tensor([is_heldout_path(r) for r in relative])
    if held.all() or not held.any():
        raise ValueError(f"{len(paths)} images under {str(folder)!r} are too few for a held-out split")
    train, heldout = images[~held].contiguous(), images[held].contiguous()
    names = sorted(set(classes))
    if len(names) >= 2 and "" not in names:
        index = {name: i for i, name in enumerate(names)}
        labels = torch.tensor([index[c] for c in classes], dtype=torch.long)
        train_labels, heldout_labels, num_classes, label_source = labels[~held], labels[held], len(names), "classes"
    else:
        train_labels, heldout_labels, num_classes = _kmeans_labels(train, heldout, PSEUDO_CLASSES)
        label_source = "kmeans"
    return ImageData(
        train=train,
        train_labels=train_labels,
        heldout=heldout,
        heldout_labels=heldout_labels,
        num_classes=num_classes,
        label_source=label_source,
        source={
            "name": "folder",
            "origin": str(root),
            "files": len(paths),
            "split": f"sha256 of the relative path, {HELDOUT_FRACTION:g} held out",
            **({"classes": names} if label_source == "classes" else {}),
        },
    )


def _hub_images(split: Any, resolution: int, channels: int, limit: int | None) -> tuple[Tensor, Tensor]:
    rows = range(len(split)) if limit is None else range(min(limit, len(split)))
    images, labels = [], []
    mode = "L" if channels == 1 else "RGB"
    for i in rows:
        row = split[i]
        image = row["img"].convert(mode)
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution))
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        images.append(array.reshape(resolution, resolution, channels).permute(2, 0, 1))
        labels.append(int(row["label"]))
    return _to_unit_range(torch.stack(images).float() / 255.0), torch.tensor(labels, dtype=torch.long)


def cifar10_images(resolution: int = 32, channels: int = 3, *, max_images: int | None = None) -> ImageData:
    """CIFAR-10 from the Hugging Face Hub (``datasets``): train split for training, test split held out.

    ``max_images`` caps each split (the first images of each). Needs internet access the first
    time (``datasets`` caches the download) and ``pip install datasets``.
    """
    datasets = require("datasets", hint="pip install datasets")
    splits = datasets.load_dataset(CIFAR10_DATASET)
    train, train_labels = _hub_images(splits["train"], resolution, channels, max_images)
    heldout, heldout_labels = _hub_images(splits["test"], resolution, channels, max_images)
    return ImageData(
        train=train,
        train_labels=train_labels,
        heldout=heldout,
        heldout_labels=heldout_labels,
        num_classes=10,
        source={
            "name": "cifar10",
            "origin": f"Hugging Face Hub {CIFAR10_DATASET} via datasets",
            "split": "train / test",
        },
    )


def load_image_data(
    resolution: int,
    channels: int,
    *,
    image_dir: str | None = None,
    cifar10: bool = False,
    max_images: int | None = None,
) -> ImageData:
    """The images of a run: ``image_dir``, CIFAR-10, or (default) the bundled digits.

    ``max_images`` caps the number of images read (digits: of each split, the first ones).
    """
    if image_dir and cifar10:
        raise ValueError("image_dir and cifar10 are two different datasets: give one of them")
    if image_dir:
        return folder_images(image_dir, resolution, channels, max_images=max_images)
    if cifar10:
        return cifar10_images(resolution, channels, max_images=max_images)
    data = digit_images(resolution, channels)
    if max_images is not None:
        data.train, data.train_labels = data.train[:max_images], data.train_labels[:max_images]
        data.heldout, data.heldout_labels = data.heldout[:max_images], data.heldout_labels[:max_images]
        data.source["max_images"] = max_images
    return data


# ------------------------------------------------------------------------------------------ training and held-out draws


class ShuffledBatches:
    """The order of a training stream: the indices of ``batch_size`` of ``size`` items at a time, a fresh
    permutation per epoch (the last partial batch of an epoch dropped).

    A job's stream subclasses it and draws the rest of a batch (noise, times) from the same
    :attr:`generator`, seeded with ``seed``, so every optimizer sees the same batches;
    :meth:`state_dict` / :meth:`load_state_dict` resume it exactly.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int) -> None:
        if batch_size > size:
            raise ValueError(f"batch size {batch_size} exceeds the {size} training images")
        self.batch_size = batch_size
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def next_index(self) -> Tensor:
        """The indices of the next batch."""
        if self.cursor + self.batch_size > len(self.order):
            self.order = torch.randperm(self.size, generator=self.generator)
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.order = state["order"].cpu()
        self.cursor = int(state["cursor"])


def heldout_draws(
    images: Tensor, repeats: int, strata: Callable[[int], Tensor], *, seed: int = HELDOUT_SEED
) -> tuple[Tensor, Tensor, Tensor]:
    """``(tiled, times, noise)``: each image ``repeats`` times, the ``strata(n)`` of its ``n`` rows (one time per
    stratum) in a seeded random order, and seeded noise of their shape."""
    generator = torch.Generator().manual_seed(seed)
    tiled = images.repeat(repeats, 1, 1, 1)
    n = len(tiled)
    times = strata(n)[torch.randperm(n, generator=generator)]
    noise = torch.randn(tiled.shape, generator=generator)
    return tiled, times, noise


# ------------------------------------------------------------------------------------------ PNG grids


def save_sample_grid(images: Tensor, path: str | Path, *, columns: int = 8, min_side: int = 512) -> Path | None:
    """A PNG grid of ``images`` (N, C, H, W in ``[-1, 1]``), upscaled (nearest) to about ``min_side``
    pixels; ``None`` (nothing written) when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i, image in enumerate((images.float().clamp(-1, 1) + 1) / 2):
        r, col = divmod(i, columns)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            image
        )
    factor = max(1, math.ceil(min_side / max(grid.shape[1:])))
    grid = grid.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    plt.imsave(path, array, cmap="gray" if c == 1 else None, vmin=0.0, vmax=1.0)
    return path
