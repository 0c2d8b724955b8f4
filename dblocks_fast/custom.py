"""Your own model: block-wise training of a network written outside the package.

A user gives a *factory*, an importable function `module:function` called with keyword settings, that
returns what the model is:

  Network(layers, stem, head)    a residual network: `layers` is an nn.ModuleList of L layers, each
                                 `layer(h, c) -> h`; `stem()` and `head()` build a stem `stem(x, c_noise,
                                 cond) -> (h, c)` and a head `head(h, c) -> out` (out of x's shape). The
                                 package splits the layers by num_blocks / --layers: block b owns exactly
                                 layers [l_b, l_{b+1}).
  Blocks(make_block, num_layers) a block factory: `make_block(index, layers)` returns block `index`'s whole
                                 network for its share `layers` (a range) of the num_layers layers, called
                                 as `block(x, c_noise, cond) -> out`.

`CustomTask(factory, settings, shape=...)` turns it into a task: the batch's target (`target`, default "y")
is the clean y, its condition (`cond`, default "label"; None: unconditional) goes to the stem, and the noise
process (EDM or flow matching, config.noise) noises y, preconditions the network's input and turns its output
into the denoiser D. Two modes:

  "independent" (default, the paper's): every block owns its copy of stem and head, so every invariant of
      the package holds: blocks train in any order, on any machine, paged or not, bit for bit the same.
  "shared": one stem and one head, built once and frozen, serve every block; the blocks own their layers
      only. For a pretrained model whose stem and head should not move: less memory (the stem's and head's
      weights and optimizer state exist once, not B times), still one block's gradients at a time.
      The shared stem and head are not in the run folder: the factory rebuilds them (so it must give the
      same weights every time: load them, or let the seed decide).

Run folders record the factory's import path and settings; `dblocks_fast.load(run)` imports and calls it
again, and says what to install or put on the path when the module is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import rng
from .tasks.base import continuous_process, draw_rows

__all__ = ["Blocks", "CustomTask", "Network", "SplitBlock", "resolve_factory"]

MODES = ("independent", "shared")


@dataclass
class Network:
    """A residual network for the package to split into blocks (see the module docstring)."""

    layers: nn.ModuleList  # L residual layers, layer(h, c) -> h
    stem: Callable[[], nn.Module]  # builds a stem: stem(x, c_noise, cond) -> (h, c)
    head: Callable[[], nn.Module]  # builds a head: head(h, c) -> out, of x's shape
    null_label: int | None = None  # the condition that means "none" (classifier-free guidance); None: no CFG
    cond_dropout: float = 0.0  # probability a training condition is replaced by null_label
    processes: tuple[str, ...] = ("edm", "flow")  # the noise processes it trains with; the first is "auto"
    name: str | None = None  # what messages call the model (default: the factory's import path)


@dataclass
class Blocks:
    """A factory of whole blocks (see the module docstring)."""

    make_block: Callable[[int, range], nn.Module]  # (index, its layers) -> block(x, c_noise, cond) -> out
    num_layers: int  # L, split over the blocks
    null_label: int | None = None
    cond_dropout: float = 0.0
    processes: tuple[str, ...] = ("edm", "flow")
    # mode "shared": `shared()` builds the frozen part every block uses (built once, not in run folders) and
    # `make_part(index, layers)` a block without it, called as part(x, c_noise, cond, shared=that module)
    shared: Callable[[], nn.Module] | None = None
    make_part: Callable[[int, range], nn.Module] | None = None
    name: str | None = None


class SplitBlock(nn.Module):
    """One block of a split Network: its stem (None in shared mode), its layers, its head (None in shared)."""

    def __init__(self, stem: nn.Module | None, layers: list[nn.Module], head: nn.Module | None):
        super().__init__()
        self.stem, self.layers, self.head = stem, nn.ModuleList(layers), head
        self.kernels = "auto"

    def forward(self, x, c_noise, cond, stem: nn.Module | None = None, head: nn.Module | None = None):
        stem, head = stem or self.stem, head or self.head
        h, c = stem(x, c_noise, cond)
        for layer in self.layers:
            h = layer(h, c)
        return head(h, c)


def resolve_factory(factory) -> tuple[str, Callable]:
    """(import path "module:function", the function) of a factory given as either."""
    if callable(factory):
        path = f"{factory.__module__}:{factory.__qualname__}"
        if "<" in path or factory.__module__ == "__main__":
            raise ValueError(
                f"the model factory {path} cannot be imported again from a run folder: define it at the top "
                f"level of a module (not in __main__, a lambda or a function body) and pass it or its "
                f"'module:function' path"
            )
        return path, factory
    module, _, name = str(factory).partition(":")
    if not module or not name:
        raise ValueError(
            f"a model factory is 'module:function' (e.g. mypackage.models:build), got {factory!r}"
        )
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the model factory {factory} cannot be imported here ({type(e).__name__}: {e}); install the "
            f"package that provides {module!r}, or put the folder that holds it on PYTHONPATH"
        ) from e
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ImportError(
                f"module {module!r} has no {name!r}: the model factory {factory} does not exist"
            )
    if not callable(obj):
        raise TypeError(f"the model factory {factory} is not callable")
    return factory, obj


class CustomTask:
    """A user's network as a task (see the module docstring).

    Args:
        factory: "module:function" or a top-level function, called as factory(**settings).
        settings: the factory's keyword settings (JSON-able: the run folder records them).
        shape: one example's target shape, (C, H, W) for images (CustomTask.for_data reads it off the data).
        target, cond: the batch keys of the clean target y and of the condition (None: unconditional; a list
            of keys: the block gets a dict {key: batch[key]}, e.g. the keyword arguments of a text model).
        mode: "independent" or "shared" (the stem and head).
        sigma_data: EDM's sigma_data (the scale of y).
        seed: seeds the shared stem and head (mode "shared"); the blocks take the training seed.
    """

    kind = "custom"

    def __init__(
        self,
        factory,
        settings: dict | None = None,
        *,
        shape,
        target: str = "y",
        cond: str | None = "label",
        mode: str = "independent",
        sigma_data: float = 0.5,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.factory, self._make = resolve_factory(factory)
        self.settings = dict(settings or {})
        if cond is not None and not isinstance(cond, str):
            cond = [str(k) for k in cond]  # several keys: the block gets {key: batch[key]}
        self.shape, self.target, self.cond = tuple(int(s) for s in shape), target, cond
        self.mode, self.sigma_data, self.seed = mode, float(sigma_data), int(seed)
        self._shared: dict[torch.device, tuple[nn.Module, nn.Module]] = {}
        try:  # what the model is, without memory: its kind, depth and guidance
            with torch.device("meta"):
                spec = self._spec()
        except Exception:  # a factory that reads weights from disk may not build on the meta device
            spec = self._spec()
        self.split = isinstance(spec, Network)
        self.num_layers = len(spec.layers) if self.split else int(spec.num_layers)
        self.null_label, self.cond_dropout = spec.null_label, float(spec.cond_dropout)
        self.processes = tuple(spec.processes)
        self.name = spec.name or f"the model of {self.factory}"
        if not self.processes or not set(self.processes) <= {"edm", "flow"}:
            raise ValueError(f"a model's processes are some of ('edm', 'flow'), got {spec.processes!r}")
        if self.num_layers < 1:
            raise ValueError(
                f"the model factory {self.factory} gives {self.num_layers} layers; it needs >= 1"
            )
        if mode == "shared" and not self.split and (spec.shared is None or spec.make_part is None):
            raise ValueError(
                "mode='shared' needs a Network (layers, stem, head) from the factory, or a Blocks with "
                "shared and make_part: this Blocks factory builds whole blocks only: nothing to share"
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.cond_dropout > 0 and self.null_label is None:
            raise ValueError("cond_dropout > 0 needs null_label: the condition that stands for 'none'")
        if self.cond_dropout > 0 and isinstance(self.cond, list):
            raise ValueError(
                f"cond_dropout drops one label per example; the condition {self.cond} has several parts: "
                f"drop them in the data (or give cond_dropout=0)"
            )

    @classmethod
    def for_data(cls, data, factory, settings: dict | None = None, **kw) -> CustomTask:
        """A task whose target shape is read off `data` (one batch of it)."""
        target = kw.get("target", "y")
        batch = data.batch(torch.arange(1))
        if target not in batch:
            raise ValueError(
                f"{getattr(data, 'name', 'data')} has no {target!r} in its batches {sorted(batch)}"
            )
        return cls(factory, settings, shape=tuple(batch[target].shape[1:]), **kw)

    def _spec(self):
        try:
            spec = self._make(**self.settings)
        except Exception as e:
            raise ValueError(
                f"the model factory {self.factory} raised {type(e).__name__} when called with "
                f"{self.settings}: {e}"
            ) from e
        if not isinstance(spec, (Network, Blocks)):
            raise TypeError(
                f"the model factory {self.factory} must return dblocks_fast.custom.Network or Blocks, got "
                f"{type(spec).__name__}"
            )
        return spec

    # --- the Task protocol ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        config = dict(
            factory=self.factory, settings=self.settings, shape=list(self.shape), target=self.target,
            cond=self.cond, mode=self.mode, sigma_data=self.sigma_data, seed=self.seed,
        )  # fmt: skip
        return {"kind": self.kind, "config": config}

    @classmethod
    def from_config(cls, config: dict) -> CustomTask:
        config = dict(config)
        return cls(config.pop("factory"), config.pop("settings"), **config)

    def build_block(self, index: int, layers: range) -> nn.Module:
        """Block `index` with exactly the layers `layers` of the model (a range of the L layers)."""
        if not isinstance(layers, range):
            raise TypeError(f"a custom model's block is given its layers as a range, got {layers!r}")
        if layers.stop > self.num_layers or len(layers) < 1:
            raise ValueError(f"layers {layers} of block {index} are not within the model's {self.num_layers}")
        spec = self._spec()
        if not self.split:
            make, name = (
                (spec.make_part, "make_part") if self.mode == "shared" else (spec.make_block, "make_block")
            )
            try:
                return make(index, layers)
            except Exception as e:
                raise ValueError(f"{self.factory}'s {name}({index}, {layers}) raised: {e}") from e
        if len(spec.layers) != self.num_layers:
            raise ValueError(
                f"the model factory {self.factory} gave {len(spec.layers)} layers, then {self.num_layers}: "
                f"it must give the same model every time"
            )
        mine = [spec.layers[i] for i in layers]
        if self.mode == "shared":
            return SplitBlock(None, mine, None)
        return SplitBlock(spec.stem(), mine, spec.head())

    def check_data(self, data) -> None:
        """The batches hold the target (of `shape`) and the condition; one block's output has the target's
        shape (a block is run once on two examples, on the CPU, before any training)."""
        name = getattr(data, "name", type(data).__name__)
        batch = data.batch(torch.arange(min(2, len(data))))
        for key in (self.target, *self.cond_keys()):
            if key not in batch:
                raise ValueError(f"{name}: batches hold {sorted(batch)}, the model needs {key!r}")
        y = batch[self.target]
        if tuple(y.shape[1:]) != self.shape:
            raise ValueError(
                f"{name}: targets have shape {tuple(y.shape[1:])}, the model expects {self.shape}"
            )
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            block = self.build_block(0, range(1))
            level = torch.full((y.shape[0],), 1.0, dtype=torch.float64)
            try:
                out = self._forward(block, y.float(), level.float(), self.condition(batch))
            except Exception as e:
                raise ValueError(
                    f"{self.factory}: a block fails on a batch of {name} ({type(e).__name__}: {e})"
                ) from e
        if out.shape != y.shape:
            raise ValueError(
                f"{self.factory}: a block's output has shape {tuple(out.shape)}, its input "
                f"{tuple(y.shape)}; a block must return the shape of its input (it is a denoiser of y)"
            )

    def noise_process(self, noise, num_blocks: int):
        """EDM or flow matching, of those the model names (Network/Blocks.processes); "auto": its first."""
        if num_blocks > self.num_layers:
            raise ValueError(
                f"{self.name} has {self.num_layers} layers, fewer than the {num_blocks} blocks asked for: "
                f"each block needs at least one layer; use num_blocks <= {self.num_layers}"
            )
        return continuous_process(self, noise, num_blocks, allowed=self.processes)

    def cond_keys(self) -> list[str]:
        """The batch keys of the condition."""
        return [] if self.cond is None else [self.cond] if isinstance(self.cond, str) else list(self.cond)

    def condition(self, batch: dict):
        """What a block is given as its condition: None, batch[cond], or {key: batch[key]} for several."""
        if isinstance(self.cond, list):
            return {k: batch[k] for k in self.cond}
        return None if self.cond is None else batch[self.cond]

    def _shared_parts(self, device: torch.device) -> tuple[nn.Module, ...]:
        """The frozen parts of mode "shared" on `device`, built once from `seed`: a Network's (stem, head), a
        Blocks factory's (shared(),)."""
        if device not in self._shared:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.derive_seed(self.seed, rng.INIT, 1 << 20))  # not any block's seed
                spec = self._spec()
                parts = (spec.stem(), spec.head()) if self.split else (spec.shared(),)
            parts = tuple(part.to(device).eval().requires_grad_(False) for part in parts)
            self._shared[device] = parts
        return self._shared[device]

    def _forward(self, block: nn.Module, x, c_noise, cond):
        if self.mode == "independent":
            return block(x, c_noise, cond)
        if not self.split:
            return block(x, c_noise, cond, shared=self._shared_parts(x.device)[0])
        stem, head = self._shared_parts(x.device)
        return block(x, c_noise, cond, stem=stem, head=head)

    def loss(self, block, batch, level, generator, rows=None, *, process):
        """(loss, per_sample): the process's loss of the block on the batch's targets (Task.loss)."""
        y = batch[self.target].float()
        cond = self.condition(batch)
        n = y.shape[0]
        if self.cond_dropout > 0:
            drop = draw_rows(lambda m: torch.rand(m, generator=generator, device=y.device), rows, n)
            cond = torch.where(drop < self.cond_dropout, self.null_cond(cond), cond)
        eps = draw_rows(
            lambda m: torch.randn((m, *self.shape), generator=generator, device=y.device), rows, n
        )
        z = process.noisy(y, eps, level)
        net_in, c_noise = process.inputs(z, level, self.sigma_data)
        out = self._forward(block, net_in, c_noise, cond)
        return process.loss(z, out, y, eps, level, self.sigma_data, kernels=getattr(block, "kernels", "auto"))

    @torch.no_grad()
    def denoise(self, block, z, level, cond, *, process) -> torch.Tensor:
        net_in, c_noise = process.inputs(z, level, self.sigma_data)
        return process.denoised(
            z, self._forward(block, net_in, c_noise, cond).float(), level, self.sigma_data
        )

    def null_cond(self, cond):
        if self.null_label is None:
            raise ValueError(
                f"classifier-free guidance needs the model to name its 'no condition' value: give "
                f"null_label (and cond_dropout > 0) in the {type(self).__name__}'s Network or Blocks, or "
                f"sample with cfg_scale=1"
            )
        return torch.full_like(cond, self.null_label)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    def check_cond(self, cond) -> None:
        if self.null_label is not None and bool((cond == self.null_label).any()):
            raise ValueError(f"condition {self.null_label} means 'none' (guidance only); sample real ones")
