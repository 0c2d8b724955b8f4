"""TrainConfig: every setting of a training run, one field a line with its unit and meaning.

The settings are grouped by what they decide:

  TrainConfig  what is trained: blocks, layers, steps, batch, seed, block order, which blocks here
  .noise       the noise levels each block trains on (NoiseConfig)
  .optimizer   AdamW, learning-rate schedule, gradient clipping (OptimConfig)
  .runtime     precision, device, kernels, processes (RuntimeConfig)
  .storage     where blocks wait while others train (StorageConfig)
  .io          run folder, metric lines, checkpoints, progress (IOConfig)

A setting's name is unique across the groups, so a config can also be written flat, as the command line
and run folders before this grouping do: `TrainConfig(num_blocks=3, lr=2e-3, offload="disk")` puts `lr` in
`.optimizer` and `offload` in `.storage`. `TrainConfig.from_dict` reads both the nested form that run
folders now hold and the flat form of older ones. Each field's help is its `metadata["help"]`, which the CLI
shows; nothing parses this file. A setting that takes one of a fixed set of values names the set in
`metadata["choices"]` (the tuples below, the one place they are written): `validate` checks it, the CLI
offers exactly those, and the noise processes and `ops` check against the same tuples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

__all__ = [
    "DISTRIBUTED",
    "FLOW_DENSITIES",
    "GROUPS",
    "IOConfig",
    "KERNELS",
    "LOGGERS",
    "NoiseConfig",
    "OFFLOADS",
    "OptimConfig",
    "PARTITIONS",
    "PRECISIONS",
    "PREDICTIONS",
    "PROCESSES",
    "RESUME_FREE",
    "RuntimeConfig",
    "SCHEDULES",
    "StorageConfig",
    "TrainConfig",
    "read_settings",
]

# The values a setting may take, where they are a fixed set (metadata["choices"] of its field)
PROCESSES = ("auto", "edm", "flow", "masking")  # noise.process ("masking": the masked-diffusion LM's own)
PARTITIONS = ("equiprob", "uniform")
FLOW_DENSITIES = ("logit-normal", "uniform")
PREDICTIONS = ("velocity", "epsilon", "x0")
SCHEDULES = ("random", "sequential", "chunked")
PRECISIONS = ("fp32", "bf16")
KERNELS = ("auto", "cuda", "triton", "torch")  # ops.KERNELS is this tuple
DISTRIBUTED = ("auto", "on", "off")
OFFLOADS = ("none", "host", "disk")
LOGGERS = ("none", "tensorboard", "wandb")  # loggers.LOGGERS is this tuple


def _f(default, help: str, choices: tuple[str, ...] | None = None, **kw):
    """A field with its help text (shown by `dblocks-fast train --help`) and, if its values are a fixed set,
    that set (checked by validate, offered by the CLI)."""
    meta = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class NoiseConfig:
    """The noise process and the partition of its levels into the blocks' intervals (schedule.py)."""

    process: str = _f(
        "auto",
        "noise process: 'edm', 'flow' (rectified flow, as SD3 and Flux train), or 'auto', the task's own "
        "(EDM; the masked-diffusion LM's masking)",
        PROCESSES,
    )
    partition: str = _f(
        "equiprob",
        "noise partition: 'equiprob' (equal probability mass) or 'uniform' (in ln sigma, or in t)",
        PARTITIONS,
    )
    gamma: float = _f(
        0.05, "overlap: each block's interval widened by gamma x its width (in ln sigma, logit t)"
    )
    sigma_min: float = _f(0.002, "EDM: lowest noise level")
    sigma_max: float = _f(80.0, "EDM: highest noise level")
    p_mean: float = _f(-1.2, "EDM: mean of ln sigma during training")
    p_std: float = _f(1.2, "EDM: std of ln sigma during training")
    flow_density: str = _f("logit-normal", "flow: density of t, 'logit-normal' or 'uniform'", FLOW_DENSITIES)
    flow_mean: float = _f(0.0, "flow: mean of logit(t) under the logit-normal density (SD3: 0)")
    flow_std: float = _f(1.0, "flow: std of logit(t) under the logit-normal density (SD3: 1)")
    shift: float = _f(1.0, "flow: resolution shift k, t -> k t / (1 + (k - 1) t); 1 = none")
    prediction: str = _f(
        "velocity", "flow: what the network outputs: 'velocity', 'epsilon' or 'x0'", PREDICTIONS
    )


@dataclass
class OptimConfig:
    """Each block's AdamW and its learning-rate schedule, counted in the block's own steps."""

    lr: float = _f(1e-3, "peak AdamW learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine decay")
    warmup: int = _f(100, "steps of linear warm-up, counted in each block's own steps")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    grad_clip: float | None = _f(1.0, "max gradient norm of a block; None = no clipping")


@dataclass
class RuntimeConfig:
    """How the numbers are computed and where: none of these but precision changes a block's numbers."""

    precision: str = _f(
        "fp32", "'fp32', or 'bf16' autocast (weights and optimizer state stay fp32)", PRECISIONS
    )
    device: str = _f("auto", "torch device: 'cpu', 'cuda', 'cuda:N', or 'auto' = cuda if available, else cpu")
    kernels: str = _f(
        "auto",
        "op implementations: 'auto' (Triton on CUDA, else the torch reference), 'cuda' (the CUDA C++ "
        "library), 'triton' or 'torch'",
        KERNELS,
    )
    distributed: str = _f(
        "auto", "'auto': block-parallel under torchrun (WORLD_SIZE > 1); 'on'; 'off'", DISTRIBUTED
    )


@dataclass
class StorageConfig:
    """Where blocks and their AdamW moments wait while other blocks train (storage.create)."""

    offload: str = _f(
        "none", "where blocks wait while others train: 'none' (device), 'host' or 'disk'", OFFLOADS
    )
    prefetch: bool = _f(True, "with offload: copy the next block in while the current one trains")


@dataclass
class IOConfig:
    """What a run writes and shows."""

    out_dir: str | None = _f(None, "run folder for checkpoints and metrics; None = keep nothing on disk")
    log_every: int = _f(50, "block steps between metric lines (each one costs a host-device sync)")
    ckpt_every: int = _f(500, "total steps between checkpoints; 0 = only at the end (and on Ctrl-C)")
    progress: bool = _f(True, "show a tqdm progress bar")
    log: str = _f(
        "none",
        "where the metrics also go: 'none', 'tensorboard' (event files in RUN/tensorboard: per-block "
        "loss, lr, noise interval, steps/s, samples/s, peak memory, and the sample grid at eval) or 'wandb' "
        "(the same, offline unless WANDB_MODE says otherwise)",
        LOGGERS,
    )


GROUPS = {
    "noise": NoiseConfig,
    "optimizer": OptimConfig,
    "runtime": RuntimeConfig,
    "storage": StorageConfig,
    "io": IOConfig,
}


@dataclass(init=False)
class TrainConfig:
    """Every setting of `dblocks_fast.train`; see the module docstring for the groups and the flat form."""

    num_blocks: int = _f(
        3, "B, the number of independently trained blocks; 1 = the end-to-end diffusion baseline"
    )
    layers: list[int] | None = _f(None, "layers per block, summing to the model's L; None = L / B each")
    steps_per_block: int = _f(
        1000, "optimizer steps each block takes (what the end-to-end baseline takes in all)"
    )
    batch_size: int = _f(128, "examples per step")
    seed: int = _f(0, "seeds initialisation, data order, noise and the block order")
    schedule: str = _f(
        "random", "block order: 'random' (seeded interleaving), 'sequential', 'chunked'", SCHEDULES
    )
    chunk_steps: int = _f(
        50,
        "schedule='chunked': a block takes this many steps before another block's turn; 0: a whole epoch "
        "of the data (len(data) // batch_size steps)",
    )
    only_blocks: list[int] | None = _f(
        None, "train just these blocks here; None = all (see dblocks-fast merge)"
    )
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    io: IOConfig = field(default_factory=IOConfig)

    def __init__(self, **settings):
        """Settings by name: top-level fields, whole groups (a group's dataclass or a dict of its fields), or
        any group's field by its own name (flat)."""
        for f in dataclasses.fields(self):
            if f.name in GROUPS:
                given = settings.pop(f.name, None)
                group = GROUPS[f.name]
                if isinstance(given, dict):
                    given = group(**given)
                elif given is not None and not isinstance(given, group):
                    raise TypeError(
                        f"TrainConfig.{f.name} must be a {group.__name__} or a dict, not {given!r}"
                    )
                setattr(self, f.name, copy.copy(given) if given is not None else group())
            elif f.name in settings:
                setattr(self, f.name, settings.pop(f.name))
            else:
                setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)
        for name in list(settings):
            group = _GROUP_OF.get(name)
            if group is None:
                raise TypeError(
                    f"TrainConfig has no setting {name!r}; the settings are: {', '.join(self.flat_names())}"
                )
            setattr(getattr(self, group), name, settings.pop(name))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from `dataclasses.asdict` of one (nested), or from an older run folder's flat dict."""
        return cls(**d)

    @staticmethod
    def flat_names() -> list[str]:
        """Every setting's name, in field order, groups' fields in their place."""
        return [f.name for _, f in TrainConfig.fields()]

    @staticmethod
    def fields() -> list[tuple[str | None, dataclasses.Field]]:
        """(group or None, field) for every setting, in order: what the CLI turns into flags."""
        out = []
        for f in dataclasses.fields(TrainConfig):
            if f.name in GROUPS:
                out += [(f.name, g) for g in dataclasses.fields(GROUPS[f.name])]
            else:
                out.append((None, f))
        return out

    def flat(self) -> dict:
        """{setting: value} for every setting, ungrouped (for comparing runs and for messages)."""
        return {f.name: getattr(getattr(self, g) if g else self, f.name) for g, f in self.fields()}

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        o, io = self.optimizer, self.io
        need(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        need(self.steps_per_block >= 1, f"steps_per_block must be >= 1, got {self.steps_per_block}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(o.lr > 0 and o.min_lr >= 0, f"need lr > 0 and min_lr >= 0, got {o.lr}, {o.min_lr}")
        need(o.warmup >= 0, f"warmup must be >= 0, got {o.warmup}")
        need(o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}")
        need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"betas must be in [0, 1), got {o.beta1}, {o.beta2}")
        need(o.grad_clip is None or o.grad_clip > 0, f"grad_clip must be > 0 or None, got {o.grad_clip}")
        for name, value in self.flat().items():
            choices = _CHOICES.get(name)
            need(choices is None or value in choices, f"{name} must be one of {choices}, got {value!r}")
        need(self.chunk_steps >= 0, f"chunk_steps must be >= 0 (0: an epoch), got {self.chunk_steps}")
        need(io.log_every >= 1, f"log_every must be >= 1, got {io.log_every}")
        need(io.ckpt_every >= 0, f"ckpt_every must be >= 0, got {io.ckpt_every}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(
            io.log == "none" or io.out_dir is not None,
            f"log={io.log!r} writes into the run folder: give out_dir (--out), or log='none'",
        )
        if self.only_blocks is not None:
            blocks = list(self.only_blocks)
            need(len(blocks) > 0, "only_blocks is empty; give at least one block, or None for all")
            need(len(set(blocks)) == len(blocks), f"only_blocks {blocks} names a block twice")
            bad = [b for b in blocks if not 0 <= b < self.num_blocks]
            need(not bad, f"only_blocks {blocks}: {bad} not in 0..{self.num_blocks - 1}")

    def blocks_to_train(self) -> list[int]:
        return sorted(self.only_blocks) if self.only_blocks is not None else list(range(self.num_blocks))


_GROUP_OF = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
_CHOICES = {f.name: f.metadata["choices"] for _, f in TrainConfig.fields() if "choices" in f.metadata}

# Settings that may differ when a run is resumed, or between runs that are merged: they change where and
# how a run reports, which process trains which block and in what order, never a block's numbers (every
# draw is keyed by (seed, block, block step); DESIGN.md section 3).
RESUME_FREE = frozenset(
    {
        "out_dir",
        "log_every",
        "ckpt_every",
        "progress",
        "log",
        "device",
        "kernels",
        "only_blocks",
        "distributed",
        "schedule",
        "chunk_steps",
        "offload",
        "prefetch",
    }
)


# --- settings files -----------------------------------------------------------------------------------------
SETTINGS_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read_settings(path: str | os.PathLike) -> dict:
    """The settings in a TOML (.toml), YAML (.yaml, .yml) or JSON (.json) file, flat: {name: value}.

    The file is a table of settings by name (`num_blocks = 3`; `steps-per-block` is read as
    `steps_per_block`), at the top level or in a table named after its group (`[optimizer]` holding
    `lr = 2e-3`, as `TrainConfig`'s nested form). Which names are settings is the caller's to check (the CLI
    accepts its train flags too: preset, data, ...); a table's keys must be its group's. Raises ValueError
    naming the file (and, for a parse error, the line) on anything else.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SETTINGS_SUFFIXES:
        raise ValueError(
            f"--config {path}: unknown kind of file {suffix or '(no suffix)'!r}; use .toml, .yaml, .yml or "
            f".json"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the same parser as the package tomli
                import tomli as tomllib
            d = tomllib.loads(raw.decode("utf-8"))
        elif suffix == ".json":
            d = json.loads(raw)
        else:
            try:
                import yaml
            except ModuleNotFoundError:
                raise ValueError(
                    f"--config {path}: reading YAML needs PyYAML: pip install pyyaml (or write the file as "
                    f"TOML)"
                ) from None
            d = yaml.safe_load(raw)
    except ValueError as e:  # tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError
        if str(e).startswith("--config"):
            raise
        raise ValueError(f"--config {path}: not valid {suffix[1:].upper()}: {e}") from None
    except Exception as e:  # yaml.YAMLError: its message names the line and column
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if d is None:  # an empty YAML file
        d = {}
    if not isinstance(d, dict):
        raise ValueError(
            f"--config {path}: expected a table of settings (name = value), got {type(d).__name__}"
        )
    out: dict = {}

    def put(key, value, where: str) -> None:
        if not isinstance(key, str):
            raise ValueError(f"--config {path}: setting names are text, got {key!r}{where}")
        name = key.replace("-", "_")
        if name in out:
            raise ValueError(f"--config {path}: {name!r} is set twice{where}")
        out[name] = value

    for key, value in d.items():
        group = key.replace("-", "_") if isinstance(key, str) else None
        if group in GROUPS and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(GROUPS[group])}
            for k, v in value.items():
                if not isinstance(k, str) or k.replace("-", "_") not in names:
                    home = _GROUP_OF.get(k.replace("-", "_")) if isinstance(k, str) else None
                    hint = f"; {k} belongs in [{home}]" if home else ""
                    raise ValueError(
                        f"--config {path}: [{group}] has no setting {k!r}{hint}; its settings are: "
                        f"{', '.join(sorted(names))}"
                    )
                put(k, v, f" (in [{group}])")
        elif isinstance(value, dict):
            raise ValueError(
                f"--config {path}: {key!r} is a table, but only the groups {', '.join(GROUPS)} may be; give "
                f"the other settings as name = value"
            )
        else:
            put(key, value, "")
    return out
