"""Class-conditional image generation with a DiT (Peebles & Xie 2023) trained as DiffusionBlocks.

y is the image, x the class label. Every block owns its whole path from noisy image to denoised image:
patch embedding and position table, sigma and label embeddings, its L/B AdaLN-Zero layers and its output
head (DESIGN.md section 3). The target space (pixels) is shared by construction, so block b's output is
block b+1's input at sampling time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data import ImageData
from ..nn import AdaLNFinalLayer, AdaLNZeroLayer, LabelEmbedding, SigmaEmbedding, init_linears_
from .base import continuous_process, draw_rows, layer_count

__all__ = ["DiTConfig", "DiTBlock", "ImageGeneration", "patchify", "unpatchify"]


@dataclass
class DiTConfig:
    image_size: int = 8  # pixels per side (square images)
    channels: int = 1  # image channels
    patch_size: int = 2  # pixels per patch side; must divide image_size
    hidden: int = 128  # width of the transformer
    heads: int = 4  # attention heads; must divide hidden
    num_layers: int = 6  # L, layers of the whole model, split over the blocks
    mlp_ratio: float = 4.0  # MLP width / hidden
    num_classes: int = 10  # class labels 0..num_classes-1; index num_classes is "no label"
    label_dropout: float = 0.1  # probability a training label is replaced by "no label" (for CFG)
    sigma_data: float = 0.5  # EDM's sigma_data

    def validate(self) -> None:
        positive = ("image_size", "channels", "patch_size", "hidden", "heads", "num_layers", "num_classes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.hidden % self.heads:
            raise ValueError(f"heads {self.heads} must divide hidden {self.hidden}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, (H/p)(W/p), C p p), patches in row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of patchify."""
    n = x.shape[0]
    x = x.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


class DiTBlock(nn.Module):
    """F(c_in z, c_noise, label) of one block: stem, embeddings, `num_layers` AdaLN-Zero layers, head."""

    def __init__(self, cfg: DiTConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.kernels = "auto"  # which ops implementation the loss uses; set with nn.set_kernels()
        p, d = cfg.patch_size, cfg.hidden
        tokens = (cfg.image_size // p) ** 2
        self.patch_embed = nn.Linear(cfg.channels * p * p, d)
        self.pos_embed = nn.Parameter(torch.empty(1, tokens, d))
        self.sigma_embed = SigmaEmbedding(d)
        self.label_embed = LabelEmbedding(cfg.num_classes, d)
        self.layers = nn.ModuleList(AdaLNZeroLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.head = AdaLNFinalLayer(d, cfg.channels * p * p)
        self._init_weights()

    def _init_weights(self) -> None:
        init_linears_(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for m in self.sigma_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # AdaLN-Zero: every modulation and the output head start at zero, so F = 0 and D = c_skip z at init
        for m in [layer.modulation for layer in self.layers] + [self.head.modulation, self.head.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h = self.patch_embed(patchify(x, cfg.patch_size)) + self.pos_embed
        c = self.sigma_embed(c_noise) + self.label_embed(labels)
        for layer in self.layers:
            h = layer(h, c)
        out = self.head(h, c)
        return unpatchify(out, cfg.patch_size, cfg.channels, cfg.image_size, cfg.image_size)


class ImageGeneration:
    """The task: y = image, x = class label; L2 score matching weighted by w(sigma) (EDM)."""

    kind = "image-generation"

    def __init__(self, config: DiTConfig | None = None):
        self.config = config or DiTConfig()
        self.config.validate()

    @classmethod
    def for_data(cls, data: ImageData, **overrides) -> ImageGeneration:
        """A task whose image size, channels and class count are read off `data`."""
        c, h, w = data.image_shape
        if h != w:
            raise ValueError(
                f"{data.name}: images are {h}x{w}; only square images are supported (crop or pad)"
            )
        return cls(
            DiTConfig(**{"image_size": h, "channels": c, "num_classes": data.num_classes, **overrides})
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": asdict(self.config)}

    def build_block(self, index: int, layers: range | int) -> DiTBlock:
        return DiTBlock(self.config, layer_count(layers))

    def check_data(self, data: ImageData) -> None:
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if data.image_shape != want:
            raise ValueError(
                f"{data.name}: images are {data.image_shape} (C, H, W), the model expects {want}"
            )
        if int(data.labels.max()) >= cfg.num_classes:
            raise ValueError(
                f"{data.name}: label {int(data.labels.max())} out of range for num_classes={cfg.num_classes}"
            )

    def sample_shape(self, n: int) -> tuple[int, ...]:
        cfg = self.config
        return (n, cfg.channels, cfg.image_size, cfg.image_size)

    def check_cond(self, labels: torch.Tensor) -> None:
        """Sampling labels must be real classes (the "no label" index is for guidance only)."""
        bad = labels[(labels < 0) | (labels >= self.config.num_classes)]
        if bad.numel():
            raise ValueError(f"labels must be in [0, {self.config.num_classes}), got {bad[:5].tolist()}")

    def null_cond(self, labels: torch.Tensor) -> torch.Tensor:
        """The "no label" condition of the same shape, for classifier-free guidance."""
        return torch.full_like(labels, self.config.num_classes)

    def noise_process(self, noise, num_blocks: int):
        """EDM (the default) or flow matching (noise.process = "flow")."""
        return continuous_process(self, noise, num_blocks, allowed=("edm", "flow"))

    def loss(
        self,
        block: DiTBlock,
        batch: dict,
        level: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
        *,
        process,
    ):
        """(loss, per_sample) for one batch at per-example noise levels (N,) drawn by the caller from
        `process` (Task.loss): EDM's w(sigma) ||D - y||^2, or flow matching's ||F - v||^2."""
        y, labels = batch["y"], batch["label"]
        n = y.shape[0]
        drop = draw_rows(lambda m: torch.rand(m, generator=generator, device=y.device), rows, n)
        labels = torch.where(drop < self.config.label_dropout, self.null_cond(labels), labels)
        shape = y.shape[1:]
        eps = draw_rows(
            lambda m: torch.randn((m, *shape), generator=generator, device=y.device, dtype=y.dtype), rows, n
        )
        z = process.noisy(y, eps, level)
        net_in, c_noise = process.inputs(z, level, self.config.sigma_data)
        f = block(net_in, c_noise, labels)
        return process.loss(z, f, y, eps, level, self.config.sigma_data, kernels=block.kernels)

    @torch.no_grad()
    def denoise(
        self, block: DiTBlock, z: torch.Tensor, level: torch.Tensor, labels: torch.Tensor, *, process
    ) -> torch.Tensor:
        """D(z, level, label): the estimate of y (EDM: c_skip z + c_out F(c_in z, c_noise, label))."""
        net_in, c_noise = process.inputs(z, level, self.config.sigma_data)
        f = block(net_in, c_noise, labels).float()
        return process.denoised(z, f, level, self.config.sigma_data)
