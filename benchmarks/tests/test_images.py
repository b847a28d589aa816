"""The image sources of ``coap-bench ddpm``: digits, folders (classes or k-means labels), CIFAR-10."""

from __future__ import annotations

import doctest
import sys
import types

import pytest
import torch

pytest.importorskip("sklearn")

from coap_bench import images as images_module
from coap_bench.images import (
    digit_images,
    folder_images,
    image_sha256,
    is_heldout_path,
    load_image_data,
    resize_images,
)


def test_digits_are_resized_in_range_and_split_by_class():
    data = digit_images(resolution=16, channels=3)
    assert data.train.shape[1:] == (3, 16, 16) and data.heldout.shape[1:] == (3, 16, 16)
    assert (len(data.train), len(data.heldout)) == (1437, 360)
    assert float(data.train.min()) >= -1 and float(data.train.max()) <= 1
    assert torch.bincount(data.heldout_labels).min() >= 35  # stratified: every digit held out
    again = digit_images(resolution=16, channels=3).describe()
    assert again["train_sha256"] == data.describe()["train_sha256"]
    capped = load_image_data(8, 1, max_images=100)
    assert len(capped.train) == 100 and capped.source["max_images"] == 100


def test_module_examples_run():
    result = doctest.testmod(images_module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_hashes_and_resizing():
    x = torch.rand(2, 3, 8, 8)
    assert image_sha256(x) != image_sha256(x + 1)
    assert resize_images(x, 4, 1).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        resize_images(torch.rand(1, 2, 4, 4), 4, 3)
    assert is_heldout_path("x.png", 1.0) and not is_heldout_path("x.png", 0.0)


def _write(folder, names, size=(10, 12)):
    image = pytest.importorskip("PIL.Image")
    generator = torch.Generator().manual_seed(0)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(*size, 3, generator=generator) * 255).to(torch.uint8).numpy()
        image.fromarray(pixels, mode="RGB").save(path)


def test_a_flat_folder_gets_kmeans_labels(tmp_path):
    _write(tmp_path, [f"{i}.png" for i in range(40)] + ["notes.txt.jpg"])
    (tmp_path / "readme.txt").write_text("not an image")
    data = folder_images(tmp_path, 8, 3)
    assert data.label_source == "kmeans" and data.num_classes == 10
    assert len(data.train) + len(data.heldout) == 41 and data.train.shape[1:] == (3, 8, 8)
    assert int(data.train_labels.max()) < 10 and len(data.heldout_labels) == len(data.heldout)
    gray = folder_images(tmp_path, 8, 1)
    assert gray.train.shape[1] == 1


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        folder_images(tmp_path / "missing", 8, 1)
    with pytest.raises(FileNotFoundError, match="no image"):
        folder_images(tmp_path, 8, 1)
    _write(tmp_path, ["only.png"])
    with pytest.raises(ValueError, match="too few"):
        folder_images(tmp_path, 8, 1)


def test_cifar10_through_datasets(monkeypatch):
    """The CIFAR-10 path with a stand-in for `datasets` (the real one downloads from the Hub)."""
    image = pytest.importorskip("PIL.Image")

    def split(n):
        return [{"img": image.new("RGB", (32, 32), (i * 20, 0, 255)), "label": i % 10} for i in range(n)]

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name: {"train": split(12), "test": split(5)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_image_data(32, 3, cifar10=True, max_images=10)
    assert (len(data.train), len(data.heldout)) == (10, 5) and data.source["name"] == "cifar10"
    assert data.train.shape[1:] == (3, 32, 32) and float(data.train[0, 2].mean()) == pytest.approx(1.0)
    assert data.train_labels.tolist() == [i % 10 for i in range(10)]
    with pytest.raises(ValueError, match="two different datasets"):
        load_image_data(32, 3, cifar10=True, image_dir="x")
