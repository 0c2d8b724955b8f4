"""Built-in datasets that need no download (DESIGN.md section 5), and the user's own images and text.

A dataset is an object with `len()` and `batch(indices) -> dict of tensors`; the task reads the keys it
needs. Splits are deterministic: images are stratified by label from a fixed seed; text is split by file
(a stable hash of each file's relative path), so every run, on every machine, sees the same split.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import rng

__all__ = [
    "ImageData",
    "TextData",
    "training_batch",
    "load_digits",
    "load_image_npz",
    "load_pystdlib",
    "load_text",
    "split_files",
    "stratified_split",
]


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


# The most classes an .npz may ask for: labels are class indices 0..K-1 and every model holds a table of K
# rows a block, so one stray label (10**7) would build a 10-million-class model and run the machine out of
# memory. K is refused above MAX_CLASSES, and above max(1000, 100 x the number of images), where 99% of the
# classes would have no image: a sign of labels that are ids rather than indices.
MAX_CLASSES = 100_000


def load_image_npz(
    path: str | os.PathLike, split: str = "train", val_fraction: float = 0.2, max_classes: int = MAX_CLASSES
) -> ImageData:
    """The user's images from an .npz with `images` (N, C, H, W) or (N, H, W) and integer `labels` (N,).

    uint8 images are read as 0..255; float images must already lie in [-1, 1]. Split as load_digits.
    The classes are 0..labels.max(); more than max_classes, or than max(1000, 100 N), are refused (see
    MAX_CLASSES).
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
    if len(images) == 0:
        raise ValueError(
            f"--data {path} holds no images (images has shape {images.shape}); save at least one image of "
            f"each class"
        )
    if labels.min() < 0:
        raise ValueError(f"--data {path}: labels must be >= 0, found {labels.min()}")
    _check_classes(labels, path, max_classes)
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


def _check_classes(labels: np.ndarray, path: str, max_classes: int) -> None:
    limit = min(max_classes, max(1000, 100 * len(labels)))
    if int(labels.max()) < limit:
        return
    i = int(np.argmax(labels))
    raise ValueError(
        f"--data {path}: label {labels[i]} (of image {i}) asks for {int(labels[i]) + 1} classes; this file "
        f"may have at most {limit} (max(1000, 100 x its {len(labels)} images), and never more than "
        f"{max_classes}). Labels must be class indices 0..K-1: renumber them, e.g. "
        f"labels = np.unique(labels, return_inverse=True)[1]"
    )


# --- text (bytes) -----------------------------------------------------------------------------------------
VOCAB_BYTES = 256  # byte-level tasks: one token per byte value


@dataclass
class TextData:
    """A byte stream cut into non-overlapping windows of `seq_len` bytes; `batch` gives {"tokens": (n,
    seq_len) int64}. Window i is bytes [i * seq_len, (i + 1) * seq_len) of the stream (ragged end dropped).

    With random_offsets (the training splits of load_text and load_pystdlib), training (`training_batch`)
    shifts each drawn window by a random 0..seq_len-1 bytes, so a byte is not always seen at the same
    position of its window: on a fixed grid a model overfits to where sentences start (issue 21: 0.13 bits
    per byte on training windows, 3.5 on validation windows one byte off the grid). Evaluation reads the
    fixed grid (`batch`)."""

    data: torch.Tensor  # uint8, (num_bytes,): the split's files, concatenated in sorted path order
    seq_len: int  # bytes per example
    name: str = "text"  # for messages and the run manifest
    num_files: int = 0  # how many files the stream came from (for messages)
    random_offsets: bool = False  # training windows start at random offsets (training_batch); eval: grid

    def __post_init__(self):
        if self.data.dtype != torch.uint8 or self.data.ndim != 1:
            raise ValueError(f"{self.name}: data must be a 1-D uint8 tensor of bytes")
        if self.seq_len < 2:
            raise ValueError(f"{self.name}: seq_len must be >= 2, got {self.seq_len}")
        if len(self) == 0:
            raise ValueError(
                f"{self.name}: {self.data.numel()} bytes do not fill one window of seq_len={self.seq_len} "
                f"bytes; give more text or a shorter sequence length"
            )

    def __len__(self) -> int:
        return self.data.numel() // self.seq_len

    @property
    def vocab_size(self) -> int:
        return VOCAB_BYTES

    def batch(self, indices: torch.Tensor, shift: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Windows `indices` (n,); shift (n,) in [0, seq_len) moves window i to start at
        i * seq_len + shift_i (clamped so that the last window stays inside the stream)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"{self.name}: window index out of range [0, {len(self)})")
        start = idx * self.seq_len
        if shift is not None:
            last = self.data.numel() - self.seq_len
            start = (start + torch.as_tensor(shift, dtype=torch.long)).clamp_(max=last)
        offsets = start[:, None] + torch.arange(self.seq_len)
        return {"tokens": self.data[offsets].long()}

    def with_seq_len(self, seq_len: int) -> TextData:
        """The same bytes cut into windows of another length."""
        return TextData(self.data, seq_len, self.name, self.num_files, self.random_offsets)


def training_batch(data, indices: torch.Tensor, seed: int, block: int, step: int, rows=None) -> dict:
    """What training step `step` of block `block` reads: data.batch(indices[lo:hi]) (rows = (lo, hi), None
    = all), with each window shifted by a random offset when data.random_offsets is set (TextData).

    The offsets of the whole batch come from the stream (seed, WINDOW, block, step) before rows are cut, so
    they depend on nothing but the block and its step (DESIGN.md section 3: any order, process or data
    split of the batch reads the same bytes)."""
    lo, hi = rows if rows is not None else (0, len(indices))
    if not getattr(data, "random_offsets", False):
        return data.batch(indices[lo:hi])
    g = rng.generator("cpu", seed, rng.WINDOW, block, step)
    shift = torch.randint(data.seq_len, (len(indices),), generator=g)
    return data.batch(indices[lo:hi], shift[lo:hi])


def split_files(paths: list[str], root: str, val_mod: int = 10) -> tuple[list[str], list[str]]:
    """(train, validation) by file: a file is validation when crc32(its path relative to root) % val_mod == 0.

    The rule depends only on the path, so it is the same on every machine and run, and adding a file never
    moves another one between the splits."""
    val = [
        p for p in paths if zlib.crc32(os.path.relpath(p, root).replace(os.sep, "/").encode()) % val_mod == 0
    ]
    chosen = set(val)
    return [p for p in paths if p not in chosen], val


def _read(paths: list[str]) -> torch.Tensor:
    chunks = []
    for p in paths:
        with open(p, "rb") as f:
            chunks.append(f.read())
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def _text_split(paths: list[str], root: str, split: str, seq_len: int, name: str) -> TextData:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return TextData(_read(paths), seq_len, name, len(paths))
    train, val = split_files(paths, root)
    if train and val:
        chosen = train if split == "train" else val
        return TextData(_read(chosen), seq_len, f"{name}[{split}]", len(chosen), split == "train")
    # too few files for a split by file (one file, or none hashed to one side): the last 10% of every file
    # is the validation text
    parts = []
    for p in paths:
        b = _read([p])
        cut = int(b.numel() * 0.9)
        parts.append(b[:cut] if split == "train" else b[cut:])
    return TextData(torch.cat(parts), seq_len, f"{name}[{split}, by position]", len(paths), split == "train")


def pystdlib_files() -> tuple[list[str], str]:
    """The Python standard library's own .py files (sorted), without tests, idlelib and site-packages, and
    its root folder. About 11 MB in 674 files on CPython 3.11."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise FileNotFoundError(
            f"no .py files under the standard library folder {root}; this Python installation has no "
            f"library sources: pass your own text with --data PATH"
        )
    return sorted(files), root


def load_pystdlib(split: str = "train", seq_len: int = 128) -> TextData:
    """The Python standard library's source as bytes (DESIGN.md section 5): split by file, about 10% of the
    files (by a hash of the path) for validation ("test"). The files differ between Python versions, so
    results record the version."""
    files, root = pystdlib_files()
    import platform

    return _text_split(files, root, split, seq_len, f"pystdlib-{platform.python_version()}")


def load_text(path: str | os.PathLike, split: str = "train", seq_len: int = 128) -> TextData:
    """The user's text: one file, or every file under a folder (recursively, hidden ones skipped), as bytes.

    Split by file as load_pystdlib; a single file (or a folder too small for a split by file) is split by
    position, the last 10% of each file being the validation text."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files, root = [path], os.path.dirname(path) or "."
    elif os.path.isdir(path):
        root, files = path, []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        files.sort()
        if not files:
            raise ValueError(f"--data {path}: the folder holds no files (expected text files)")
    else:
        raise FileNotFoundError(
            f"--data {path}: no such file or folder (expected a text file or a folder of them)"
        )
    if sum(os.path.getsize(f) for f in files) == 0:
        raise ValueError(f"--data {path}: the text is empty")
    return _text_split(files, root, split, seq_len, os.path.basename(os.path.normpath(path)))
