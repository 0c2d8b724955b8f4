"""Triton kernels of dblocks_fast; importable alone (imports only torch and triton).

The fused ops arrive with their own issue; dblocks_fast.ops selects between them and the torch references.
"""

__all__ = []
