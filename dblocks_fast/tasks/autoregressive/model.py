"""The networks of the autoregressive LM: its config, the block mask, the blocks, the end-to-end baseline, and
the key/value cache that generation runs the blocks with.

A block's input is [clean tokens s_0..s_{T-1} | noisy tokens z_0..z_{T-1}] under the mask

    clean i -> clean j  iff j <= i     (causal; clean tokens never see noisy ones)
    noisy i -> clean j  iff j < i      (the context of byte i)
    noisy i -> noisy j  iff j == i     (itself only; noisy token 0 sees nothing else)

and every block owns its whole network F: byte embedding of the clean tokens, the projection of c_in z
(only with `ARConfig.z_input`), a position table used by both halves, a clean/noisy type embedding, its
sigma embedding (the AdaLN conditioning of every token), its L/B AdaLN-Zero layers, and a head from each
noisy token to 256 logits.

Five choices found by measurement (issue 21; the first two on a tiny model on an easy text, block 0 of
B = 2 against a causal LM of its 2 layers, 200 steps: 4.15 against 2.29 bits per byte before, 2.40 after):
- noisy token i also holds the embedding of byte s_{i-1} (one it may see anyway; zero for i = 0), as the
  causal model's token i-1 holds its own byte. Without it block 0 must first learn to find position i-1
  through the position table before it can use any context (3.49 -> 2.37 at sigma = 2).
- the sigma embedding reads min(sigma, cond_sigma_max) (2 by default): above it the noisy token is nearly
  pure noise, and the training density (log-normal, P_mean -1.2, P_std 1.2) puts 0.2% of its draws above
  sigma = 10, so the embedding of sigma_max = 80, where generation starts, was an untrained extrapolation
  (block 0 scored 3.49 bits at sigma_max against 2.37 at sigma = 2).
- (with z_input) z_in's weight starts at std 0.02 / sqrt(emb_dim) (`ARConfig.z_in_std`), so the projection
  of c_in z, whose emb_dim components have unit variance at every sigma, starts as large as the token and
  position embeddings (std 0.02 a unit). With std 0.02 it started sqrt(emb_dim) = 8 times larger at the
  preset's emb_dim 64: at sigma_max the noisy token's input was mostly noise, which the block had to learn
  to suppress before its context could show, and block 0 sat at the byte-frequency floor for its first 100
  steps. Easy text, preset size (12 layers, B = 4, 300 steps), block 0 alone at sigma_max: 1.42 bits per
  byte (argmax accuracy 0.61) before, 0.33 (0.91) after, against 0.128 (0.96) for a causal LM of its 3
  layers; trained 800 steps at sigma ~ 80 alone with the old init it reaches 0.12, so the old init cost
  speed, not capacity.
- the logits are F + log p(z_i | byte), the exact Gaussian log-likelihood of the noisy token over the 256
  rows of E (DiscreteTargetTask.log_likelihood, `ARConfig.likelihood_skip`), and F does not read z
  (`ARConfig.z_input` False). Noisy token i sees no other noisy token, so the posterior of byte i is
  p(byte | s_<i) p(z_i | byte) / Z exactly: adding the likelihood leaves F one job at every sigma, the
  context's prior, which does not depend on sigma or z, so every training draw of every block supervises
  the next-byte predictor (as c_skip z carries what z already knows in EDM's D). Before, F had to learn
  z's likelihood itself, and block 0, trained at sigma in [0.68, 80] (B = 4) where z mostly reveals the
  byte, learned the context slowly. Standard library, preset size (12 layers, B = 4, 300 steps), block 0
  alone at sigma_max, seeds 0 / 1: 4.125 / 4.145 bits per byte before; 3.820 (seed 0) with the skip and
  F still reading z; 3.583 / 3.667 with the skip alone (and 3.583 / 3.630 with the prior's loss below),
  against 3.697 / 3.619 for a causal LM of its 3 layers (floor 4.710).
- the loss adds CE(F) to the posterior's w(sigma) CE (`ARConfig.prior_loss`, weight 1): under the skip the
  posterior's CE gives F a gradient only where z leaves the byte in doubt, which at the lower blocks'
  sigmas is seldom, so their priors stayed poor (easy text, preset size, seed 1, F alone at each block's
  middle sigma, blocks 0-3: 0.14 / 0.58 / 1.47 / 4.20 bits per byte); generation moves z between blocks
  off the training manifold (D plus little noise), where those priors decide bytes, and the easy text's
  temperature-1 continuations scored 2.03 bits per byte under a trigram judge against block 0's own 0.77.
  Both losses are minimised by the true prior, so the sum changes no optimum; with it: 0.13 / 0.40 / 0.42
  / 0.35, and block 1's posterior at z = y + sigma eps 0.173 -> 0.112 bits per byte (0.110 with F reading z
  and no skip).
`ARBaselineLM` is the same transformer on the clean tokens alone, causal, with a learned constant
conditioning vector.

The cache (`cached_layer_forward`, `StepCache`) keeps, per inference step, the keys and values of the clean
tokens computed at that step's fixed sigma, so a new byte costs one one-token pass per block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops, precond
from ...data import VOCAB_BYTES
from ...nn import AdaLNFinalLayer, AdaLNZeroLayer, SigmaEmbedding, attention, init_linears_
from ..base import validate_target_fields

__all__ = ["VOCAB", "ARConfig", "ARBlock", "ARBaselineLM", "ar_mask", "cached_layer_forward", "StepCache"]

VOCAB = VOCAB_BYTES  # byte-level: one class per byte value


@dataclass
class ARConfig:
    seq_len: int = 64  # T, bytes per window; the block input holds 2T tokens (clean | noisy)
    hidden: int = 64  # width of the transformer
    heads: int = 4  # attention heads; must divide hidden
    num_layers: int = 12  # L, layers of the whole model, split over the blocks
    mlp_ratio: float = 4.0  # MLP width / hidden
    emb_dim: int = 64  # width of the frozen byte-embedding table E (the denoising target space)
    label_seed: int = 0  # seeds E; the same seed gives the same table for every block, task and process
    label_scale: float = 1.0  # length of E's rows (1 = L2-normalised, DESIGN.md)
    max_weight: float | None = 1e3  # clamp of the loss weight w(sigma) (2.5e5 at sigma=0.002); None = none
    sigma_data: float = 0.5  # EDM's sigma_data (c_in and w)
    cond_sigma_max: float | None = 2.0  # blocks are conditioned on min(sigma, this); None = no clamp
    prev_byte: bool = True  # noisy token i also holds byte i-1's embedding; False = only the positions
    z_in_std: float | None = None  # init std of z_in's weight; None = 0.02 / sqrt(emb_dim) (module docstring)
    likelihood_skip: bool = True  # logits = F + log p(z | byte), exact (module docstring); False = F alone
    z_input: bool = False  # F also reads c_in z through z_in (needed when likelihood_skip is False)
    prior_loss: float = 1.0  # weight of CE(F) beside the posterior's (with likelihood_skip; module docstring)

    def validate(self) -> None:
        for name in ("hidden", "heads", "num_layers", "emb_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ARConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(
                f"ARConfig.seq_len must be >= 2 (byte 0 has no context to predict from), got {self.seq_len}"
            )
        validate_target_fields(self)
        if self.cond_sigma_max is not None and not self.cond_sigma_max > 0:
            raise ValueError(f"ARConfig.cond_sigma_max must be positive or None, got {self.cond_sigma_max}")
        if self.z_in_std is not None and not (self.z_in_std >= 0 and math.isfinite(self.z_in_std)):
            raise ValueError(f"ARConfig.z_in_std must be a finite value >= 0 or None, got {self.z_in_std}")

    @property
    def z_in_init_std(self) -> float:
        """The init std of z_in's weight: z_in_std, or 0.02 / sqrt(emb_dim) when None."""
        return 0.02 / math.sqrt(self.emb_dim) if self.z_in_std is None else float(self.z_in_std)


@functools.lru_cache(maxsize=32)
def _masks(t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (2T, 2T) block mask, the (T, T) causal mask), made once per length and device (blocks hold no
    buffers, so the mask is not one)."""
    i = torch.arange(t, device=device)
    causal = i[None, :] <= i[:, None]
    clean = torch.cat([causal, torch.zeros_like(causal)], dim=1)
    noisy = torch.cat([i[None, :] < i[:, None], i[None, :] == i[:, None]], dim=1)
    return torch.cat([clean, noisy], dim=0), causal


def ar_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (2T, 2T) boolean attention mask of a block (True = attend) over [clean | noisy]: see the module
    docstring. Every row attends to itself, so no row is empty."""
    return _masks(seq_len, torch.device(device))[0].clone()


class _ARStem(nn.Module):
    """Byte embedding, position table, AdaLN-Zero layers and the byte head: what the blocks and the baseline
    share in structure (each block has its own copy)."""

    def __init__(self, cfg: ARConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.tok_embed = nn.Embedding(VOCAB, d)
        self.pos_embed = nn.Parameter(torch.empty(cfg.seq_len, d))
        self.layers = nn.ModuleList(AdaLNZeroLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        self.head = AdaLNFinalLayer(d, VOCAB)

    def _init_stem(self) -> None:
        init_linears_(self)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        # AdaLN-Zero: every layer starts as the identity and the head at zero logits (8 bits per byte)
        for m in [layer.modulation for layer in self.layers] + [self.head.modulation, self.head.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_len(self, t: int, start: int = 0) -> None:
        if start + t > self.cfg.seq_len:
            raise ValueError(
                f"positions {start}..{start + t - 1} exceed the model's seq_len {self.cfg.seq_len} "
                f"(its position table)"
            )

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Bytes (N, t) at positions start..start+t-1 -> (N, t, hidden)."""
        self._check_len(tokens.shape[1], start)
        return self.tok_embed(tokens) + self.pos_embed[start : start + tokens.shape[1]]


class ARBlock(_ARStem):
    """F(c_in z, c_noise, clean bytes) of one block -> logits (N, T, 256) of the noisy half."""

    def __init__(self, cfg: ARConfig, num_layers: int):
        super().__init__(cfg, num_layers)
        self.sigma_embed = SigmaEmbedding(cfg.hidden)
        self.z_in = nn.Linear(cfg.emb_dim, cfg.hidden) if cfg.z_input else None
        self.type_embed = nn.Parameter(torch.empty(2, cfg.hidden))  # row 0: clean, row 1: noisy
        self._init_stem()
        for m in self.sigma_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # c_in z has unit variance in each of its emb_dim components, so a weight of std s gives each hidden
        # unit std s * sqrt(emb_dim): at s = 0.02 (the old init) that is 8 times the token and position
        # embeddings (std 0.02) at emb_dim 64, and pure noise at high sigma drowns the context (module
        # docstring). The default matches the embeddings.
        if self.z_in is not None:
            nn.init.normal_(self.z_in.weight, std=cfg.z_in_init_std)
        nn.init.normal_(self.type_embed, std=0.02)

    def embed_clean(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.embed_tokens(tokens, start) + self.type_embed[0]

    def embed_noisy(self, z_in: torch.Tensor, prev: torch.Tensor, start: int = 0) -> torch.Tensor:
        """c_in z (N, t, emb_dim) of positions start..start+t-1 -> (N, t, hidden); noisy i has position i and
        the embedding of byte i - 1, prev (N, t) (-1 where there is none: position 0). Without cfg.z_input
        z_in is not read (only its length is)."""
        self._check_len(z_in.shape[1], start)
        h = self.pos_embed[start : start + z_in.shape[1]] + self.type_embed[1]
        if self.z_in is not None:
            h = h + self.z_in(z_in)
        else:
            h = h.expand(z_in.shape[0], -1, -1)
        if self.cfg.prev_byte:
            h = h + self.tok_embed(prev.clamp(min=0)) * (prev >= 0)[..., None]
        return h

    def condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The AdaLN conditioning vector of sigma (N,) given as c_noise = ln(sigma) / 4, sigma clamped at
        cfg.cond_sigma_max (see the module docstring)."""
        if self.cfg.cond_sigma_max is not None:
            c_noise = c_noise.clamp(max=float(precond.c_noise(torch.tensor(self.cfg.cond_sigma_max))))
        return self.sigma_embed(c_noise)

    def forward(self, tokens: torch.Tensor, c_noise: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        c = self.condition(c_noise)
        prev = F.pad(tokens[:, :-1], (1, 0), value=-1)
        h = torch.cat([self.embed_clean(tokens), self.embed_noisy(z_in.to(c.dtype), prev)], dim=1)
        mask = _masks(t, h.device)[0]
        for layer in self.layers:
            h = layer(h, c, mask)
        return self.head(h[:, t:], c)


class ARBaselineLM(_ARStem):
    """The end-to-end baseline: the same transformer on the clean bytes only, causal, with a learned
    constant vector as the AdaLN conditioning (as classification.ViTClassifier); the head on token i
    predicts s_{i+1}."""

    def __init__(self, cfg: ARConfig, num_layers: int | None = None):
        super().__init__(cfg, cfg.num_layers if num_layers is None else num_layers)
        self.cond = nn.Parameter(torch.empty(1, cfg.hidden))
        self._init_stem()
        nn.init.normal_(self.cond, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        h = self.embed_tokens(tokens)
        c = self.cond.expand(n, -1)
        mask = _masks(t, h.device)[1]
        for layer in self.layers:
            h = layer(h, c, mask)
        return self.head(h, c)


# --- the key/value cache of generation --------------------------------------------------------------------
def cached_layer_forward(
    layer: AdaLNZeroLayer,
    x: torch.Tensor,
    c: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
):
    """AdaLNZeroLayer.forward for new tokens x (N, t, D) that attend to cached keys and values.

    Built from the layer's own submodules and ops in the order of AdaLNZeroLayer.forward; equal to it (to
    rounding) on the whole sequence when `past` holds the earlier tokens' keys/values of this layer.

    Args:
        c: (N, D) conditioning. past: (keys, values), each (N, heads, S, D/heads), or None (S = 0).
        mask: (t, S + t) boolean, True = attend, over [past | new]; None = attend to everything.
    Returns:
        (out (N, t, D), (keys, values)): the past and the new tokens' keys/values concatenated (S + t), what
        the cache holds next if the new tokens are kept.
    """
    n, t, d = x.shape
    attn = layer.attn
    shift1, scale1, gate1, shift2, scale2, gate2 = layer.modulation(F.silu(c)).chunk(6, dim=-1)
    h = ops.adaln_modulate(x, shift1, scale1, layer.eps, layer.kernels)
    q, k, v = attn.qkv(h).view(n, t, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    a = attn.proj(attention(q, k, v, mask).transpose(1, 2).reshape(n, t, d))
    x, h = ops.gated_residual_adaln(x, a, gate1, shift2, scale2, layer.eps, layer.kernels)
    return x + gate2[:, None] * layer.mlp(h), (k, v)


class StepCache:
    """The clean stream of one inference step (one block at one fixed sigma): its conditioning and each
    layer's keys/values of the clean tokens so far. It holds no block: a paged model may move the block
    between uses, so the caller passes the module it holds inside `with model.block(b)`."""

    def __init__(self, sigma: float, sigma_data: float, num_layers: int):
        self.sigma = sigma
        self.c_in = float(precond.c_in(torch.tensor(sigma, dtype=torch.float32), sigma_data))
        self.c: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.length = 0
        self.last: torch.Tensor | None = None  # (N,) the last clean byte appended: s_{i-1} of noisy i

    def _cond(self, block: ARBlock, n: int, device: torch.device) -> torch.Tensor:
        if self.c is None:
            s = torch.full((n,), self.sigma, dtype=torch.float32, device=device)
            self.c = block.condition(precond.c_noise(s))
        return self.c

    def append(self, block: ARBlock, tokens: torch.Tensor) -> None:
        """Clean tokens (N, t) at positions length..length+t-1: one pass, keys/values appended."""
        t, start = tokens.shape[1], self.length
        c = self._cond(block, tokens.shape[0], tokens.device)
        h = block.embed_clean(tokens, start)
        # the new tokens see every cached one and each other causally
        mask = None if t == 1 else torch.ones(t, start + t, dtype=torch.bool, device=h.device).tril(start)
        for i, layer in enumerate(block.layers):
            h, self.kv[i] = cached_layer_forward(layer, h, c, self.kv[i], mask)
        self.length += t
        self.last = tokens[:, -1]

    def noisy_logits(self, block: ARBlock, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, 256) of the noisy token at position `length` (z: (N, emb_dim)): it attends to all
        cached clean tokens (positions < length) and to itself, and is not cached."""
        c = self._cond(block, z.shape[0], z.device)
        if self.last is None:
            prev = torch.full((z.shape[0], 1), -1, dtype=torch.long, device=z.device)
        else:
            prev = self.last[:, None]
        h = block.embed_noisy((self.c_in * z)[:, None], prev, self.length)
        for i, layer in enumerate(block.layers):
            h, _ = cached_layer_forward(layer, h, c, self.kv[i])
        return block.head(h, c)[:, 0]
