"""Image classification with a ViT trained as DiffusionBlocks (the paper's ViT row, PAPER.md).

y is the label's embedding, a row of a frozen, seeded, L2-normalised table E (num_classes x emb_dim) that
is the same for every block (DESIGN.md section 3: the target space must be shared, so block b's output is
block b+1's input). x is the image. The table lives on the task object, never in a block: blocks hold fp32
parameters only and no buffers, which paging relies on.

Every block owns its whole network F: patch embedding, position table, sigma embedding, the projection of
the noisy label token c_in z (which takes the CLS slot), its L/B AdaLN-Zero layers conditioned on the sigma
embedding, and a head from the CLS token's final state to class logits. The loss is the w(sigma)-weighted
cross-entropy of those logits (DESIGN.md section 2, discrete targets); the denoiser output used between
blocks at inference is D = softmax(logits) @ E, a point of the target space. The table, the weighted CE
and the inference sigmas are what the autoregressive LM shares with this task: they live in tasks.base.

The end-to-end baseline (`ViTClassifier`, `train_baseline`) is the same ViT with a learned CLS token and a
learned constant in place of the sigma embedding, trained with plain cross-entropy and ordinary backprop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..data import ImageData
from ..nn import AdaLNFinalLayer, AdaLNZeroLayer, SigmaEmbedding, init_linears_
from .base import (
    DiscreteTargetTask,
    discrete_inference,
    draw_rows,
    inference_sigmas,
    label_table,
    layer_count,
    resolve_sigmas,
    validate_target_fields,
)
from .baseline import train_end_to_end
from .image_generation import patchify

__all__ = [
    "ViTConfig",
    "ViTBlock",
    "ViTClassifier",
    "ImageClassification",
    "label_table",
    "inference_sigmas",
    "predict",
    "train_baseline",
    "evaluate_accuracy",
]


@dataclass
class ViTConfig:
    image_size: int = 8  # pixels per side (square images)
    channels: int = 1  # image channels
    patch_size: int = 2  # pixels per patch side; must divide image_size
    hidden: int = 64  # width of the transformer
    heads: int = 4  # attention heads; must divide hidden
    num_layers: int = 12  # L, layers of the whole model, split over the blocks
    mlp_ratio: float = 4.0  # MLP width / hidden
    num_classes: int = 10  # class labels 0..num_classes-1
    emb_dim: int = 64  # width of the frozen label-embedding table E (the denoising target space)
    label_seed: int = 0  # seeds E; the same seed gives the same table for every block, task and process
    label_scale: float = (
        1.0  # length of E's rows (1 = L2-normalised, DESIGN.md); smaller: a weaker label token
    )
    max_weight: float | None = 1e3  # clamp of the loss weight w(sigma) (2.5e5 at sigma=0.002); None = none
    sigma_data: float = 0.5  # EDM's sigma_data (c_in and w)
    # logits = F + log p(z | label), exact (DiscreteTargetTask.log_likelihood), as the AR LM's (issue 21).
    # Off by default: on digits (the preset, B = 3, 1000 steps, seed 0) it gave no gain, test accuracy
    # 0.955 without, 0.955 with it (z_input=False, prior_loss=1), 0.936 with F still reading z: unlike the
    # LM's block 0, the ViT's blocks learned the image's class as fast as they learned to decode z.
    likelihood_skip: bool = False
    z_input: bool = True  # F reads c_in z in the CLS slot; False: a learned CLS token (needs the skip)
    prior_loss: float = 0.0  # weight of CE(F), the image's prior over the labels, beside the posterior's

    def validate(self) -> None:
        positive = (
            "image_size",
            "channels",
            "patch_size",
            "hidden",
            "heads",
            "num_layers",
            "emb_dim",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"ViTConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        validate_target_fields(self)


class _ViTStem(nn.Module):
    """Patch embedding, position table (CLS slot first), AdaLN-Zero layers and the head on the CLS token."""

    def __init__(self, cfg: ViTConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.kernels = "auto"
        p, d = cfg.patch_size, cfg.hidden
        tokens = (cfg.image_size // p) ** 2
        self.patch_embed = nn.Linear(cfg.channels * p * p, d)
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + tokens, d))
        self.layers = nn.ModuleList(AdaLNZeroLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.head = AdaLNFinalLayer(d, cfg.num_classes)

    def _init_stem(self) -> None:
        init_linears_(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        # AdaLN-Zero: every layer starts as the identity and the head at zero logits (uniform prediction)
        for m in [layer.modulation for layer in self.layers] + [self.head.modulation, self.head.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _encode(self, images: torch.Tensor, first: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) from images (N, C, H, W), the CLS-slot token (N, D) and conditioning c."""
        h = self.patch_embed(patchify(images, self.cfg.patch_size))
        h = torch.cat([first[:, None].to(h.dtype), h], dim=1) + self.pos_embed
        for layer in self.layers:
            h = layer(h, c)
        return self.head(h[:, :1], c)[:, 0]


class ViTBlock(_ViTStem):
    """F(c_in z, c_noise, image) of one block -> class logits; the noisy label token takes the CLS slot."""

    def __init__(self, cfg: ViTConfig, num_layers: int):
        super().__init__(cfg, num_layers)
        self.sigma_embed = SigmaEmbedding(cfg.hidden)
        self.label_in = nn.Linear(cfg.emb_dim, cfg.hidden) if cfg.z_input else None
        self.cls = None if cfg.z_input else nn.Parameter(torch.empty(1, cfg.hidden))
        self._init_stem()
        for m in self.sigma_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # small, like a CLS token: at high noise c_in z is pure noise, and a full-size random token in the
        # slot the head reads would drown the image features the block must learn to use first
        if self.label_in is not None:
            nn.init.normal_(self.label_in.weight, std=0.02)
        else:
            nn.init.normal_(self.cls, std=0.02)

    def forward(self, images: torch.Tensor, c_noise: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        first = self.cls.expand(z_in.shape[0], -1) if self.label_in is None else self.label_in(z_in)
        return self._encode(images, first, self.sigma_embed(c_noise))


class ViTClassifier(_ViTStem):
    """The end-to-end baseline: the same ViT with a learned CLS token, and a learned constant vector as the
    AdaLN conditioning (so its layers are exactly the blocks' layer type: LayerNorm with a learned affine
    and a zero-initialised gated residual)."""

    def __init__(self, cfg: ViTConfig, num_layers: int | None = None):
        super().__init__(cfg, cfg.num_layers if num_layers is None else num_layers)
        self.cls_token = nn.Parameter(torch.empty(1, cfg.hidden))
        self.cond = nn.Parameter(torch.empty(1, cfg.hidden))
        self._init_stem()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.cond, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        return self._encode(images, self.cls_token.expand(n, -1), self.cond.expand(n, -1))


class ImageClassification(DiscreteTargetTask):
    """The task: y = E[label] (frozen label embedding), x = image; w(sigma)-weighted CE on the head."""

    kind = "image-classification"

    def __init__(self, config: ViTConfig | None = None):
        super().__init__(config or ViTConfig())

    @property
    def num_targets(self) -> int:
        return self.config.num_classes

    @classmethod
    def for_data(cls, data: ImageData, **overrides) -> ImageClassification:
        """A task whose image size, channels and class count are read off `data`."""
        _require_images(data)
        c, h, w = data.image_shape
        if h != w:
            raise ValueError(
                f"{data.name}: images are {h}x{w}; only square images are supported (crop or pad)"
            )
        return cls(
            ViTConfig(**{"image_size": h, "channels": c, "num_classes": data.num_classes, **overrides})
        )

    def build_block(self, index: int, layers: range | int) -> ViTBlock:
        return ViTBlock(self.config, layer_count(layers))

    def check_data(self, data) -> None:
        _require_images(data)
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if tuple(data.image_shape) != want:
            raise ValueError(
                f"{data.name}: images are {tuple(data.image_shape)} (C, H, W), the model expects {want}"
            )
        lo, hi = int(data.labels.min()), int(data.labels.max())
        if lo < 0 or hi >= cfg.num_classes:
            raise ValueError(
                f"{data.name}: labels span [{lo}, {hi}], outside [0, {cfg.num_classes}) for "
                f"num_classes={cfg.num_classes}"
            )

    def sample_shape(self, n: int) -> tuple[int, ...]:
        """The shape of the noisy target z for n images: (n, emb_dim)."""
        return (n, self.config.emb_dim)

    def check_cond(self, images: torch.Tensor) -> None:
        """The conditioning of inference is a batch of images (N, C, H, W) of the model's shape."""
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != want or images.shape[0] == 0:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, want))}), got {tuple(images.shape)}"
            )

    def null_cond(self, images: torch.Tensor) -> torch.Tensor:
        """Not defined: the classifier has no unconditional mode, so there is no classifier-free guidance."""
        raise ValueError("classifier-free guidance is not defined for image classification; use cfg_scale=1")

    def loss(
        self,
        block: ViTBlock,
        batch: dict,
        sigma: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
        *,
        process,
    ):
        """(loss, per_sample) for one batch at per-example noise levels sigma (N,) drawn by the caller
        (Task.loss; `process` is EDM).

        per_sample[i] = min(w(sigma_i), max_weight) * CE(logits_i, label_i) (+ prior_loss * CE(F_i, label_i));
        loss = mean_i per_sample[i] (DiscreteTargetTask.target_loss).
        """
        images, labels = batch["y"], batch["label"]  # ImageData's keys: "y" holds the images here
        table = self.label_table(images.device)
        eps = draw_rows(
            lambda m: torch.randn((m, table.shape[1]), generator=generator, device=images.device),
            rows,
            images.shape[0],
        )
        s = sigma.to(torch.float32)
        z = process.noisy(table[labels], eps, s)
        # a fused linear-CE op would gain nothing at num_classes logits a row, and we need the per-row CE
        per_sample = self.target_loss(self.network_logits(block, z, s, images), z, s, labels)
        return per_sample.mean(), per_sample

    @torch.no_grad()
    def denoise(
        self, block: ViTBlock, z: torch.Tensor, sigma: torch.Tensor, images: torch.Tensor, *, process=None
    ) -> torch.Tensor:
        """D(z, sigma, image) = softmax(logits) @ E: the expected label embedding, a point of the target
        space (this is what the next block receives at inference; no c_skip/c_out here, since the head
        predicts a distribution over the table's rows, not a residual)."""
        probs = self.logits(block, z, sigma, images).float().softmax(-1)
        return probs @ self.label_table(z.device)


def _require_images(data) -> None:
    if not all(hasattr(data, a) for a in ("images", "labels", "image_shape", "num_classes")):
        raise ValueError(
            f"image classification needs an image dataset with images (N, C, H, W) and integer labels "
            f"(dblocks_fast.data.ImageData), got {type(data).__name__}"
        )
    if data.labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{getattr(data, 'name', 'data')}: labels must be integers, got {data.labels.dtype}")


# --- inference ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(
    model,
    images: torch.Tensor,
    sigmas="middle",
    num_steps: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
) -> torch.Tensor:
    """Class predictions of a trained BlockModel of an ImageClassification task.

    Start from z ~ N(0, sigmas[0]^2 I) in the label-embedding space (seeded; sigmas[0] = sigma_max for the
    built-in modes) and take Euler steps z' = z + (sigma' - sigma)(z - D)/sigma with D = softmax(logits) @ E,
    each by the block that owns sigma, from the highest noise (block 0) to the lowest. The prediction is the
    argmax of the last step's logits (argmax of D could differ: E's rows are not exactly orthogonal).

    Args:
        sigmas: "middle" (default: one step per block, see inference_sigmas), "boundary", or a decreasing
            sequence of sigmas ending in 0.
        num_steps: steps for sigmas="boundary" (a multiple of B; default B).
    Returns: labels (N,) int64, or the last step's logits (N, num_classes) with return_logits=True, on the
    model's device.
    """
    task, dev, sch = model.task, model.device, model.schedule
    images = torch.as_tensor(images).to(dev, torch.float32)
    task.check_cond(images)
    sigmas = resolve_sigmas(sch, sigmas, num_steps)
    g = rng.generator("cpu", seed, rng.SAMPLE)
    z = (torch.randn(task.sample_shape(images.shape[0]), generator=g) * float(sigmas[0])).to(dev)
    logits = discrete_inference(model, z, sigmas, images)
    return logits if return_logits else logits.argmax(-1)


# --- the end-to-end baseline --------------------------------------------------------------------------------
def train_baseline(task: ImageClassification, data: ImageData, config) -> ViTClassifier:
    """The plain ViT (all task.num_layers layers) trained end to end with CE for config.steps_per_block
    steps: what one block of a DiffusionBlocks run takes, so total layer evaluations are equal (B blocks x
    steps x L/B layers = L x steps). The loop is tasks.baseline.train_end_to_end."""
    task.check_data(data)

    def loss(model, batch):  # ImageData's keys: "y" holds the images
        return F.cross_entropy(model(batch["y"]).float(), batch["label"])

    return train_end_to_end(lambda: ViTClassifier(task.config), data, config, loss)


@torch.no_grad()
def evaluate_accuracy(model, data: ImageData, batch_size: int = 512, **predict_kwargs) -> float:
    """Top-1 accuracy on `data` of a ViTClassifier or of a BlockModel (through `predict`)."""
    correct = 0
    for i in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(i, min(i + batch_size, len(data))))
        if isinstance(model, ViTClassifier):
            dev = next(model.parameters()).device
            pred = model.eval()(batch["y"].to(dev)).argmax(-1)
        else:
            pred = predict(model, batch["y"], **predict_kwargs)
        correct += int((pred.cpu() == batch["label"]).sum())
    return correct / len(data)
