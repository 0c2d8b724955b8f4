"""Built-in datasets that need no download (DESIGN.md section 5), and the user's own images.

A dataset is an object with `len()` and `batch(indices) -> dict of tensors`; the task reads the keys it
needs. Splits are deterministic: stratified by label, from a fixed seed, so every run sees the same split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ImageData", "load_digits", "load_image_npz", "stratified_split"]


@dataclass
class ImageData:
    """Images in [-1, 1] of shape (N, C, H, W) and integer class labels of shape (N,)."""

    images: torch.Tensor  # float32, (N, C, H, W), values in [-1, 1]
    labels: torch.Tensor  # int64, (N,), values in [0, num_classes)
    num_classes: int  # labels range over [0, num_classes); may exceed labels.max() + 1 for a split
    name: str = "images"  # for messages and the run manifest

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must have shape (N, C, H, W), got {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"{self.name}: labels must have shape ({self.images.shape[0]},) to match the images, "
                f"got {tuple(self.labels.shape)}"
            )
        if len(self) == 0:
            raise ValueError(f"{self.name}: the dataset is empty")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.images[indices], "label": self.labels[indices]}

    def subset(self, indices: np.ndarray, name: str) -> ImageData:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[idx].contiguous(), self.labels[idx].contiguous(), self.num_classes, name)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): val_fraction of each class, chosen by a fixed-seed permutation, both sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(len(members) * val_fraction))
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def _split(data: ImageData, split: str, val_fraction: float) -> ImageData:
    if split == "all":
        return data
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    train_idx, val_idx = stratified_split(data.labels.numpy(), val_fraction)
    return data.subset(train_idx if split == "train" else val_idx, f"{data.name}[{split}]")


def load_digits(split: str = "train", val_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as (N, 1, 8, 8) in [-1, 1].

    split: "train" (80%), "test" (the held-out 20%, stratified, fixed seed) or "all".
    """
    from sklearn.datasets import load_digits as _sk_digits  # bundled with scikit-learn: no download

    d = _sk_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values are 0..16
    labels = torch.from_numpy(d.target.astype(np.int64))
    return _split(ImageData(images, labels, 10, "digits"), split, val_fraction)


def load_image_npz(path: str | os.PathLike, split: str = "train", val_fraction: float = 0.2) -> ImageData:
    """The user's images from an .npz with `images` (N, C, H, W) or (N, H, W) and integer `labels` (N,).

    uint8 images are read as 0..255; float images must already lie in [-1, 1]. Split as load_digits.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file (expected an .npz with 'images' and 'labels')")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, pickle and format errors all mean the same thing to the user
        raise ValueError(f"--data {path}: not a readable .npz file ({e})") from e
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise ValueError(
            f"--data {path}: missing array(s) {sorted(missing)}; found {sorted(arrays)}. Save with "
            f"np.savez(path, images=images, labels=labels)."
        )
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"--data {path}: images must be (N, C, H, W) or (N, H, W), got shape {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(
            f"--data {path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(images):
        raise ValueError(f"--data {path}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0:
        raise ValueError(f"--data {path}: labels must be >= 0, found {labels.min()}")
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(images.dtype, np.floating):
        x = images.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"--data {path}: images contain NaN or infinity")
        if x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
            raise ValueError(
                f"--data {path}: float images must lie in [-1, 1], found [{x.min():.3g}, {x.max():.3g}]; "
                f"rescale them, or save uint8 pixels (0..255)"
            )
    else:
        raise ValueError(f"--data {path}: images must be uint8 or float, got {images.dtype}")
    name = os.path.basename(path)
    data = ImageData(
        torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1, name
    )
    return _split(data, split, val_fraction)
