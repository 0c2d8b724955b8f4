"""Built-in datasets that need no download (DESIGN.md section 5), and the user's own images and text.

A dataset is an object with `len()` and `batch(indices) -> dict of tensors`; the task reads the keys it
needs. Splits are deterministic: the built-in digits and an .npz are stratified by label from a fixed seed;
text files, image folders and Hugging Face datasets are split by a stable hash of each file's relative path
(of each row's index where a row has no path), so every run, on every machine, sees the same split, and
adding an example never moves another between the splits.

The user's images (`load_images`): an .npz, a folder of PNG/JPEG/WebP files (class subfolders give the
labels, a .txt beside an image its caption), or a Hugging Face `datasets` dataset saved with `save_to_disk`
or as parquet files. Pillow decodes, resizes and center-crops; `datasets` reads the saved sets.
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
    "load_hf_images",
    "load_image_folder",
    "load_image_npz",
    "load_images",
    "load_pydoc_topics",
    "load_pystdlib",
    "load_text",
    "load_text_or_builtin",
    "TEXT_CORPORA",
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
    class_names: tuple[str, ...] | None = None  # class i's name (an image folder's subfolder), if known
    captions: list[str | None] | None = None  # each image's caption (a .txt beside it, a caption column)

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
        if self.captions is not None and len(self.captions) != len(self):
            raise ValueError(f"{self.name}: {len(self.captions)} captions for {len(self)} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.images[indices], "label": self.labels[indices]}

    def subset(self, indices: np.ndarray, name: str) -> ImageData:
        idx = torch.as_tensor(indices, dtype=torch.long)
        captions = None if self.captions is None else [self.captions[i] for i in idx.tolist()]
        return ImageData(
            self.images[idx].contiguous(),
            self.labels[idx].contiguous(),
            self.num_classes,
            name,
            self.class_names,
            captions,
        )


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


# --- image folders and datasets ---------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # Pillow modes read as one channel


def load_images(
    path: str | os.PathLike,
    split: str = "train",
    image_size: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """The user's images, whatever form they come in (what `--data` of the image presets reads):

    - an .npz of `images` and `labels` (load_image_npz; taken at their own size);
    - a folder saved by `datasets`' `save_to_disk`, a .parquet file, or a folder of .parquet files
      (load_hf_images; the columns named by image_column, caption_column, label_column);
    - any other folder: image files (load_image_folder).

    image_size: the side of the square images the model sees (resize the shorter side, crop the center); None
    takes the first image's shorter side.
    """
    path = os.fspath(path)
    columns = {"image_column": image_column, "caption_column": caption_column, "label_column": label_column}
    given_columns = [f"--{k.replace('_', '-')}" for k, v in columns.items() if v is not None]
    if os.path.isfile(path) and path.endswith(".npz"):
        if image_size is not None or given_columns:
            flags = ", ".join((["--image-size"] if image_size is not None else []) + given_columns)
            raise ValueError(f"--data {path}: {flags} apply to image folders and datasets, not to an .npz")
        return load_image_npz(path, split)
    if _is_hf_dataset(path):
        return load_hf_images(path, split, image_size, **columns)
    if given_columns:
        raise ValueError(
            f"--data {path}: {', '.join(given_columns)} name columns of a Hugging Face dataset, and {path} "
            f"is not one (a save_to_disk folder, a .parquet file or a folder of them)"
        )
    if os.path.isdir(path):
        return load_image_folder(path, split, image_size)
    if os.path.isfile(path):
        raise ValueError(
            f"--data {path}: not a kind of image data this reads; give an .npz, a folder of images, or a "
            f"Hugging Face dataset (save_to_disk folder or parquet)"
        )
    raise FileNotFoundError(f"--data {path}: no such file or folder")


def _visible(names) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _is_hf_dataset(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".parquet")
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    if names & {"dataset_info.json", "dataset_dict.json", "state.json"}:
        return True
    files = [n for n in _visible(names) if os.path.isfile(os.path.join(path, n))]
    return bool(files) and all(n.endswith(".parquet") for n in files)


def _hash_val(key: str, val_mod: int = 10) -> bool:
    """The split rule of every file-based set (split_files): validation when crc32(key) % val_mod == 0."""
    return zlib.crc32(key.encode()) % val_mod == 0


def _choose_split(keys: list[str], split: str, what: str) -> list[int]:
    """The positions of `split`'s examples among `keys` (relative paths, or row ids) by _hash_val."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return list(range(len(keys)))
    val = [_hash_val(k) for k in keys]
    chosen = [i for i, v in enumerate(val) if v == (split == "test")]
    if not chosen:
        raise ValueError(
            f"{what}: none of its {len(keys)} images falls in the {split} split (a hash of each path sends "
            f"about 1 in 10 to the test split); add images"
        )
    return chosen


def _to_array(img, size: int, gray: bool) -> np.ndarray:
    """A Pillow image as (C, size, size) float32 in [-1, 1]: the shorter side resized to size, the center
    cropped."""
    from PIL import Image, ImageOps

    img = img.convert("L" if gray else "RGB")
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    x = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return x[None] if gray else x.transpose(2, 0, 1)


def _open_image(path: str):
    """A decoded image, or a ValueError that names the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); remove or replace the file") from None


def load_image_folder(
    path: str | os.PathLike, split: str = "train", image_size: int | None = None
) -> ImageData:
    """Every PNG, JPEG and WebP file under a folder (hidden files and folders skipped).

    Labels: with class subfolders (path/<class>/.../<image>, torchvision's ImageFolder convention) each
    subfolder is a class, in sorted order of their names; with the images directly in the folder there is
    one class. Captions: a .txt of the same name beside an image is its caption. Images are converted to
    one channel when every one is grayscale, else to RGB, and resized (shorter side to `image_size`, None =
    the first image's shorter side) and center-cropped to a square. Split by a hash of each image's path
    relative to the folder, as load_text splits files.

    Errors name the file: a corrupt image, a caption without its image, an empty folder or class folder.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such folder")
    entries = _visible(os.listdir(root))
    subdirs = [d for d in entries if os.path.isdir(os.path.join(root, d))]
    images, captions = [], {}  # relative paths of the images; caption files by the image stem they belong to
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = _visible(dirnames)
        for f in _visible(filenames):
            rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            stem, suffix = os.path.splitext(rel)
            if suffix.lower() in IMAGE_SUFFIXES:
                images.append(rel)
            elif suffix.lower() == CAPTION_SUFFIX:
                captions[stem] = rel
    images.sort()
    if not images:
        raise ValueError(
            f"--data {root}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)} files, in class "
            f"subfolders or directly in it)"
        )
    stems = {os.path.splitext(r)[0] for r in images}
    orphans = sorted(c for stem, c in captions.items() if stem not in stems)
    if orphans:
        raise ValueError(
            f"--data {root}: caption {os.path.join(root, orphans[0])} has no image beside it (expected "
            f"{os.path.splitext(orphans[0])[0]} with one of {', '.join(IMAGE_SUFFIXES)})"
            + (f"; {len(orphans) - 1} more captions have none" if len(orphans) > 1 else "")
        )
    if subdirs:
        loose = [r for r in images if "/" not in r]
        if loose:
            raise ValueError(
                f"--data {root}: {os.path.join(root, loose[0])} lies beside the class folders "
                f"({', '.join(subdirs[:5])}); move it into its class folder"
            )
        per_class = {d: 0 for d in subdirs}
        for r in images:
            per_class[r.split("/", 1)[0]] += 1
        empty = [d for d, n in per_class.items() if n == 0]
        if empty:
            raise ValueError(
                f"--data {root}: class folder {os.path.join(root, empty[0])} holds no images; remove it or "
                f"add its images"
            )
        class_names = tuple(subdirs)
    else:
        class_names = ("",)
    label_of = {c: i for i, c in enumerate(class_names)}
    # the format of the whole folder, from the files' headers (cheap) so both splits agree
    gray, first = True, None
    for r in images:
        full = os.path.join(root, r)
        try:
            from PIL import Image

            with Image.open(full) as img:
                gray = gray and img.mode in _GRAY_MODES
                first = first or min(img.size)
        except Exception as e:
            raise ValueError(f"{full}: not a readable image ({e}); remove or replace the file") from None
    size = first if image_size is None else image_size
    if size < 1:
        raise ValueError(f"--image-size must be 1 or more, got {size}")
    chosen = _choose_split(images, split, f"--data {root}")
    arrays, labels, texts = [], [], []
    for i in chosen:
        full = os.path.join(root, images[i])
        arrays.append(_to_array(_open_image(full), size, gray))
        labels.append(label_of[images[i].split("/", 1)[0]] if subdirs else 0)
        cap = captions.get(os.path.splitext(images[i])[0])
        if cap is not None:
            with open(os.path.join(root, cap), encoding="utf-8", errors="replace") as f:
                cap = f.read().strip()
        texts.append(cap)
    name = os.path.basename(os.path.normpath(root)) + ("" if split == "all" else f"[{split}]")
    return ImageData(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor(labels, dtype=torch.int64),
        len(class_names),
        name,
        class_names if subdirs else None,
        texts if any(t is not None for t in texts) else None,
    )


def load_hf_images(
    path: str | os.PathLike,
    split: str = "train",
    image_size: int | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> ImageData:
    """A Hugging Face `datasets` dataset of images from disk: a folder written by `save_to_disk` (a
    Dataset, or a DatasetDict whose "train" and "test" splits are used as they are, or whose one split is
    split here), a .parquet file, or a folder of .parquet files.

    Columns: image_column (default "image": an Image feature, encoded bytes or an (H, W[, C]) array),
    label_column (default "label" if there is one, else every image is of one class; a ClassLabel, integers
    0..K-1 or strings, each distinct string a class in sorted order), caption_column (default: none). A
    column that is not there is an error naming the columns there are. Images are converted, resized and
    cropped as load_image_folder's; rows are split by a hash of the image's file name where it has one,
    else of the row's index.
    """
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data {path}: reading a Hugging Face dataset needs the datasets package: pip install datasets"
        ) from None
    path = os.fspath(path)
    where = f"--data {path}"
    if os.path.isdir(path) and not all(n.endswith(".parquet") for n in _visible(os.listdir(path))):
        ds = datasets.load_from_disk(path)
    else:
        files = (
            [path] if os.path.isfile(path) else [os.path.join(path, n) for n in _visible(os.listdir(path))]
        )
        ds = datasets.Dataset.from_parquet(files, keep_in_memory=True)
    presplit = False
    if isinstance(ds, datasets.DatasetDict):
        if {"train", "test"} <= set(ds):
            parts = [ds["train"], ds["test"]]
            presplit = split != "all"
            ds = ds[split] if presplit else datasets.concatenate_datasets(parts)
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
            parts = [ds]
        else:
            raise ValueError(
                f"{where}: a DatasetDict with splits {sorted(ds)}; it needs 'train' and 'test', or just one "
                f"split (split here by a hash)"
            )
    else:
        parts = [ds]
    columns = list(ds.column_names)

    def column(given: str | None, flag: str, default: str | None) -> str | None:
        """The column named by a flag (an error if it is not there), else the default if it is there."""
        if given is None:
            return default if default in columns else None
        if given not in columns:
            raise ValueError(f"{where}: no column {given!r} ({flag}); the columns are: {', '.join(columns)}")
        return given

    img_col = column(image_column, "--image-column", "image")
    if img_col is None:
        raise ValueError(
            f"{where}: no column 'image'; name the image column with --image-column; the columns are: "
            f"{', '.join(columns)}"
        )
    label_col = column(label_column, "--label-column", "label")
    caption_col = column(caption_column, "--caption-column", None)
    if len(ds) == 0:
        raise ValueError(f"{where}: the dataset holds no rows")
    # the classes from every split, so that train and test number them alike
    class_names = None
    if label_col is None:
        labels, num_classes = np.zeros(len(ds), dtype=np.int64), 1
    else:
        feature = ds.features[label_col]
        every = [v for part in parts for v in part[label_col]]
        if isinstance(feature, datasets.ClassLabel):
            class_names, num_classes = tuple(feature.names), feature.num_classes
            labels = np.asarray(ds[label_col], dtype=np.int64)
        elif every and all(isinstance(v, str) for v in every):
            class_names = tuple(sorted(set(every)))
            index = {c: i for i, c in enumerate(class_names)}
            labels, num_classes = np.asarray([index[v] for v in ds[label_col]], dtype=np.int64), len(index)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in every):
            labels, every = np.asarray(ds[label_col], dtype=np.int64), np.asarray(every, dtype=np.int64)
            if every.min() < 0:
                raise ValueError(f"{where}: column {label_col!r} holds a label < 0 ({every.min()})")
            _check_classes(every, path, MAX_CLASSES)
            num_classes = int(every.max()) + 1
        else:
            raise ValueError(
                f"{where}: column {label_col!r} must hold class indices (integers) or class names (text), "
                f"not {type(next(v for v in every if v is not None)).__name__}"
            )
    if isinstance(ds.features[img_col], datasets.Image):
        raw = ds.cast_column(img_col, datasets.Image(decode=False))[img_col]  # bytes and file name
    else:
        raw = ds[img_col]
    keys = [(r.get("path") if isinstance(r, dict) else None) or f"row{i}" for i, r in enumerate(raw)]
    chosen = list(range(len(ds))) if presplit else _choose_split(keys, split, where)
    decoded = [_hf_image(raw[i], f"{where}: row {i} of column {img_col!r}") for i in chosen]
    gray = all(im.mode in _GRAY_MODES for im in decoded)
    size = min(decoded[0].size) if image_size is None else image_size
    if size < 1:
        raise ValueError(f"--image-size must be 1 or more, got {size}")
    arrays = [_to_array(im, size, gray) for im in decoded]
    captions = None
    if caption_col is not None:
        text = ds[caption_col]
        captions = [None if text[i] is None else str(text[i]) for i in chosen]
    name = os.path.basename(os.path.normpath(path)) + ("" if split == "all" else f"[{split}]")
    return ImageData(
        torch.from_numpy(np.stack(arrays)),
        torch.from_numpy(labels[chosen]),
        num_classes,
        name,
        class_names,
        captions,
    )


def _hf_image(value, where: str):
    """A Pillow image from a datasets cell: {"bytes", "path"} (an undecoded Image), a Pillow image, or an
    (H, W[, C]) array of 0..255 integers."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(value["path"])
            else:
                raise ValueError("the cell holds neither bytes nor a path")
            img.load()
            return img
        if isinstance(value, Image.Image):
            return value
        a = np.asarray(value)
        if a.ndim in (2, 3) and a.size:
            return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        raise ValueError(f"expected an image, got {type(value).__name__} of shape {a.shape}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: not a readable image ({e})") from None


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


def load_pydoc_topics(split: str = "train", seq_len: int = 128) -> TextData:
    """English prose that every Python carries: the reference manual's topics that `help()` prints
    (`pydoc_data.topics`, about 0.46 MB in 79 topics on CPython 3.11: statements, operators, the data model,
    with short code examples), as UTF-8 bytes in sorted order of the topic names. Split by topic, as
    load_pystdlib splits by file: a topic is validation ("test") when crc32 of its name % 10 == 0 (8 topics,
    about 54 KB on 3.11). The topics differ between Python versions, so the name records the version."""
    import platform

    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - a Python built without its pydoc data
        raise FileNotFoundError(
            "this Python has no pydoc_data.topics (the help() topics); pass your own text with --data PATH"
        ) from None
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    names = sorted(topics)
    if split != "all":
        val = {n for n in names if zlib.crc32(n.encode()) % 10 == 0}
        names = [n for n in names if (n in val) == (split == "test")]
    text = b"".join(topics[n].encode("utf-8") for n in names)
    name = f"pydoc-topics-{platform.python_version()}" + ("" if split == "all" else f"[{split}]")
    return TextData(
        torch.frombuffer(bytearray(text), dtype=torch.uint8), seq_len, name, len(names), split == "train"
    )


# the text corpora that need no download, by the name --data takes
TEXT_CORPORA = {"pystdlib": load_pystdlib, "pydoc-topics": load_pydoc_topics}


def load_text_or_builtin(
    path: str | os.PathLike | None, split: str = "train", seq_len: int = 128
) -> TextData:
    """load_text(path), or a built-in corpus when `path` is one of TEXT_CORPORA's names and no file or folder
    of that name exists (None = the standard library)."""
    if path is None:
        return load_pystdlib(split, seq_len)
    if not os.path.exists(path) and os.fspath(path) in TEXT_CORPORA:
        return TEXT_CORPORA[os.fspath(path)](split, seq_len)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--data {os.fspath(path)}: no such file or folder (expected a text file, a folder of them, or a "
            f"built-in corpus: {', '.join(TEXT_CORPORA)})"
        )
    return load_text(path, split, seq_len)


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
