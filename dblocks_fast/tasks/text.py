"""What the byte-level causal language models share: the autoregressive LM as DiffusionBlocks
(`tasks.autoregressive`), its end-to-end baseline, and the recurrent-depth baseline (`tasks.recurrent`).

Checks of their data and inputs with the messages users see (`require_text`, `check_tokens`,
`check_generation`), the windows an evaluation reads (`eval_windows`), the bits per byte over them
(`next_byte_bits`), and how a next byte is chosen from logits (`pick_next`), so that the three models are
checked, scored and sampled alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data import VOCAB_BYTES

__all__ = [
    "require_text",
    "check_tokens",
    "check_generation",
    "eval_windows",
    "next_byte_bits",
    "pick_next",
    "byte_frequency_bits",
    "NOT_LEARNED_MARGIN",
    "learned",
]

# a language model within this many bits per byte of byte_frequency_bits has learned nothing beyond how often
# each byte occurs (issue 21): results call such a row "not learned", never "equal"
NOT_LEARNED_MARGIN = 0.1

VOCAB = VOCAB_BYTES  # byte-level: one class per byte value


def require_text(data, seq_len: int | None = None) -> None:
    """Raise a ValueError unless `data` is a byte dataset of windows (a TextData) and, if seq_len is given,
    its windows are seq_len bytes long."""
    if not all(hasattr(data, a) for a in ("seq_len", "batch", "__len__")):
        raise ValueError(
            f"the autoregressive language model needs a byte dataset with windows of seq_len bytes "
            f"(dblocks_fast.data.TextData, e.g. load_pystdlib or load_text), got {type(data).__name__}"
        )
    if getattr(data, "vocab_size", VOCAB) != VOCAB:
        raise ValueError(
            f"{getattr(data, 'name', 'data')}: vocab_size {data.vocab_size}; this model reads bytes"
        )
    if seq_len is not None and data.seq_len != seq_len:
        raise ValueError(
            f"{getattr(data, 'name', 'data')}: windows of {data.seq_len} bytes, the model has seq_len="
            f"{seq_len}; load the data with seq_len={seq_len} (or data.with_seq_len({seq_len})), or build "
            f"the task with AutoregressiveLM.for_data(data)"
        )


def check_tokens(tokens: torch.Tensor, seq_len: int, what: str, min_len: int = 1) -> None:
    """Raise a ValueError naming `what` unless tokens is an (N, t) integer tensor of bytes 0..255 with
    N >= 1 and min_len <= t <= seq_len."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{what} must be a (N, length) tensor of bytes with N >= 1, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{what} must be integer bytes 0..255, got dtype {tokens.dtype}")
    if not min_len <= tokens.shape[1] <= seq_len:
        raise ValueError(f"{what} has {tokens.shape[1]} positions; the model takes {min_len}..{seq_len}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= VOCAB):
        raise ValueError(f"{what} must hold bytes 0..255, found [{int(tokens.min())}, {int(tokens.max())}]")


def check_generation(prompt, num_new: int, temperature: float, seq_len: int, min_prompt: int) -> torch.Tensor:
    """The arguments of a generate function checked: returns the prompt (N, P) as int64, P >= min_prompt,
    after checking that P + num_new fits in seq_len and that temperature is finite and >= 0."""
    prompt = torch.as_tensor(prompt)
    if not isinstance(num_new, int) or num_new < 0:
        raise ValueError(f"num_new must be an integer >= 0, got {num_new!r}")
    if prompt.ndim == 2 and prompt.shape[1] + num_new > seq_len:
        raise ValueError(
            f"a prompt of {prompt.shape[1]} bytes plus num_new={num_new} exceeds the model's seq_len "
            f"{seq_len}; shorten the prompt (keep its last bytes) or generate fewer bytes"
        )
    check_tokens(prompt, seq_len, "prompt", min_len=min_prompt)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return prompt.to(torch.int64)


def eval_windows(data, max_windows: int | None) -> torch.Tensor:
    """Window indices for evaluation: all, or max_windows spread evenly over the data (its files are
    concatenated in order, so the first windows would all come from a few files)."""
    n = len(data)
    if max_windows is None or max_windows >= n:
        return torch.arange(n)
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None (all), got {max_windows}")
    return torch.linspace(0, n - 1, max_windows, dtype=torch.float64).round().long()


def next_byte_bits(
    data,
    max_windows: int | None,
    batch_size: int,
    device: torch.device,
    logits_of: Callable[[torch.Tensor, int], torch.Tensor],
) -> float:
    """Bits per byte of s_1..s_{T-1} of each window given their prefixes: mean CE / ln 2 over the windows
    eval_windows(data, max_windows), read in batches of batch_size.

    logits_of(tokens (N, T) on `device`, batch index k) -> logits (N, T - 1, 256) whose position i predicts
    tokens[:, i + 1]. Byte 0 is left out everywhere: a causal LM has no prediction for it."""
    total, count = 0.0, 0
    idx = eval_windows(data, max_windows)
    for k, lo in enumerate(range(0, len(idx), batch_size)):
        tokens = data.batch(idx[lo : lo + batch_size])["tokens"].to(device)
        logits = logits_of(tokens, k).float()
        total += float(F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum"))
        count += tokens[:, 1:].numel()
    return total / count / math.log(2)


def pick_next(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The next bytes (N,) from logits (N, 256): argmax at temperature 0, else a sample of
    softmax(logits / temperature) drawn with `generator` (on the CPU, so the draw does not depend on the
    device)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float().cpu() / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def byte_frequency_bits(data, max_windows: int | None = None) -> float:
    """The floor of a byte-level LM on `data`: the entropy (bits per byte) of the byte frequencies of the
    windows eval_windows(data, max_windows), i.e. what a model that knows only how often each byte occurs
    in that very text scores. A model must be well below it to have learned anything."""
    idx = eval_windows(data, max_windows)
    tokens = data.batch(idx)["tokens"].reshape(-1)
    p = torch.bincount(tokens, minlength=VOCAB).double() / tokens.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def learned(bits: float, floor: float) -> bool:
    """Whether a bits-per-byte figure is more than NOT_LEARNED_MARGIN below the byte-frequency floor."""
    return bits < floor - NOT_LEARNED_MARGIN
