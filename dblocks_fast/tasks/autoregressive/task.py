"""The autoregressive LM as a task: the target, the loss and the denoiser, its teacher-forced evaluation, and
the end-to-end baseline's training and evaluation.

The target of position i is y_i = E[s_i], a row of a frozen, seeded, L2-normalised table E (256 x emb_dim)
shared by every block (base.DiscreteTargetTask, exactly as classification's label table). A block reads
the clean window and the noisy targets z_i = y_i + sigma * eps_i, one sigma per window (the mask and the
networks: `model`). The loss is w(sigma) (clamped) times the mean over positions of CE(logits_i, s_i); the
denoiser output between blocks at inference is D = softmax(logits) @ E, as in classification.

Inference takes one Euler step per block (base.inference_sigmas, "middle"): `token_logits` gives the logits
of all positions of a window at once (teacher forcing), and `bits_per_byte` scores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import rng
from ..base import DiscreteTargetTask, discrete_inference, draw_rows, layer_count, resolve_sigmas
from ..baseline import train_end_to_end
from ..text import check_tokens, next_byte_bits, require_text
from .model import VOCAB, ARBaselineLM, ARBlock, ARConfig

__all__ = [
    "AutoregressiveLM",
    "start_noise",
    "token_logits",
    "bits_per_byte",
    "train_baseline",
    "baseline_bits_per_byte",
]


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

    def build_block(self, index: int, layers: range | int) -> ARBlock:
        return ARBlock(self.config, layer_count(layers))

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

    def loss(
        self,
        block: ARBlock,
        batch: dict,
        sigma: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
        *,
        process,
    ):
        """(loss, per_sample) for one batch of windows at per-window noise levels sigma (N,) (Task.loss;
        `process` is EDM).

        per_sample[n] = min(w(sigma_n), max_weight) * mean_i CE(logits_{n,i}, s_{n,i})
                        + prior_loss * mean_i CE(f_{n,i}, s_{n,i}); loss = its mean,
        where f is the block's own logits (F, the context's prior under the likelihood skip) and logits =
        f + log p(z | byte) (model.py's docstring).
        """
        tokens = batch["tokens"]
        n, t = tokens.shape
        table = self.label_table(tokens.device)
        eps = draw_rows(
            lambda m: torch.randn((m, t, table.shape[1]), generator=generator, device=tokens.device), rows, n
        )
        s = sigma.to(torch.float32)
        z = process.noisy(table[tokens], eps, s)
        per_sample = self.target_loss(self.network_logits(block, z, s, tokens), z, s, tokens)
        return per_sample.mean(), per_sample

    @torch.no_grad()
    def denoise(
        self, block: ARBlock, z: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, *, process=None
    ):
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
    return discrete_inference(model, z, sigmas, tokens)


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
    chain; with the likelihood skip the last logits hold z's log-likelihood at the last block's small sigma
    and peak on the byte z reached. On pystdlib (hidden 64, 12 layers, B = 4, 300 steps a block, 2 seeds,
    commit 962a404) it gave 3370 and 3406 bits per byte, against 3.58 and 3.63 for block 0 alone
    (sigmas=[sigma_max, 0]: the context-only predictor, a likelihood) and 3.60 and 3.77 for the baseline.
    """
    model.task.check_data(data)

    def logits_of(tokens, k):
        return token_logits(model, tokens, sigmas, num_steps, seed=rng.derive_seed(seed, k))[:, 1:]

    return next_byte_bits(data, max_windows, batch_size, model.device, logits_of)


# --- the end-to-end baseline --------------------------------------------------------------------------------
def train_baseline(task: AutoregressiveLM, data, config, num_layers: int | None = None) -> ARBaselineLM:
    """The plain causal transformer (all task.num_layers layers) trained end to end with next-byte CE for
    config.steps_per_block steps: what one block of a DiffusionBlocks run takes, so total layer evaluations
    are equal (B blocks x steps x L/B layers = L x steps; the blocks' sequences are twice as long). The loop
    is tasks.baseline.train_end_to_end (batch size, AdamW, learning-rate schedule, clipping and seed of
    `config`; batches drawn as the Trainer draws block 0's). num_layers: fewer layers than the task's (a
    causal peer of one block), None = all."""
    task.check_data(data)

    def loss(model, batch):
        tokens = batch["tokens"]
        logits = model(tokens)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    return train_end_to_end(lambda: ARBaselineLM(task.config, num_layers), data, config, loss)


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
