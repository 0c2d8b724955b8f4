import numpy as np
import pytest
import torch

from dblocks_fast.data import load_digits, load_image_npz, stratified_split


def test_digits_split_is_deterministic_stratified_and_disjoint():
    tr, te, every = load_digits("train"), load_digits("test"), load_digits("all")
    assert len(tr) + len(te) == len(every) == 1797
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.float32
    assert tr.images.min() == -1 and tr.images.max() == 1
    counts = (
        torch.bincount(te.labels, minlength=10).float() / torch.bincount(every.labels, minlength=10).float()
    )
    assert ((counts - 0.2).abs() < 0.02).all()
    assert torch.equal(load_digits("test").images, te.images)
    flat = lambda d: {tuple(r) for r in d.images.flatten(1).tolist()}  # noqa: E731
    assert len(flat(tr) & flat(te)) < 10  # the set has a handful of duplicated images, nothing more


def test_stratified_split_covers_everything_once():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
    tr, va = stratified_split(labels, 0.2)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(18))
    assert np.bincount(labels[va]).tolist() == [2, 1, 1]


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "u8.npz"
    np.savez(p, images=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8), labels=np.arange(20) % 4)
    d = load_image_npz(p, "all")
    assert (
        d.images.shape == (20, 1, 6, 6)
        and d.num_classes == 4
        and -1 <= d.images.min()
        and d.images.max() <= 1
    )
    p2 = tmp_path / "f.npz"
    np.savez(p2, images=rng.uniform(-1, 1, (20, 3, 4, 4)).astype(np.float32), labels=np.arange(20) % 2)
    assert load_image_npz(p2, "train").images.shape == (16, 3, 4, 4)


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(images=np.zeros((4, 2, 2))), "missing array"),
        (dict(images=np.zeros((4, 2)), labels=np.zeros(4, int)), "must be \\(N, C, H, W\\)"),
        (dict(images=np.zeros((4, 2, 2)), labels=np.zeros(3, int)), "4 images but 3 labels"),
        (dict(images=np.full((4, 2, 2), 3.0), labels=np.zeros(4, int)), "must lie in \\[-1, 1\\]"),
        (dict(images=np.zeros((4, 2, 2)), labels=np.zeros(4)), "integer array"),
        (dict(images=np.full((4, 2, 2), np.nan), labels=np.zeros(4, int)), "NaN"),
    ],
)
def test_npz_loader_errors(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=match):
        load_image_npz(p, "all")


def test_npz_loader_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_image_npz(tmp_path / "junk.npz")
