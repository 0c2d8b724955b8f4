"""The independence invariant (DESIGN.md), checked the same way for every task's trainer."""

from __future__ import annotations

import torch

from dblocks_fast import checkpoint


def block_states(trainer) -> dict[str, torch.Tensor]:
    """Every block's weights and AdamW moments, as copies keyed "<block>/<part>/<name>"."""
    out = {}
    for b, (blk, opt) in enumerate(zip(trainer.model.blocks, trainer.optimizers)):
        for k, v in checkpoint.block_state(blk, opt).items():
            out[f"{b}/{k}"] = v.clone()
    return out


def assert_a_step_touches_only_its_block(trainer, num_blocks: int) -> None:
    """After one step of every block (so each has optimizer state), a step of block b changes block b's
    weights and nothing of any other block."""
    for b in range(num_blocks):
        trainer.step(b)
    for b in range(num_blocks):
        before = block_states(trainer)
        trainer.step(b)
        after = block_states(trainer)
        for k in before:
            if not k.startswith(f"{b}/"):
                assert torch.equal(before[k], after[k]), k
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"{b}/param/"))
