"""Triton kernels of dblocks_fast, usable on their own: this package imports only torch and triton.

Each op is a PyTorch custom op (namespace `dblocks::`) with autograd and a fake implementation, built by
`_custom_op.build` from the op's definition in `_opdefs`, so it composes with torch.compile;
dblocks_fast.ops chooses between these and the torch references. On a machine without a GPU they run under
Triton's interpreter (TRITON_INTERPRET=1, small shapes only).

`_custom_op` and `_opdefs` import only torch: the CUDA ops of dblocks_fast build on them too, also where
triton is not installed (then this package holds only those two).
"""

import importlib.util

if __name__ != "dblocks_fast.kernels":
    # This folder imported by its own name, "kernels": the repository root is on sys.path and another library
    # probed for a package of that name (transformers looks for Hugging Face's `kernels`). Register nothing:
    # the ops are dblocks_fast.kernels', and a second copy would redefine every dblocks:: op (then calls run
    # the copy's code, not this package's). Without a __version__ the probe finds no usable `kernels`.
    __all__ = []
elif importlib.util.find_spec("triton") is not None:
    from .adaln import adaln_modulate, gated_residual_adaln
    from .edm_loss import edm_l2_loss
    from .linear_cross_entropy import weighted_linear_cross_entropy

    __all__ = ["adaln_modulate", "gated_residual_adaln", "edm_l2_loss", "weighted_linear_cross_entropy"]
