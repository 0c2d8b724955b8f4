"""Generation with the autoregressive LM: continue byte prompts with a BlockModel (`generate`, with the
key/value cache of `model.StepCache`) or with the end-to-end baseline (`baseline_generate`)."""

from __future__ import annotations

import torch

from ... import rng
from ..base import euler_step, resolve_sigmas
from ..text import check_generation, pick_next
from .model import VOCAB, ARBaselineLM, StepCache
from .task import start_noise

__all__ = ["generate", "baseline_generate"]


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
            with model.block(b) as blk:
                if cache.length < i:  # the prompt (first token) or the byte chosen last
                    cache.append(blk, out[:, cache.length : i])
                f = cache.noisy_logits(blk, z).float()
            logits = task.with_likelihood(f, z, torch.full((n,), s, device=dev))
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
