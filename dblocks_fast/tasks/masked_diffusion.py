"""Byte-level masked diffusion language model (MD4, Shi et al. 2024) trained as DiffusionBlocks.

Tokens are bytes 0..255 and MASK = 256 is the absorbing state. With alpha(t) = 1 - t, the forward process at
level t in (0, 1] replaces each byte of a sequence x of T bytes by MASK independently with probability t.
MD4's continuous-time ELBO (its weight -alpha'(t) / (1 - alpha(t)) is 1/t here), in nats per byte, is

    -log p(x) / T <= int_0^1 E_{z_t ~ q(. | x)} [ (1/t) sum_{i: z_t,i = MASK} -log p(x_i | z_t, t) ] / T dt

-alpha'(t) = 1 is constant, so DESIGN.md's equal-mass partition is one of equal widths: block b owns t in
[1 - (b+1)/B, 1 - b/B] (block 0, the input end of the network, the highest noise). For training each
interval is widened by gamma / B on both sides and clipped to [t_min, 1], which keeps 1/t finite.

Every block owns its whole bidirectional transformer (`MDMBlock`): byte embedding (257 rows, MASK included),
position table, embedding of t, its L/B AdaLN-Zero layers and a head to 256 logits (MASK is never predicted),
so training block b reads and writes block b's tensors only (DESIGN.md section 3). Nothing is shared between
blocks, not even a target table: what block b hands on at sampling time is a partly unmasked byte sequence,
which is block b+1's input as it is.

The embedding of t is DiT's timestep embedder: `SigmaEmbedding` (sinusoids, then an MLP) applied to 1000 t,
so the sinusoid bank sees t on DiT's timestep range [0, 1000] and resolves it as DiT does. For absorbing
masking the ideal prediction of a masked byte does not depend on t (the posterior of a masked byte given the
unmasked ones is the same at every t, as MD4 notes), but the AdaLN-Zero layers need a conditioning vector,
and t is the natural one: it tells a block how much context to expect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..data import TextData
from ..nn import AdaLNFinalLayer, AdaLNZeroLayer, SigmaEmbedding, init_linears_
from ..schedule import Masking
from .base import draw_rows, layer_count
from .text import eval_windows

__all__ = [
    "MASK",
    "VOCAB",
    "MDMConfig",
    "MDMBlock",
    "MaskedDiffusionLM",
    "elbo_bits_per_byte",
    "generate",
]

MASK = 256  # the absorbing state; bytes are 0..255
VOCAB = 256  # logits of the head: one per byte value (MASK is never a prediction)
TIME_SCALE = 1000.0  # t in [0, 1] -> DiT's timestep range before the sinusoid bank
_EVAL_CHUNK = 256  # windows per random stream of elbo_bits_per_byte (so results do not depend on batch_size)


@dataclass
class MDMConfig:
    seq_len: int = 128  # bytes per sequence: the TextData's window length
    hidden: int = 64  # width of the transformer
    heads: int = 4  # attention heads; must divide hidden
    num_layers: int = 12  # L, layers of the whole model, split over the blocks
    mlp_ratio: float = 4.0  # MLP width / hidden
    t_min: float = 1e-3  # lowest masking level trained at (caps the ELBO weight 1/t at 1/t_min); in (0, 1)
    rope: bool = True  # rotary positions in attention (besides the position table); False = the table only

    def validate(self) -> None:
        for name in ("seq_len", "hidden", "heads", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"MDMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"heads {self.heads} must divide hidden {self.hidden}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(
                f"t_min must lie in (0, 1) (the lowest masking level trained at; the ELBO weight is 1/t), "
                f"got {self.t_min}"
            )


# --- the block network ------------------------------------------------------------------------------------
class MDMBlock(nn.Module):
    """One block's whole network: logits (N, T, 256) of the clean bytes from noisy tokens (N, T) in 0..256
    (256 = MASK) and masking levels t (N,). Bidirectional: every position attends to every position."""

    def __init__(self, cfg: MDMConfig, num_layers: int):
        super().__init__()
        d = cfg.hidden
        self.seq_len = cfg.seq_len
        self.token_embed = nn.Embedding(MASK + 1, d)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, d))
        self.time_embed = SigmaEmbedding(d, scale=TIME_SCALE)
        self.layers = nn.ModuleList(AdaLNZeroLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(num_layers))
        for layer in self.layers:
            # a masked byte is predicted from its unmasked neighbours, so attention must find positions
            # relative to its own; with the learned table alone that is slow to learn (issue 21: 12 layers,
            # 300 steps, end to end on the easy text, 4.01 bits per byte without, 1.20 with; floor 4.05)
            layer.attn.rope = cfg.rope
        self.head = AdaLNFinalLayer(d, VOCAB)
        init_linears_(self)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.time_embed.mlp:  # DiT's timestep-embedder init
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # AdaLN-Zero: every layer starts as the identity. The head's weights are NOT zero (DiT zeroes them):
        # a masked byte's own residual stream holds no information about it (MASK + position), so with a zero
        # head and zero gates the head learns the byte frequencies through its bias and its weights see only
        # noise; the gradient into the layers, head weights x gates x attention, then stays near zero and the
        # model sits at the byte-frequency floor (issue 21: a 2-layer model stayed at log2(3) bits on
        # "abcabc..." for 200 steps with a zero head, 0.16 bits with this one; see
        # tests/test_masked_diffusion.py::test_two_layers_learn_a_periodic_toy_language)
        for m in [layer.modulation for layer in self.layers] + [self.head.modulation]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.linear.weight, std=0.02)
        nn.init.zeros_(self.head.linear.bias)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(t.float())
        h = self.token_embed(tokens) + self.pos_embed
        for layer in self.layers:
            h = layer(h, c)
        return self.head(h, c)


# --- the task ---------------------------------------------------------------------------------------------
class MaskedDiffusionLM:
    """The task: y = a byte sequence, absorbing-state masking at level t, the MD4 ELBO as the loss."""

    kind = "masked-diffusion-lm"

    def __init__(self, config: MDMConfig | None = None):
        self.config = config or MDMConfig()
        self.config.validate()

    @classmethod
    def for_data(cls, data: TextData, **overrides) -> MaskedDiffusionLM:
        """A task whose seq_len is read off `data` (a TextData)."""
        _require_text(data)
        return cls(MDMConfig(**{"seq_len": data.seq_len, **overrides}))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": asdict(self.config)}

    def build_block(self, index: int, layers: range | int) -> MDMBlock:
        return MDMBlock(self.config, layer_count(layers))

    def check_data(self, data) -> None:
        _require_text(data)
        want = self.config.seq_len
        if data.seq_len != want:
            raise ValueError(
                f"{getattr(data, 'name', 'data')}: windows are {data.seq_len} bytes, the model expects "
                f"seq_len={want}; cut the text with data.with_seq_len({want}), or build the task with "
                f"MaskedDiffusionLM.for_data(data)"
            )

    def noise_process(self, noise, num_blocks: int) -> Masking:
        """MD4's masking levels (schedule.Masking), widened by noise.gamma, from config.t_min up."""
        if noise.process not in ("auto", "masking"):
            raise ValueError(
                f"the masked diffusion LM trains with its own masking process, not {noise.process!r}; "
                f"leave noise.process (--noise) at 'auto'"
            )
        return Masking(num_blocks, noise.gamma, self.config.t_min)

    def loss(
        self,
        block: MDMBlock,
        batch: dict,
        t: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
        *,
        process=None,
    ):
        """(loss, per_sample) for one batch at per-example masking levels t (N,) drawn by the caller.

        per_sample[i] = (1/t_i) sum over the masked positions j of CE(logits_ij, x_ij), / seq_len: the MD4
        ELBO integrand in nats per byte (unmasked positions contribute nothing); loss = mean_i per_sample[i].
        Each position is masked independently with probability t_i (Task.loss: rows, generator).
        """
        tokens = batch["tokens"]
        n, length = tokens.shape
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},) for {n} sequences, got {tuple(t.shape)}")
        u = draw_rows(lambda m: torch.rand((m, length), generator=generator, device=tokens.device), rows, n)
        t64 = t.to(tokens.device, torch.float64)
        masked = u < t64[:, None]
        logits = block(tokens.masked_fill(masked, MASK), t64)
        ce = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens.reshape(-1), reduction="none")
        per_sample = (ce.view(n, length) * masked).sum(1) * (1.0 / (t64 * length)).float()
        return per_sample.mean(), per_sample

    @torch.no_grad()
    def denoise(
        self, block: MDMBlock, tokens: torch.Tensor, t: torch.Tensor, cond=None, *, process=None
    ) -> torch.Tensor:
        """The block's prediction of the clean bytes: logits (N, T, 256) float32 for noisy tokens (N, T) in
        0..256 (256 = MASK) at levels t (N,). softmax over the last axis is p(x_i | z_t) at every position;
        only the masked positions' rows are meaningful (the others are known). The model is unconditional:
        `cond` must be None."""
        if cond is not None:
            raise ValueError(
                "the masked diffusion LM is unconditional; pass cond=None (give a prompt instead)"
            )
        if tokens.ndim != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"tokens must have shape (N, {self.config.seq_len}), got {tuple(tokens.shape)}")
        t = torch.as_tensor(t, dtype=torch.float64, device=tokens.device).expand(tokens.shape[0])
        return block(tokens, t).float()

    def null_cond(self, cond):
        """Not defined: the model is unconditional, so there is no classifier-free guidance."""
        raise ValueError(
            "classifier-free guidance is not defined for the masked diffusion LM; use cfg_scale=1"
        )


def _require_text(data) -> None:
    if not all(hasattr(data, a) for a in ("seq_len", "batch")) or getattr(data, "vocab_size", None) != VOCAB:
        raise ValueError(
            f"the masked diffusion LM needs a byte-level text dataset cut into windows of seq_len bytes "
            f"(dblocks_fast.data.TextData, e.g. load_pystdlib() or load_text(path)), "
            f"got {type(data).__name__}"
        )


# --- evaluation -------------------------------------------------------------------------------------------
@torch.no_grad()
def elbo_bits_per_byte(
    model,
    data: TextData,
    num_levels: int = 16,
    max_windows: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """The ELBO of a trained BlockModel of a MaskedDiffusionLM on `data`, in bits per byte (an upper bound
    on the model's negative log-likelihood; any B, B = 1 being the end-to-end baseline).

    The estimate, unbiased for the integral over t in [0, 1] of the module docstring, averaged over windows:
    - t: stratified, one level per cell of num_levels equal cells, t_j = (j + u_j) / num_levels with u_j
      uniform, drawn per window; each level is evaluated by the block whose unwidened interval owns it.
    - masks, given t: the integrand (1/t) E[sum_masked CE] / T equals E[mean of CE over the masked positions]
      under the size-biased masks, i.e. one uniformly chosen position masked for sure and every other one
      with probability t (P(S) |S| / (t T) is exactly that law). That form has no 1/t weight, so its variance
      stays bounded as t -> 0, and a model with uniform logits scores exactly 8 bits.
    Everything random comes from `seed` alone (CPU generators, a stream per _EVAL_CHUNK windows), so the
    result depends neither on batch_size nor on the device. The mean is over windows and levels, / ln 2.

    Args:
        num_levels: levels of t per window (cells of the stratification).
        max_windows: evaluate this many windows, evenly spaced over `data`; None = all of them.
        batch_size: sequences per forward pass.
    """
    task, dev, num_blocks = model.task, model.device, model.num_blocks
    task.check_data(data)
    if num_levels < 1 or batch_size < 1:
        raise ValueError(f"num_levels and batch_size must be >= 1, got {num_levels} and {batch_size}")
    windows = eval_windows(data, max_windows)
    length = task.config.seq_len
    total, count = 0.0, 0
    model.eval()
    for c, c0 in enumerate(range(0, len(windows), _EVAL_CHUNK)):
        x = data.batch(windows[c0 : c0 + _EVAL_CHUNK])["tokens"]
        m = x.shape[0]
        g = rng.generator("cpu", seed, rng.EVAL, c)
        t = torch.arange(num_levels, dtype=torch.float64) + torch.rand(
            m, num_levels, dtype=torch.float64, generator=g
        )
        t = (t / num_levels).reshape(-1)
        u = torch.rand(m * num_levels, length, dtype=torch.float64, generator=g)
        sure = torch.randint(length, (m * num_levels, 1), generator=g)
        masked = (u < t[:, None]).scatter_(1, sure, True)
        x = x.repeat_interleave(num_levels, dim=0)  # row i * num_levels + j: window i at level j
        z = x.masked_fill(masked, MASK)
        owner = model.schedule.block_of(t)
        for b in range(num_blocks):
            rows = torch.nonzero(owner == b).squeeze(1)
            if rows.numel() == 0:
                continue
            with model.block(b) as block:  # so a paging.StreamedBlockModel streams its blocks here too
                for r in rows.split(batch_size):
                    logits = block(z[r].to(dev), t[r].to(dev)).float()
                    ce = F.cross_entropy(
                        logits.reshape(-1, VOCAB), x[r].to(dev).reshape(-1), reduction="none"
                    )
                    mk = masked[r].to(dev)
                    total += float(((ce.view(len(r), length) * mk).sum(1) / mk.sum(1)).double().sum())
        count += m * num_levels
    return total / count / math.log(2)


# --- generation -------------------------------------------------------------------------------------------
def _prompt_tensor(prompt, n: int, length: int) -> torch.Tensor:
    """A prefix (bytes, str, a sequence of ints, or a tensor (P,) or (n, P)) as (n, P) int64 on the CPU."""
    if isinstance(prompt, str):
        prompt = prompt.encode()
    if isinstance(prompt, (bytes, bytearray)):
        prompt = torch.tensor(list(prompt), dtype=torch.long)
    p = torch.as_tensor(prompt).cpu()
    if p.dtype.is_floating_point or p.dtype == torch.bool or p.ndim not in (1, 2):
        raise ValueError(
            f"prompt must be bytes or integers of shape (P,) or (n, P), got {p.dtype} {tuple(p.shape)}"
        )
    p = p.long().expand(n, -1) if p.ndim == 1 else p.long()
    if p.shape[0] != n:
        raise ValueError(f"a 2-D prompt needs one row per sample ({n}), got {p.shape[0]} rows")
    if p.shape[1] > length:
        raise ValueError(f"the prompt has {p.shape[1]} bytes, more than seq_len={length}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= VOCAB):
        raise ValueError(f"prompt bytes must be in [0, 255], got values in [{int(p.min())}, {int(p.max())}]")
    return p


@torch.no_grad()
def generate(model, n: int, num_steps: int | None = None, prompt=None, seed: int = 0) -> torch.Tensor:
    """n byte sequences from a trained BlockModel of a MaskedDiffusionLM by ancestral sampling (MD4).

    Start from all MASK at t = 1 and step down a uniform grid t_k = 1 - k / num_steps to 0: from t to s < t
    each still-masked position is unmasked with probability (t - s) / t (the reverse of alpha(t) = 1 - t),
    taking a byte drawn from the softmax of the logits of the block that owns t, so block b takes the
    num_steps / B steps from 1 - b/B down. The last step unmasks everything. The positions of `prompt` (a
    prefix: bytes, str, ints (P,), or a tensor (n, P)) are set at the start and never change.

    Args:
        num_steps: a multiple of B (every block takes the same number of steps); None = seq_len rounded up
            to a multiple of B (about one byte unmasked a step).
        seed: seeds every random draw (on the CPU, so the result does not depend on the device).
    Returns: (n, seq_len) int64 bytes on the CPU.
    """
    task, dev, num_blocks = model.task, model.device, model.num_blocks
    length = task.config.seq_len
    if not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n (number of samples) must be a positive integer, got {n!r}")
    if num_steps is None:
        num_steps = num_blocks * math.ceil(length / num_blocks)
    if not isinstance(num_steps, Integral) or num_steps < num_blocks or num_steps % num_blocks:
        raise ValueError(
            f"num_steps must be a positive multiple of the number of blocks ({num_blocks}) so every block "
            f"gets the same number of steps; got {num_steps!r}. "
            f"Try num_steps={num_blocks * max(1, round(num_steps / num_blocks))}."
        )
    z = torch.full((n, length), MASK, dtype=torch.long)
    if prompt is not None:
        p = _prompt_tensor(prompt, n, length)
        z[:, : p.shape[1]] = p
    g = rng.generator("cpu", seed, rng.SAMPLE)
    per_block = num_steps // num_blocks
    model.eval()
    for k in range(num_steps):
        b = k // per_block
        t = torch.full((n,), 1.0 - k / num_steps, dtype=torch.float64)
        with model.block(b) as block:
            logits = task.denoise(block, z.to(dev), t.to(dev))
        cdf = logits.double().softmax(-1).cpu().cumsum(-1)
        u = torch.rand(n, length, 1, dtype=torch.float64, generator=g) * cdf[..., -1:]
        draw = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=VOCAB - 1)
        # (t - s) / t = 1 / (num_steps - k) on this grid: exact, and 1 at the last step
        unmask = (z == MASK) & (torch.rand(n, length, dtype=torch.float64, generator=g) * (num_steps - k) < 1)
        z = torch.where(unmask, draw, z)
    return z
