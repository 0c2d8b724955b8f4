"""One way to make a torch custom op, its fake and its autograd from a (forward, backward) pair of launchers.

Every op of dblocks_fast (the Triton kernels of this package and the CUDA kernels of dblocks_fast.cuda_ops)
is a `torch.library` custom op, so it composes with autograd and torch.compile(fullgraph=True). What an op
is does not depend on the kernels that compute it: an `OpDef` says it once (schema, output shapes, which
inputs get gradients, what the backward reads), and `build` makes one backend's op from two launchers:

    forward(*inputs) -> outputs                                      as in OpDef.schema
    backward(*saved_tensors, *output_grads, *saved_constants, *grad_dtypes) -> one gradient per grad input

- saved_tensors, saved_constants: the inputs and outputs that OpDef.saves names, split by kind.
- output_grads: the gradients of OpDef.grad_outputs. The other outputs are by-products (statistics kept for
  the backward, buffers): they are marked non-differentiable.
- grad_dtypes: for each of OpDef.grad_inputs, the dtype of that input, in which its gradient must come
  back, or None where no gradient is needed; the backward then returns `placeholder(...)` in that place
  (a custom op cannot return None). `as_requested` does both.

The backward op's schema and fake follow from the OpDef, so the Triton and the CUDA version of an op cannot
disagree on them.

A None incoming gradient (its output did not reach the loss) is handled one way for every op: it reaches
the backward launcher as None, never as zeros, and means a zero gradient; the launcher skips that term, or
uses zeros where its kernel needs a tensor. Autograd does not materialise zeros for it, which for the
by-products would cost a pass over memory for nothing. If every incoming gradient is None, or no input needs
a gradient, the backward launcher is not called at all. This module imports only torch, so that the CUDA
ops can build on it where triton is not installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["OpDef", "build", "as_requested", "placeholder", "BUILT"]

# the name of each op built here -> its definition (the tests hold the Triton and CUDA ops to one)
BUILT: dict[str, OpDef] = {}

_SCHEMA = re.compile(r"^\((.*)\) -> \((.*)\)$")


def _fields(text: str) -> list[tuple[str, str]]:
    """[(type, name)] of a schema's "Type name, Type name" list."""
    return [tuple(f.strip().rsplit(" ", 1)) for f in text.split(",") if f.strip()]


@dataclass(frozen=True, eq=False)
class OpDef:
    """What an op is, whatever kernels compute it (see the module docstring)."""

    schema: str  # "(Tensor x, float eps) -> (Tensor h, Tensor mean)": every input and output named
    fake: Callable  # inputs -> outputs without data: the real outputs' shapes and dtypes (torch.compile)
    grad_inputs: tuple[str, ...]  # inputs that get gradients, in the order the backward returns them
    grad_outputs: tuple[str, ...]  # outputs whose gradients the backward takes; the others are by-products
    saves: tuple[str, ...]  # inputs and outputs the backward reads
    grad_like: tuple[str, ...]  # per grad input: the saved tensor whose shape its gradient has
    types: dict[str, str] = field(init=False, repr=False)  # name -> schema type, of inputs and outputs
    inputs: tuple[str, ...] = field(init=False, repr=False)
    outputs: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        match = _SCHEMA.match(self.schema)
        if match is None:
            raise ValueError(f"schema must read '(inputs) -> (outputs)', got {self.schema!r}")
        ins, outs = (_fields(part) for part in match.groups())
        object.__setattr__(self, "types", {name: kind for kind, name in ins + outs})
        object.__setattr__(self, "inputs", tuple(name for _, name in ins))
        object.__setattr__(self, "outputs", tuple(name for _, name in outs))
        named = set(self.grad_inputs) <= set(self.inputs) and set(self.grad_outputs) <= set(self.outputs)
        named = named and set(self.saves) <= set(self.types) and set(self.grad_like) <= set(self.saves)
        if not named or len(self.grad_like) != len(self.grad_inputs):
            raise ValueError(f"grad_inputs, grad_outputs, saves, grad_like must name fields of {self.schema}")

    def _saved(self, tensors: bool) -> list[str]:
        return [n for n in self.saves if self.types[n].startswith("Tensor") == tensors]

    def backward_schema(self) -> str:
        """The backward launcher's schema: saved tensors, output gradients, saved constants, grad dtypes."""
        args = [f"{self.types[n]} {n}" for n in self._saved(tensors=True)]
        args += [f"Tensor? g_{n}" for n in self.grad_outputs]
        args += [f"{self.types[n]} {n}" for n in self._saved(tensors=False)]
        args += [f"ScalarType? d{n}_dtype" for n in self.grad_inputs]
        return f"({', '.join(args)}) -> ({', '.join('Tensor' for _ in self.grad_inputs)})"

    def backward_fake(self, *args):
        """The backward launcher's outputs without data: each gradient shaped like its grad_like tensor."""
        saved = dict(zip(self._saved(tensors=True), args))
        dtypes = args[len(args) - len(self.grad_inputs) :]
        return tuple(
            placeholder(saved[like]) if dt is None else saved[like].new_empty(saved[like].shape, dtype=dt)
            for like, dt in zip(self.grad_like, dtypes)
        )


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward returns for an input that needs no gradient: empty float32, on like's device."""
    return like.new_empty((0,), dtype=torch.float32)


def as_requested(grads: Sequence[torch.Tensor | None], dtypes: Sequence[torch.dtype | None]) -> tuple:
    """Each gradient in the dtype asked for, a placeholder where none was asked for (it may be None there)."""
    like = next(g for g in grads if g is not None)
    return tuple(placeholder(like) if dt is None else g.to(dt) for g, dt in zip(grads, dtypes))


def build(name: str, op: OpDef, forward: Callable, backward: Callable):
    """Register `name` and `name`_backward, computed by the two launchers, with fakes and autograd.

    Returns the forward op (call it with the schema's inputs).
    """
    fwd = torch.library.custom_op(name, forward, mutates_args=(), schema=op.schema)
    fwd.register_fake(op.fake)
    bwd = torch.library.custom_op(f"{name}_backward", backward, mutates_args=(), schema=op.backward_schema())
    bwd.register_fake(op.backward_fake)
    fwd.register_autograd(_autograd_backward(op, bwd), setup_context=_setup_context(op))
    BUILT[name] = op
    return fwd


def _setup_context(op: OpDef) -> Callable:
    def setup_context(ctx, inputs, output):
        values = dict(zip(op.inputs, inputs)) | dict(zip(op.outputs, output))
        ctx.mark_non_differentiable(*(values[n] for n in op.outputs if n not in op.grad_outputs))
        ctx.set_materialize_grads(False)  # the None rule of the module docstring
        ctx.save_for_backward(*(values[n] for n in op._saved(tensors=True)))
        ctx.constants = tuple(values[n] for n in op._saved(tensors=False))
        ctx.grad_dtypes = tuple(values[n].dtype for n in op.grad_inputs)

    return setup_context


def _autograd_backward(op: OpDef, bwd: Callable) -> Callable:
    where_in = [op.inputs.index(n) for n in op.grad_inputs]
    where_out = [op.outputs.index(n) for n in op.grad_outputs]

    def backward(ctx, *grads):
        grads = [grads[i] for i in where_out]
        needs = [ctx.needs_input_grad[i] for i in where_in]
        result = [None] * len(op.inputs)
        if not any(needs) or all(g is None for g in grads):
            return tuple(result)
        dtypes = [dt if need else None for dt, need in zip(ctx.grad_dtypes, needs)]
        for i, need, g in zip(where_in, needs, bwd(*ctx.saved_tensors, *grads, *ctx.constants, *dtypes)):
            result[i] = g if need else None
        return tuple(result)

    return backward
