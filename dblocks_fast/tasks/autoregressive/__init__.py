"""Byte-level autoregressive language modelling as DiffusionBlocks (the paper's AR row, PAPER.md).

A window holds T = seq_len bytes s_0..s_{T-1}. The target of position i is y_i = E[s_i], a row of a frozen,
seeded, L2-normalised table E (256 x emb_dim) shared by every block (DESIGN.md section 3). The block input
is the concatenation [clean tokens s_0..s_{T-1} | noisy tokens z_0..z_{T-1}], z_i = y_i + sigma * eps_i with
one sigma per sequence; noisy token i attends to the clean bytes before it and to itself, so it denoises
byte s_i from its prefix, and all T positions train in parallel (DESIGN.md section 2, "Autoregressive LM").

The package, in the order a reader needs it:
  model       ARConfig, the block mask (`ar_mask`), the blocks (`ARBlock`), the end-to-end baseline
              (`ARBaselineLM`: the same transformer on the clean bytes alone, causal), and the key/value
              cache generation runs the blocks with (`cached_layer_forward`, `StepCache`);
  task        the task (`AutoregressiveLM`: target, loss, denoiser), teacher-forced evaluation
              (`token_logits`, `bits_per_byte`), and the baseline's training and evaluation
              (`train_baseline`, `baseline_bits_per_byte`);
  generation  continuations of byte prompts by a BlockModel (`generate`, one one-token pass per block and
              byte) or by the baseline (`baseline_generate`).
The checks, windows and byte choice it shares with the recurrent-depth baseline are in tasks.text; how
generated text is scored (`generative_score`, `tokenizes`) is in dblocks_fast.quality.
"""

from .generation import baseline_generate, generate
from .model import VOCAB, ARBaselineLM, ARBlock, ARConfig, StepCache, ar_mask, cached_layer_forward
from .task import (
    AutoregressiveLM,
    baseline_bits_per_byte,
    bits_per_byte,
    start_noise,
    token_logits,
    train_baseline,
)

__all__ = [
    "VOCAB",
    "ARConfig",
    "ARBlock",
    "ARBaselineLM",
    "AutoregressiveLM",
    "StepCache",
    "ar_mask",
    "cached_layer_forward",
    "start_noise",
    "token_logits",
    "bits_per_byte",
    "generate",
    "train_baseline",
    "baseline_bits_per_byte",
    "baseline_generate",
]
