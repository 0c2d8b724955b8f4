"""Byte-level autoregressive language modelling as DiffusionBlocks (the paper's AR row, PAPER.md).

A window holds T = seq_len bytes s_0..s_{T-1}. The target of position i is y_i = E[s_i], a row of a frozen,
seeded, L2-normalised table E (256 x emb_dim) shared by every block (DESIGN.md section 3, exactly as
classification's label table). The block input is the concatenation [clean tokens s_0..s_{T-1} | noisy
tokens z_0..z_{T-1}], z_i = y_i + sigma * eps_i with one sigma per sequence, and the attention mask

    clean i -> clean j  iff j <= i     (causal; clean tokens never see noisy ones)
    noisy i -> clean j  iff j < i      (the context of byte i)
    noisy i -> noisy j  iff j == i     (itself only; noisy token 0 sees nothing else)

so noisy token i denoises byte s_i from its prefix, and all T positions train in parallel (DESIGN.md
section 2, "Autoregressive LM"). Every block owns its whole network F: byte embedding of the clean tokens,
the projection of c_in z, a position table used by both halves, a clean/noisy type embedding, its sigma
embedding (the AdaLN conditioning of every token) and its L/B AdaLN-Zero layers, and a head from each noisy
token to 256 logits. The loss is w(sigma) (clamped) times the mean over positions of CE(logits_i, s_i); the
denoiser output between blocks at inference is D = softmax(logits) @ E, as in classification.

Inference takes one Euler step per block (base.inference_sigmas, "middle"): `token_logits` for all
positions of a window at once (teacher forcing, `bits_per_byte`), and `generate`, which keeps, per step, the
keys and values of the clean tokens computed at that step's fixed sigma, so a new byte costs one one-token
pass per block. The end-to-end baseline (`ARBaselineLM`, `train_baseline`) is the same transformer on the
clean tokens alone with a causal mask and a learned constant conditioning vector.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, precond, rng
from ..data import VOCAB_BYTES
from ..nn import AdaLNFinalLayer, AdaLNZeroLayer, SigmaEmbedding, attention, init_linears_
from .base import DiscreteTargetTask, euler_step, resolve_sigmas, validate_target_fields
from .baseline import train_end_to_end
from .text import check_generation, check_tokens, next_byte_bits, pick_next, require_text

__all__ = [
    "ARConfig",
    "ARBlock",
    "ARBaselineLM",
    "AutoregressiveLM",
    "ar_mask",
    "cached_layer_forward",
    "token_logits",
    "bits_per_byte",
    "generate",
    "train_baseline",
    "baseline_bits_per_byte",
    "baseline_generate",
]

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

    def validate(self) -> None:
        for name in ("hidden", "heads", "num_layers", "emb_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ARConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(
                f"ARConfig.seq_len must be >= 2 (byte 0 has no context to predict from), got {self.seq_len}"
            )
        validate_target_fields(self)


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
        self.z_in = nn.Linear(cfg.emb_dim, cfg.hidden)
        self.type_embed = nn.Parameter(torch.empty(2, cfg.hidden))  # row 0: clean, row 1: noisy
        self._init_stem()
        for m in self.sigma_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # small, as classification's label token: at high noise c_in z is pure noise, which must not drown
        # the context the noisy token reads through attention before the block has learned to use it
        nn.init.normal_(self.z_in.weight, std=0.02)
        nn.init.normal_(self.type_embed, std=0.02)

    def embed_clean(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.embed_tokens(tokens, start) + self.type_embed[0]

    def embed_noisy(self, z_in: torch.Tensor, start: int = 0) -> torch.Tensor:
        """c_in z (N, t, emb_dim) of positions start..start+t-1 -> (N, t, hidden); noisy i has position i."""
        self._check_len(z_in.shape[1], start)
        return self.z_in(z_in) + self.pos_embed[start : start + z_in.shape[1]] + self.type_embed[1]

    def forward(self, tokens: torch.Tensor, c_noise: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        c = self.sigma_embed(c_noise)
        h = torch.cat([self.embed_clean(tokens), self.embed_noisy(z_in.to(c.dtype))], dim=1)
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
    between uses, so the caller passes the module it just got from model._block_module."""

    def __init__(self, sigma: float, sigma_data: float, num_layers: int):
        self.sigma = sigma
        self.c_in = float(precond.c_in(torch.tensor(sigma, dtype=torch.float32), sigma_data))
        self.c: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.length = 0

    def _cond(self, block: ARBlock, n: int, device: torch.device) -> torch.Tensor:
        if self.c is None:
            s = torch.full((n,), self.sigma, dtype=torch.float32, device=device)
            self.c = block.sigma_embed(precond.c_noise(s))
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

    def noisy_logits(self, block: ARBlock, z: torch.Tensor) -> torch.Tensor:
        """Logits (N, 256) of the noisy token at position `length` (z: (N, emb_dim)): it attends to all
        cached clean tokens (positions < length) and to itself, and is not cached."""
        c = self._cond(block, z.shape[0], z.device)
        h = block.embed_noisy((self.c_in * z)[:, None], self.length)
        for i, layer in enumerate(block.layers):
            h, _ = cached_layer_forward(layer, h, c, self.kv[i])
        return block.head(h, c)[:, 0]


class AutoregressiveLM(DiscreteTargetTask):
    """The task: y_i = E[s_i] (frozen byte embedding), x = the clean window; w(sigma)-weighted CE of every
    noisy position's logits."""

    kind = "autoregressive-lm"
    num_targets = VOCAB

    def __init__(self, config: ARConfig | None = None):
        super().__init__(config or ARConfig())

    @classmethod
    def for_data(cls, data, **overrides) -> AutoregressiveLM:
        """A task whose seq_len is read off `data` (a TextData)."""
        require_text(data)
        return cls(ARConfig(**{"seq_len": data.seq_len, **overrides}))

    def build_block(self, index: int, num_layers: int) -> ARBlock:
        return ARBlock(self.config, num_layers)

    def check_data(self, data) -> None:
        require_text(data, self.config.seq_len)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        """The shape of the noisy targets z of n windows: (n, seq_len, emb_dim)."""
        return (n, self.config.seq_len, self.config.emb_dim)

    def check_cond(self, tokens: torch.Tensor) -> None:
        """The conditioning of inference is a batch of byte windows (N, t), 1 <= t <= seq_len, in 0..255."""
        check_tokens(tokens, self.config.seq_len, "tokens")

    def null_cond(self, tokens: torch.Tensor) -> torch.Tensor:
        """Not defined: the LM has no unconditional mode, so there is no classifier-free guidance."""
        raise ValueError(
            "classifier-free guidance is not defined for the autoregressive language model; use cfg_scale=1"
        )

    def logits(self, block: ARBlock, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        """The head's logits (N, t, 256) for noisy targets z (N, t, emb_dim) at sigma (N,), given tokens."""
        s = sigma.to(torch.float32)
        c_in = precond.c_in(s, self.config.sigma_data).to(z.dtype).view(-1, 1, 1)
        return block(tokens, precond.c_noise(s), c_in * z)

    def loss(
        self,
        block: ARBlock,
        batch: dict,
        sigma: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
    ):
        """(loss, per_sample) for one batch of windows at per-window noise levels sigma (N,).

        per_sample[n] = min(w(sigma_n), max_weight) * mean_i CE(logits_{n,i}, s_{n,i}); loss = its mean.
        rows=(start, total): `batch` and `sigma` are rows [start, start + N) of a batch of `total` windows;
        the noise is drawn for all `total` rows and this share is cut from it (as classification's loss).
        """
        tokens = batch["tokens"]
        n, t = tokens.shape
        start, total = rows if rows is not None else (0, n)
        table = self.label_table(tokens.device)
        eps = torch.randn((total, t, table.shape[1]), generator=generator, device=tokens.device)
        s = sigma.to(torch.float32)
        z = table[tokens] + s.view(-1, 1, 1) * eps[start : start + n]
        logits = self.logits(block, z, s, tokens).float()
        # plain CE: at 256 classes the logits are small, and we need the per-window means
        ce = F.cross_entropy(logits.reshape(n * t, VOCAB), tokens.reshape(-1), reduction="none")
        per_sample = self.loss_weight(s) * ce.view(n, t).mean(1)
        return per_sample.mean(), per_sample

    @torch.no_grad()
    def denoise(self, block: ARBlock, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor):
        """D(z, sigma, window) = softmax(logits) @ E for all t noisy positions (N, t, emb_dim), given the
        clean window (N, t): the expected byte embedding of each position from its prefix and its z."""
        probs = self.logits(block, z, sigma, tokens).float().softmax(-1)
        return probs @ self.label_table(z.device)


def start_noise(task: AutoregressiveLM, n: int, sigma: float, seed: int) -> torch.Tensor:
    """z ~ N(0, sigma^2) for all seq_len positions of n windows (CPU, seeded): position i's start noise does
    not depend on how many positions are evaluated, so `generate` and `token_logits` start alike."""
    g = rng.generator("cpu", seed, rng.SAMPLE)
    return torch.randn(task.sample_shape(n), generator=g) * sigma


@torch.no_grad()
def token_logits(model, tokens: torch.Tensor, sigmas="middle", num_steps: int | None = None, seed: int = 0):
    """Teacher-forced logits (N, t, 256) of a BlockModel of an AutoregressiveLM: position i given s_<i.

    All t noisy positions in parallel: z ~ N(0, sigmas[0]^2) (seeded), one Euler step per sigma by the block
    that owns it, z' = z + (sigma' - sigma)(z - D)/sigma with D = softmax(logits) @ E, as
    classification.predict; returns the last step's logits (fp32, on the model's device).

    Args:
        tokens: (N, t) bytes, 1 <= t <= seq_len.
        sigmas: "middle" (default: one step per block), "boundary", or a decreasing sequence ending in 0.
    """
    task, dev, sch = model.task, model.device, model.schedule
    tokens = torch.as_tensor(tokens)
    task.check_cond(tokens)
    tokens = tokens.to(dev, torch.int64)
    sigmas = resolve_sigmas(sch, sigmas, num_steps)
    n, t = tokens.shape
    z = start_noise(task, n, float(sigmas[0]), seed)[:, :t].to(dev)
    table = task.label_table(dev)
    model.eval()
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        blk = sch.block_of(s)
        # the hooks BlockModel.denoise uses, so a paging.StreamedBlockModel streams its blocks here too
        logits = task.logits(model._block_module(blk), z, torch.full((n,), s, device=dev), tokens)
        model._after_use(blk)
        z = euler_step(z, logits.float().softmax(-1) @ table, s, s_next)
    return logits.float()


@torch.no_grad()
def bits_per_byte(
    model,
    data,
    max_windows: int | None = None,
    batch_size: int = 64,
    sigmas="middle",
    num_steps: int | None = None,
    seed: int = 0,
) -> float:
    """Teacher-forced bits per byte of a BlockModel on `data`: mean CE(token_logits) / ln 2 over positions
    1..T-1 of each window.

    Position 0 is left out: its noisy token sees no context (it models the unconditional byte
    distribution), and the baseline has no prediction for it at all, so both models are scored on the same
    bytes s_1..s_{T-1} given their prefixes inside the window. max_windows: that many windows spread evenly
    over `data` (None = all). Each batch draws its own start noise from (seed, batch index).

    Caution: one deterministic Euler step per block sharpens D towards its largest component at every
    lower-noise block, so the last step's logits are over-confident and this is not a likelihood of the
    chain. On pystdlib (hidden 64, 12 layers, B = 4, 300 steps a block) it gave 30.7 bits per byte, against
    4.3 for block 0 alone (sigmas=[sigma_max, 0]: the context-only predictor) and 3.6 for the baseline.
    """
    model.task.check_data(data)

    def logits_of(tokens, k):
        return token_logits(model, tokens, sigmas, num_steps, seed=rng.derive_seed(seed, k))[:, 1:]

    return next_byte_bits(data, max_windows, batch_size, model.device, logits_of)


# --- the end-to-end baseline --------------------------------------------------------------------------------
def train_baseline(task: AutoregressiveLM, data, config) -> ARBaselineLM:
    """The plain causal transformer (all task.num_layers layers) trained end to end with next-byte CE for
    config.steps_per_block steps: what one block of a DiffusionBlocks run takes, so total layer evaluations
    are equal (B blocks x steps x L/B layers = L x steps; the blocks' sequences are twice as long). The loop
    is tasks.baseline.train_end_to_end (batch size, AdamW, learning-rate schedule, clipping and seed of
    `config`; batches drawn as the Trainer draws block 0's)."""
    task.check_data(data)

    def loss(model, batch):
        tokens = batch["tokens"]
        logits = model(tokens)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    return train_end_to_end(lambda: ARBaselineLM(task.config), data, config, loss)


@torch.no_grad()
def baseline_bits_per_byte(
    model: ARBaselineLM, data, max_windows: int | None = None, batch_size: int = 64
) -> float:
    """Bits per byte of the baseline on `data` over the bytes bits_per_byte scores: s_1..s_{T-1} of each
    window given their prefixes (the same windows for the same max_windows)."""
    require_text(data, model.cfg.seq_len)
    model.eval()
    dev = next(model.parameters()).device
    return next_byte_bits(data, max_windows, batch_size, dev, lambda tokens, k: model(tokens)[:, :-1])


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    num_new: int,
    temperature: float = 0.0,
    seed: int = 0,
    sigmas="middle",
    num_steps: int | None = None,
    return_logits: bool = False,
):
    """Continue byte prompts with a BlockModel of an AutoregressiveLM, with a key/value cache.

    For each new position i: z_i ~ N(0, sigmas[0]^2) (seeded; the same start noise as token_logits), then
    for each inference step in order (one per block with "middle") ONE forward of the single noisy token i by
    that step's block, attending to the step's cached clean keys/values (positions < i) and itself, and an
    Euler step. After the last step the byte is the argmax of the logits (temperature 0) or a sample of
    softmax(logits / temperature); it is then appended as a clean token to every step's cache (one
    one-token pass per step, done just before that step's next noisy pass, so a paged model loads each block
    once a token). Each step's cache is built at that step's fixed sigma, since the clean stream is
    conditioned on sigma too. The prompt takes one pass per step. The result equals token_logits on the
    generated window up to rounding.

    Args:
        prompt: (N, P) bytes, P >= 0 (an empty prompt starts from the unconditional byte distribution).
        num_new: bytes to generate; P + num_new <= seq_len.
    Returns: (N, P + num_new) int64 bytes, prompt first, on the model's device; with return_logits=True also
    the last step's logits of the new positions, (N, num_new, 256) fp32.
    """
    task, dev, sch = model.task, model.device, model.schedule
    cfg = task.config
    prompt = check_generation(prompt, num_new, temperature, cfg.seq_len, min_prompt=0).to(dev)
    sigmas = resolve_sigmas(sch, sigmas, num_steps)
    steps = [(float(sigmas[k]), float(sigmas[k + 1])) for k in range(len(sigmas) - 1)]
    n, p = prompt.shape
    blocks = [sch.block_of(s) for s, _ in steps]
    caches = [StepCache(s, cfg.sigma_data, model.layers[b]) for (s, _), b in zip(steps, blocks)]
    z0 = start_noise(task, n, steps[0][0], seed).to(dev)
    table = task.label_table(dev)
    pick = rng.generator("cpu", seed, rng.SAMPLE, 1)
    out, new_logits = prompt, []
    model.eval()
    for i in range(p, p + num_new):
        z = z0[:, i]
        for (s, s_next), b, cache in zip(steps, blocks, caches):
            blk = model._block_module(b)
            if cache.length < i:  # the prompt (first token) or the byte chosen last
                cache.append(blk, out[:, cache.length : i])
            logits = cache.noisy_logits(blk, z).float()
            model._after_use(b)
            z = euler_step(z, logits.softmax(-1) @ table, s, s_next)
        new_logits.append(logits)
        out = torch.cat([out, pick_next(logits, temperature, pick)[:, None]], dim=1)
    if not return_logits:
        return out
    empty = torch.zeros(n, 0, VOCAB, device=dev)
    return out, (torch.stack(new_logits, dim=1) if new_logits else empty)


@torch.no_grad()
def baseline_generate(
    model: ARBaselineLM, prompt: torch.Tensor, num_new: int, temperature: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """Continue byte prompts (N, P), P >= 1, with the baseline (recomputing the prefix for every byte);
    greedy at temperature 0, else sampled as `generate` samples. Returns (N, P + num_new) int64."""
    dev = next(model.parameters()).device
    out = check_generation(prompt, num_new, temperature, model.cfg.seq_len, min_prompt=1).to(dev)
    pick = rng.generator("cpu", seed, rng.SAMPLE, 1)
    model.eval()
    for _ in range(num_new):
        out = torch.cat([out, pick_next(model(out)[:, -1].float(), temperature, pick)[:, None]], dim=1)
    return out
