"""Quality of class-conditional samples, judged by a small classifier trained on the real training images.

Two figures, in the spirit of Inception Score / FID at the scale of 8x8 digits:
- sample accuracy: how often the classifier assigns a generated image to the label it was generated for;
- Frechet distance between the classifier's penultimate features of generated images and of held-out real
  images (Heusel et al. 2017). `real_frechet` is the same distance for as many real *training* images: the
  floor a perfect generator would reach at this sample size.
The classifier is trained on the CPU from a fixed seed, so every run scores with the same judge.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import rng
from .checkpoint import atomic_write
from .data import ImageData

__all__ = ["FeatureClassifier", "train_classifier", "cached_classifier", "frechet_distance", "evaluate"]

CLASSIFIER_FILE = "classifier.safetensors"


class FeatureClassifier(nn.Module):
    """flatten -> 256 -> `feature_dim` (the features) -> classes; a plain MLP is enough for 8x8 digits."""

    def __init__(self, image_shape: tuple[int, ...], num_classes: int, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(image_shape)), 256),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(256, feature_dim),
            nn.GELU(),
        )
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def train_classifier(
    data: ImageData, steps: int = 1500, batch_size: int = 128, seed: int = 0
) -> FeatureClassifier:
    """Train the judge on the CPU (fixed seed; light noise augmentation so it is not fooled by tiny noise)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.derive_seed(seed, rng.EVAL))
        clf = FeatureClassifier(data.image_shape, data.num_classes)
        opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        clf.train()
        for _ in range(steps):
            idx = torch.randint(len(data), (min(batch_size, len(data)),))
            batch = data.batch(idx)
            x = batch["y"] + 0.05 * torch.randn_like(batch["y"])
            loss = nn.functional.cross_entropy(clf(x), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def _fingerprint(data: ImageData) -> str:
    crc = zlib.crc32(data.images.numpy().tobytes())
    crc = zlib.crc32(data.labels.numpy().tobytes(), crc)
    return f"{len(data)}-{data.num_classes}-{crc:08x}"


def cached_classifier(run_dir: str | os.PathLike | None, data: ImageData) -> FeatureClassifier:
    """The judge for `data`: loaded from run_dir/classifier.safetensors if it was trained on the same data."""
    path = Path(run_dir) / CLASSIFIER_FILE if run_dir is not None else None
    fp = _fingerprint(data)
    if path is not None and path.is_file():
        clf = FeatureClassifier(data.image_shape, data.num_classes)
        try:
            tensors = load_file(path)
            if json.loads(tensors.pop("__meta__").numpy().tobytes().decode()).get("data") == fp:
                clf.load_state_dict(tensors)
                return clf.eval()
        except Exception:  # a stale or damaged cache is simply rebuilt
            pass
    clf = train_classifier(data)
    if path is not None:
        meta = torch.frombuffer(bytearray(json.dumps({"data": fp}).encode()), dtype=torch.uint8)
        tmp = path.with_suffix(".tmp")
        save_file({**clf.state_dict(), "__meta__": meta}, tmp)
        os.replace(tmp, path)
    return clf


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) between two sets of feature rows (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    covmean = covmean.real  # imaginary parts are rounding noise for PSD products
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def _score(clf: FeatureClassifier, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = images.detach().float().cpu().clamp(-1, 1)
    feats = clf.features(x)
    return feats.numpy(), clf.out(feats).argmax(1).numpy()


def evaluate(
    model,
    train_data: ImageData,
    test_data: ImageData,
    *,
    run_dir=None,
    per_class: int = 50,
    num_steps: int | None = None,
    sampler: str = "heun",
    cfg_scale: float = 1.0,
    seed: int = 0,
    classifier: FeatureClassifier | None = None,
) -> dict:
    """Generate `per_class` samples of every class and score them; also writes run_dir/eval.json if given.

    classifier: the judge to use; None = the one cached in run_dir (trained on train_data if absent).
    """
    from .sample import sample  # late: sample imports the task registry, which is heavier than this module

    clf = classifier if classifier is not None else cached_classifier(run_dir, train_data)
    test_feats, test_pred = _score(clf, test_data.images)
    labels = torch.arange(train_data.num_classes).repeat_interleave(per_class)
    images = sample(model, labels, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed)
    gen_feats, gen_pred = _score(clf, images)
    g = np.random.default_rng(rng.derive_seed(seed, rng.EVAL))
    ref_idx = g.choice(len(train_data), size=min(len(labels), len(train_data)), replace=False)
    ref_feats, _ = _score(clf, train_data.images[torch.as_tensor(ref_idx)])
    result = {
        "sample_accuracy": float((gen_pred == labels.numpy()).mean()),
        "frechet_distance": frechet_distance(gen_feats, test_feats),
        "real_frechet": frechet_distance(ref_feats, test_feats),
        "classifier_test_accuracy": float((test_pred == test_data.labels.numpy()).mean()),
        "num_samples": int(len(labels)),
        "num_test": len(test_data),
        "num_steps": num_steps,
        "sampler": sampler,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "samples": images.detach().float().cpu(),
    }
    if run_dir is not None:
        on_disk = {k: v for k, v in result.items() if k != "samples"}
        atomic_write(Path(run_dir) / "eval.json", json.dumps(on_disk, indent=1).encode())
    return result
