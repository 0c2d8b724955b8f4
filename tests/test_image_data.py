"""The user's images: folders of PNG/JPEG/WebP files and Hugging Face datasets (data.load_images)."""

import json
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dblocks_fast.cli import main
from dblocks_fast.data import load_digits, load_image_folder, load_images

FAST = ["--steps-per-block", "2", "--batch-size", "8", "--warmup", "1", "--no-progress", "--blocks", "2"]
CLASSES = ("three", "one", "zero")  # folder names, sorted: one, three, zero


def _pixels(x: torch.Tensor) -> np.ndarray:
    """An (1, H, W) image in [-1, 1] as 0..255 bytes."""
    return np.round((x[0].numpy() + 1) * 127.5).astype(np.uint8)


def _digits_folder(root, per_class=14, captions=True):
    """Digits 3, 1, 0 as 8x8 grayscale PNGs in class folders; every other image with a caption."""
    d = load_digits("all")
    written = {}
    for name, digit in zip(CLASSES, (3, 1, 0)):
        (root / name).mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(d.labels.numpy() == digit)[:per_class]):
            px = _pixels(d.images[i])
            Image.fromarray(px, mode="L").save(root / name / f"{j:03d}.png")
            if captions and j % 2 == 0:
                (root / name / f"{j:03d}.txt").write_text(f"a handwritten {name}\n")
            written[f"{name}/{j:03d}.png"] = px
    return written


def test_an_image_folder_gives_labels_by_subfolder_captions_and_a_split_by_path(tmp_path):
    written = _digits_folder(tmp_path / "imgs")
    # one image of another size: 16x16, the 8x8 digit upscaled 2x; read back at the folder's 8x8
    big = tmp_path / "imgs" / "one" / "999.png"
    Image.fromarray(written["one/000.png"]).resize((16, 16), Image.Resampling.NEAREST).save(big)
    written["one/999.png"] = written["one/000.png"]
    every = load_image_folder(tmp_path / "imgs", "all")
    assert every.num_classes == 3 and every.class_names == ("one", "three", "zero")
    assert every.image_shape == (1, 8, 8) and len(every) == 3 * 14 + 1
    order = sorted(written)
    for k, rel in enumerate(order):  # sorted by path, label = the class folder's place in sorted order
        assert int(every.labels[k]) == every.class_names.index(rel.split("/")[0])
        got = _pixels(every.images[k])
        tol = 40 if rel == "one/999.png" else 0  # a resized image: bicubic, not exact; the rest exact
        assert np.abs(got.astype(int) - written[rel].astype(int)).max() <= tol, rel
    assert every.captions[order.index("three/002.png")] == "a handwritten three"
    assert every.captions[order.index("three/001.png")] is None
    train, test = load_image_folder(tmp_path / "imgs", "train"), load_image_folder(tmp_path / "imgs", "test")
    val = {r for r in order if zlib.crc32(r.encode()) % 10 == 0}  # the text data's rule, on the path
    assert 0 < len(val) < len(order) and len(test) == len(val) and len(train) == len(order) - len(val)
    at = [order.index(r) for r in sorted(val)]
    assert torch.equal(test.images, every.images[at]) and test.num_classes == train.num_classes == 3
    assert test.name == "imgs[test]"


def test_jpeg_webp_rgb_and_an_image_size_are_read(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for j in range(12):
        rgb = np.repeat(np.repeat(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), 4, 0), 4, 1)  # 12x16
        suffix = (".png", ".jpg", ".webp")[j % 3]
        kw = (
            {"quality": 100, "lossless": True}
            if suffix == ".webp"
            else {"quality": 95}
            if suffix == ".jpg"
            else {}
        )
        Image.fromarray(rgb).save(tmp_path / "a" / f"{j:02d}{suffix}", **kw)
    data = load_images(tmp_path / "a", "all", image_size=6)
    assert data.image_shape == (3, 6, 6) and data.num_classes == 1 and data.class_names is None
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    # 12x16 -> 6x8, then the center 6x6: columns 1..6 of the half-size image
    png = np.asarray(Image.open(tmp_path / "a" / "00.png").resize((8, 6), Image.Resampling.BICUBIC))
    want = png[:, 1:7].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1
    assert np.abs(data.images[0].numpy() - want).max() < 0.02


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: (r / "one" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"),
         "one/003.png: not a readable"),
        (lambda r: (r / "zero" / "777.txt").write_text("no image"),
         "caption {root}/zero/777.txt has no image"),
        (lambda r: (r / "seven").mkdir(), "class folder {root}/seven holds no images"),
        (lambda r: Image.new("L", (8, 8)).save(r / "loose.png"),
         "{root}/loose.png lies beside the class folders"),
    ],
)  # fmt: skip
def test_a_bad_folder_is_an_error_that_names_the_file(tmp_path, make, message):
    root = tmp_path / "imgs"
    _digits_folder(root, per_class=3, captions=False)
    make(root)
    with pytest.raises(ValueError, match=message.format(root=root).replace("(", r"\(")):
        load_image_folder(root, "all")


def test_an_empty_or_missing_folder_and_flags_that_do_not_fit(tmp_path):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=f"--data {tmp_path / 'empty'}: the folder holds no images"):
        load_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="--image-column name columns of a Hugging Face dataset"):
        load_images(tmp_path / "empty", image_column="img")
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="--image-size apply to image folders and datasets, not to an .npz"):
        load_images(tmp_path / "d.npz", image_size=4)


def test_train_from_a_folder_of_pngs_by_a_config_file_with_tensorboard(tmp_path, capsys):
    """The issue's "done when": `dblocks-fast train --config run.toml` on a folder of PNGs in class
    subfolders, logging to TensorBoard; then eval and sample find the data through the run folder."""
    _digits_folder(tmp_path / "digits_png", per_class=14)
    run = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'data = "{tmp_path / "digits_png"}"\nout = "{run}"\nlog = "tensorboard"\nno_eval = true\n'
        f"[optimizer]\nlr = 0.002\n"
    )
    assert main(["train", "--config", str(cfg), *FAST]) == 0
    assert "digits_png[train], 37 examples" in capsys.readouterr().out
    cli = json.loads((run / "cli.json").read_text())
    assert cli["data"] == str(tmp_path / "digits_png") and cli["preset"] == "digits-dit"
    assert cli["image_size"] == 8  # resolved from the first image, kept for eval, sample and resume
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["task"]["config"]["num_classes"] == 3
    assert manifest["task"]["config"]["image_size"] == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    grid = tmp_path / "grid.png"
    assert (
        main(["sample", "--run", str(run), "--per-class", "2", "--num-steps", "2", "--out", str(grid)]) == 0
    )
    assert "3 classes x 2 samples" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), *FAST, "--resume", "--image-size", "16"]) == 2
    assert "image_size: saved 8, now 16" in capsys.readouterr().err


def _hf_dataset(tmp_path, n=40):
    datasets = pytest.importorskip("datasets")  # the test extra installs it; this reads it
    d = load_digits("all")
    rows = {"picture": [], "digit": [], "text": []}
    for i in range(n):
        rows["picture"].append(Image.fromarray(_pixels(d.images[i]), mode="L"))
        rows["digit"].append(int(d.labels[i]))
        rows["text"].append(f"digit {int(d.labels[i])}")
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "digit": datasets.ClassLabel(num_classes=10),
            "text": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features), d


def test_a_datasets_dataset_from_disk_and_parquet(tmp_path, capsys):
    ds, d = _hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "saved"))
    cols = {"image_column": "picture", "label_column": "digit", "caption_column": "text"}
    every = load_images(tmp_path / "saved", "all", **cols)
    assert len(every) == 40 and every.num_classes == 10 and every.image_shape == (1, 8, 8)
    assert torch.equal(every.labels, d.labels[:40]) and every.captions[5] == f"digit {int(d.labels[5])}"
    assert np.array_equal(_pixels(every.images[7]), _pixels(d.images[7]))
    test = load_images(tmp_path / "saved", "test", **cols)
    val = [i for i in range(40) if zlib.crc32(f"row{i}".encode()) % 10 == 0]
    assert torch.equal(test.images, every.images[val])
    with pytest.raises(
        ValueError, match="no column 'img' \\(--image-column\\); the columns are: picture, digit, text"
    ):
        load_images(tmp_path / "saved", image_column="img")
    with pytest.raises(ValueError, match="no column 'image'; name the image column with --image-column"):
        load_images(tmp_path / "saved")
    ds.to_parquet(str(tmp_path / "d.parquet"))
    again = load_images(tmp_path / "d.parquet", "all", **cols)
    assert torch.equal(again.images, every.images) and torch.equal(again.labels, every.labels)

    run = tmp_path / "run"
    argv = ["train", *FAST, "--no-eval", "--data", str(tmp_path / "saved"), "--out", str(run)]
    assert main([*argv, "--image-column", "picture", "--label-column", "digit"]) == 0
    assert json.loads((run / "cli.json").read_text())["image_column"] == "picture"
    capsys.readouterr()
    assert main(["train", *FAST, "--no-eval", "--data", str(tmp_path / "saved"), "--image-column", "picture",
                 "--out", str(tmp_path / "r2"), "--label-column", "label"]) == 2  # fmt: skip
    assert (
        "no column 'label' (--label-column); the columns are: picture, digit, text" in capsys.readouterr().err
    )
