"""The recurrent-depth (Huginn-style) baseline of the paper's recurrent-depth row (PAPER.md), and the helpers
that compare it with DiffusionBlocks.

The baseline is a byte-level causal LM in three parts: `prelude` layers read the bytes into an embedding e;
a latent state s_0 ~ state_std * N(0, I) (one vector per position, drawn from a torch.Generator) is updated
K times by the SAME recurrent core, s <- core(adapter([s | e])), adapter: Linear(2 hidden -> hidden); `coda`
layers and a byte head read the last state into 256 logits, token i predicting byte i+1. Every layer is a
causal AdaLNZeroLayer conditioned on a learned constant vector (as autoregressive.ARBaselineLM).

Training (`train_recurrent_baseline`) follows Huginn (Geiping et al. 2025): every step draws K from a
log-normal Poisson (`sample_iterations`) and backpropagates through only the last `backprop_iterations`
iterations (truncated backprop through depth; the earlier ones run under torch.no_grad()). At inference K is
chosen freely (`recurrent_bits_per_byte`, `recurrent_generate`).

The DiffusionBlocks side needs no new model: an autoregressive.AutoregressiveLM with num_layers = prelude +
core + coda trained with num_blocks = 1 is one denoiser over the whole sigma range (one sigma drawn per
window per step, one forward and one backward pass of all its layers), and iterating it K times at inference
is `generate(..., sigmas="boundary", num_steps=K)` / `bits_per_byte(..., sigmas="boundary", num_steps=K)`:
K Euler steps of the same network along the sampling sigmas. `recurrent_layer_evaluations` and
`diffusion_layer_evaluations` count the training compute of both sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..data import VOCAB_BYTES
from ..nn import AdaLNFinalLayer, AdaLNZeroLayer, init_linears_
from .baseline import train_end_to_end
from .text import check_generation, check_tokens, next_byte_bits, pick_next, require_text

__all__ = [
    "RecurrentConfig",
    "RecurrentDepthLM",
    "ITERATION_LOG_STD",
    "sample_iterations",
    "train_recurrent_baseline",
    "recurrent_bits_per_byte",
    "recurrent_generate",
    "recurrent_layer_evaluations",
    "diffusion_layer_evaluations",
]

VOCAB = VOCAB_BYTES
ITERATION_LOG_STD = 0.5  # sigma of the log-normal rate of sample_iterations (Huginn's value)


@dataclass
class RecurrentConfig:
    seq_len: int = 64  # T, bytes per window (the position table's length)
    hidden: int = 64  # width of every layer and of the recurrent state
    heads: int = 4  # attention heads; must divide hidden
    mlp_ratio: float = 4.0  # MLP width / hidden
    prelude: int = 2  # layers before the recurrence (bytes -> e); may be 0 (e = the embedding)
    core: int = 4  # layers of the recurrent core, applied once per iteration with the same weights
    coda: int = 2  # layers after the recurrence (state -> head); may be 0
    mean_iterations: int = 8  # mean number K of core iterations drawn per training step
    backprop_iterations: int = 2  # k: the last k iterations of a step get gradients (min(k, K))
    state_std: float = 1.0  # std of the random initial state s_0

    def validate(self) -> None:
        for name in ("hidden", "heads", "core", "mean_iterations", "backprop_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"RecurrentConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        for name in ("prelude", "coda"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(
                    f"RecurrentConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}"
                )
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(
                f"RecurrentConfig.seq_len must be an integer >= 2 (byte 0 has no context to predict from), "
                f"got {self.seq_len!r}"
            )
        if self.hidden % self.heads:
            raise ValueError(f"heads {self.heads} must divide hidden {self.hidden}")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"mlp_ratio must be a finite value > 0, got {self.mlp_ratio}")
        if not (self.state_std >= 0 and math.isfinite(self.state_std)):
            raise ValueError(f"state_std must be a finite value >= 0, got {self.state_std}")

    @property
    def num_layers(self) -> int:
        """prelude + core + coda: the layers of one pass with K = 1 (and of the DiffusionBlocks model)."""
        return self.prelude + self.core + self.coda


def _check_iterations(iterations, what: str = "iterations") -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {iterations!r}")
    return iterations


class RecurrentDepthLM(nn.Module):
    """prelude -> K x (adapter, core) from a random state -> coda -> byte head; see the module docstring.

    forward(tokens (N, t), iterations K) -> logits (N, t, 256); the head on token i predicts s_{i+1}. The
    parameters do not depend on K. A fresh model has identity layers (AdaLN-Zero) and a zero head (8 bits
    per byte).
    """

    def __init__(self, cfg: RecurrentConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.hidden

        def stack(n: int) -> nn.ModuleList:
            return nn.ModuleList(AdaLNZeroLayer(d, cfg.heads, cfg.mlp_ratio) for _ in range(n))

        self.tok_embed = nn.Embedding(VOCAB, d)
        self.pos_embed = nn.Parameter(torch.empty(cfg.seq_len, d))
        self.cond = nn.Parameter(torch.empty(1, d))
        self.prelude = stack(cfg.prelude)
        self.adapter = nn.Linear(2 * d, d)
        self.core = stack(cfg.core)
        self.coda = stack(cfg.coda)
        self.head = AdaLNFinalLayer(d, VOCAB)
        init_linears_(self)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cond, std=0.02)
        layers = [*self.prelude, *self.core, *self.coda]
        for m in [layer.modulation for layer in layers] + [self.head.modulation, self.head.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # the three parts, public so a test or a study can run the recurrence by hand
    def encode(self, tokens: torch.Tensor):
        """Bytes (N, t) -> (e (N, t, hidden), conditioning c (N, hidden), causal mask (t, t))."""
        check_tokens(tokens, self.cfg.seq_len, "tokens")
        n, t = tokens.shape
        h = self.tok_embed(tokens) + self.pos_embed[:t]
        c = self.cond.expand(n, -1)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        for layer in self.prelude:
            h = layer(h, c, mask)
        return h, c, mask

    def initial_state(self, n: int, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """s_0 = state_std * N(0, I): (n, seq_len, hidden) drawn on the generator's device (the global RNG if
        None), cut to the first t positions, so position i's start does not depend on t."""
        dev = generator.device if generator is not None else self.pos_embed.device
        s = torch.randn((n, self.cfg.seq_len, self.cfg.hidden), generator=generator, device=dev)
        return (self.cfg.state_std * s[:, :t]).to(self.pos_embed.device, self.pos_embed.dtype)

    def iterate(self, s: torch.Tensor, e: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One iteration of the recurrence: core(adapter([s | e]))."""
        h = self.adapter(torch.cat([s, e], dim=-1))
        for layer in self.core:
            h = layer(h, c, mask)
        return h

    def decode(self, s: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The coda and the head: state (N, t, hidden) -> logits (N, t, 256)."""
        for layer in self.coda:
            s = layer(s, c, mask)
        return self.head(s, c)

    def forward(
        self,
        tokens: torch.Tensor,
        iterations: int,
        generator: torch.Generator | None = None,
        backprop_iterations: int | None = None,
    ) -> torch.Tensor:
        """Logits (N, t, 256) after `iterations` core iterations from a state drawn from `generator`.

        backprop_iterations=k: the first iterations - k iterations run under torch.no_grad() (truncated
        backprop: no gradient reaches the core, the adapter or the prelude through them), the last
        min(k, iterations) with gradients; None = all with gradients.
        """
        _check_iterations(iterations)
        if backprop_iterations is not None:
            _check_iterations(backprop_iterations, "backprop_iterations")
        e, c, mask = self.encode(tokens)
        s = self.initial_state(tokens.shape[0], tokens.shape[1], generator)
        free = 0 if backprop_iterations is None else max(iterations - backprop_iterations, 0)
        with torch.no_grad():
            for _ in range(free):
                s = self.iterate(s, e, c, mask)
        for _ in range(iterations - free):
            s = self.iterate(s, e, c, mask)
        return self.decode(s, c, mask)


def sample_iterations(mean: float, generator: torch.Generator) -> int:
    """A training step's number of core iterations K, Huginn's log-normal Poisson.

    tau ~ N(ln(mean - 1) - sigma^2 / 2, sigma) with sigma = ITERATION_LOG_STD (0.5), K = Poisson(e^tau) + 1,
    clipped to [1, 4 * mean]. E[e^tau] = mean - 1, so E[K] = mean before the clip (the clip at 4 x mean
    removes a tail of mass below 1e-6 at mean >= 4); Huginn's formula N(ln mean - sigma^2/2, sigma) counts
    the "+1" outside its mean, which we fold in so that `mean` is the mean. mean = 1 always gives K = 1.
    The draws come from `generator` (a CPU torch.Generator): the same state gives the same K.
    """
    if not (
        isinstance(mean, int | float) and not isinstance(mean, bool) and mean >= 1 and math.isfinite(mean)
    ):
        raise ValueError(f"mean (iterations) must be a finite number >= 1, got {mean!r}")
    if mean == 1:
        return 1
    sigma = ITERATION_LOG_STD
    tau = math.log(mean - 1) - 0.5 * sigma**2 + sigma * float(torch.randn((), generator=generator))
    k = int(torch.poisson(torch.tensor([math.exp(tau)], dtype=torch.float64), generator=generator)) + 1
    return max(1, min(k, int(4 * mean)))


def recurrent_layer_evaluations(
    cfg: RecurrentConfig, iterations: Sequence[int], backprop_iterations: int | None = None
) -> dict:
    """Training compute of the recurrent baseline for steps with the given K each.

    forward: sum over steps of prelude + K * core + coda layer evaluations (per window of T tokens);
    backprop: the layers the backward pass runs through, prelude + min(k, K) * core + coda per step
    (k = backprop_iterations, default cfg.backprop_iterations). The adapter (one linear map per iteration)
    is not counted. tokens_per_sequence: T (the evaluations are on sequences of seq_len tokens).
    """
    k = cfg.backprop_iterations if backprop_iterations is None else backprop_iterations
    _check_iterations(k, "backprop_iterations")
    ks = [_check_iterations(int(K), "each step's iterations") for K in iterations]
    outer = cfg.prelude + cfg.coda
    return {
        "steps": len(ks),
        "forward": sum(outer + K * cfg.core for K in ks),
        "backprop": sum(outer + min(k, K) * cfg.core for K in ks),
        "tokens_per_sequence": cfg.seq_len,
    }


def diffusion_layer_evaluations(num_layers: int, steps: int, seq_len: int) -> dict:
    """Training compute of DiffusionBlocks with num_blocks = 1 (one denoiser of num_layers = prelude + core
    + coda layers): every step is one forward and one backward pass of all layers, so forward = backprop =
    steps * num_layers layer evaluations, but on 2T tokens per window (tokens_per_sequence = 2 * seq_len):
    the block input concatenates the clean bytes and their noisy targets, doubling the sequence (and about
    quadrupling attention's share). With B > 1 blocks, multiply steps by B and divide num_layers by B."""
    for name, v in (("num_layers", num_layers), ("steps", steps), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    return {
        "steps": steps,
        "forward": steps * num_layers,
        "backprop": steps * num_layers,
        "tokens_per_sequence": 2 * seq_len,
    }


def train_recurrent_baseline(cfg: RecurrentConfig, data, train_config) -> RecurrentDepthLM:
    """Train the recurrent-depth baseline end to end (tasks.baseline.train_end_to_end: train_config's
    steps_per_block steps, batch size, AdamW, learning-rate schedule, clipping, device and seed).

    Step j draws K = sample_iterations(cfg.mean_iterations) and then the initial state from the CPU
    generator rng.generator("cpu", seed, rng.TRAIN, j), and minimises next-byte cross-entropy (positions
    1..T-1) with backprop through the last cfg.backprop_iterations iterations. The returned model (in eval
    mode) carries `layer_evaluations`: recurrent_layer_evaluations of the K drawn, plus "iterations", the
    list of those K.
    """
    cfg.validate()
    require_text(data, cfg.seq_len)
    drawn: list[int] = []

    def loss(model: RecurrentDepthLM, batch: dict) -> torch.Tensor:
        g = rng.generator("cpu", train_config.seed, rng.TRAIN, len(drawn))  # len(drawn) = the step
        k = sample_iterations(cfg.mean_iterations, g)
        drawn.append(k)
        tokens = batch["tokens"]
        logits = model(tokens, k, generator=g, backprop_iterations=cfg.backprop_iterations)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    model = train_end_to_end(lambda: RecurrentDepthLM(cfg), data, train_config, loss)
    model.layer_evaluations = {**recurrent_layer_evaluations(cfg, drawn), "iterations": drawn}
    return model


@torch.no_grad()
def recurrent_bits_per_byte(
    model: RecurrentDepthLM,
    data,
    iterations: int,
    max_windows: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Bits per byte of the recurrent baseline at K = iterations over bytes s_1..s_{T-1} of each window given
    their prefixes (the positions autoregressive.baseline_bits_per_byte scores, the same windows for the
    same max_windows). Batch b draws its initial state from rng.generator("cpu", seed, rng.EVAL, b)."""
    _check_iterations(iterations)
    require_text(data, model.cfg.seq_len)
    model.eval()

    def logits_of(tokens, b):
        return model(tokens, iterations, generator=rng.generator("cpu", seed, rng.EVAL, b))[:, :-1]

    return next_byte_bits(data, max_windows, batch_size, model.pos_embed.device, logits_of)


@torch.no_grad()
def recurrent_generate(
    model: RecurrentDepthLM,
    prompt: torch.Tensor,
    num_new: int,
    iterations: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Continue byte prompts (N, P), P >= 1, with K = iterations, recomputing the whole prefix for every new
    byte. The initial state comes from rng.generator("cpu", seed, rng.SAMPLE, 0) afresh at every byte (so
    position i always starts from the same s_0, and the logits equal a teacher-forced forward on the
    result); greedy at temperature 0, else sampled from a second seeded stream as autoregressive.generate.
    Returns (N, P + num_new) int64 on the model's device, prompt first."""
    _check_iterations(iterations)
    dev = model.pos_embed.device
    out = check_generation(prompt, num_new, temperature, model.cfg.seq_len, min_prompt=1).to(dev)
    pick = rng.generator("cpu", seed, rng.SAMPLE, 1)
    model.eval()
    for _ in range(num_new):
        g = rng.generator("cpu", seed, rng.SAMPLE, 0)
        logits = model(out, iterations, generator=g)[:, -1].float()
        out = torch.cat([out, pick_next(logits, temperature, pick)[:, None]], dim=1)
    return out
