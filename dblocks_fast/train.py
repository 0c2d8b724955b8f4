"""dblocks_fast.train(): block-wise training, where each step trains one block only.

Wiring only; the math lives in schedule, precond, the task and ops. Every block has its own AdamW, its own
warm-up + cosine schedule counted in its own steps, its own data order and its own random stream, all
derived from (seed, block, step) (see rng.py): the order in which blocks are trained changes no bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, checkpoint, rng
from .model import BlockModel, split_layers
from .ops import KERNELS
from .schedule import NoiseSchedule

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "train", "block_order", "lr_at"]


@dataclass
class TrainConfig:
    num_blocks: int = (
        3  # B, the number of independently trained blocks; 1 = the end-to-end diffusion baseline
    )
    layers: list[int] | None = None  # layers per block, summing to the model's L; None = L / B each
    steps_per_block: int = (
        1000  # optimizer steps each block takes (what the end-to-end baseline takes in all)
    )
    batch_size: int = 128  # examples per step
    lr: float = 1e-3  # peak AdamW learning rate
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup: int = 100  # steps of linear warm-up, counted in each block's own steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float | None = 1.0  # max gradient norm of a block; None = no clipping
    schedule: str = "random"  # block order: "random" (a seeded interleaving) or "sequential" (block 0 first)
    partition: str = (
        "equiprob"  # noise partition: "equiprob" (equal probability mass) or "uniform" (in ln sigma)
    )
    gamma: float = 0.05  # overlap: each block's interval widened by gamma x its log-width on both sides
    sigma_min: float = 0.002  # lowest noise level
    sigma_max: float = 80.0  # highest noise level
    p_mean: float = -1.2  # mean of ln sigma during training
    p_std: float = 1.2  # std of ln sigma during training
    precision: str = "fp32"  # "fp32", or "bf16" autocast (weights and optimizer state stay fp32)
    device: str = "auto"  # torch device; "auto" = cuda if available, else cpu
    seed: int = 0  # seeds initialisation, data order, noise and the block order
    out_dir: str | None = None  # run folder for checkpoints and metrics; None = keep nothing on disk
    log_every: int = 50  # block steps between metric lines (each one costs a host-device sync)
    ckpt_every: int = 500  # total steps between checkpoints; 0 = only at the end (and on Ctrl-C)
    kernels: str = "auto"  # op implementations: "auto", "cuda", "triton" or "torch"
    progress: bool = True  # show a tqdm progress bar

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}")
        need(self.steps_per_block >= 1, f"steps_per_block must be >= 1, got {self.steps_per_block}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0 and self.min_lr >= 0, f"need lr > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        need(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            f"betas must be in [0, 1), got {self.beta1}, {self.beta2}",
        )
        need(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or None, got {self.grad_clip}",
        )
        need(
            self.schedule in ("random", "sequential"),
            f"schedule must be 'random' or 'sequential', not {self.schedule!r}",
        )
        need(
            self.precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {self.precision!r}"
        )
        need(self.kernels in KERNELS, f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.ckpt_every >= 0, f"ckpt_every must be >= 0, got {self.ckpt_every}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


# Fields that may differ when a run is resumed: they change where and how a run reports, not its numbers.
_RESUME_FREE = {"out_dir", "log_every", "ckpt_every", "progress", "device", "kernels"}


class TrainingDiverged(FloatingPointError):
    """The loss or gradient of a block became NaN or infinite."""


def block_order(schedule: str, num_blocks: int, steps_per_block: int, seed: int) -> np.ndarray:
    """The block trained at each global step: sequential (0,0,...,1,1,...) or a seeded random interleaving."""
    order = np.repeat(np.arange(num_blocks, dtype=np.int32), steps_per_block)
    if schedule == "random":
        order = np.random.default_rng(rng.derive_seed(seed, rng.ORDER)).permutation(order)
    return order


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at a block's own step: linear warm-up to lr, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps_per_block - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    return device


class _Window:
    """Metrics of one block since its last log line, kept on the device to avoid a sync per step."""

    def __init__(self):
        self.loss = self.grad_norm = None
        self.steps = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss = loss.detach() if self.loss is None else self.loss + loss.detach()
        self.grad_norm = grad_norm if self.grad_norm is None else torch.maximum(self.grad_norm, grad_norm)
        self.steps += 1


class Trainer:
    """Holds the blocks, their optimizers and their step counts; `fit()` runs the schedule."""

    def __init__(
        self, task, data, config: TrainConfig, *, resume: bool = False, callback: Callable | None = None
    ):
        config.validate()
        self.task, self.data, self.config, self.callback = task, data, config, callback
        self.device = _resolve_device(config.device)
        self.schedule = NoiseSchedule(
            config.num_blocks,
            config.partition,
            config.gamma,
            config.sigma_min,
            config.sigma_max,
            config.p_mean,
            config.p_std,
        )
        self.layers = split_layers(task.num_layers, config.num_blocks, config.layers)
        task.check_data(data)
        if config.batch_size > len(data):
            raise ValueError(
                f"batch_size {config.batch_size} is larger than the training set ({len(data)} examples); "
                f"lower --batch-size"
            )
        self.model = BlockModel.create(task, self.schedule, self.layers, config.seed).to(self.device)
        self.model.set_kernels(config.kernels)
        self.optimizers = [
            torch.optim.AdamW(
                blk.parameters(),
                lr=config.lr,
                betas=(config.beta1, config.beta2),
                weight_decay=config.weight_decay,
            )
            for blk in self.model.blocks
        ]
        self.steps_done = [0] * config.num_blocks
        self.saved_steps = [0] * config.num_blocks
        self.order = block_order(config.schedule, config.num_blocks, config.steps_per_block, config.seed)
        self._perm: dict[int, tuple[int, torch.Tensor]] = {}
        self._windows = [_Window() for _ in range(config.num_blocks)]
        self._clock = (time.perf_counter(), 0)  # (time, total steps) at the last metric line
        self._mid_step = False
        self.run_dir = Path(config.out_dir) if config.out_dir else None
        self._manifest: dict | None = None
        if resume:
            self._resume()
        elif self.run_dir is not None and (self.run_dir / checkpoint.MANIFEST).exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run; pass resume=True (--resume) to continue it, or choose "
                f"another out_dir. Nothing was changed."
            )

    # --- one step -------------------------------------------------------------------------------------------
    def _batch_indices(self, b: int, step: int) -> torch.Tensor:
        """Block b's batch at its step `step`: epoch-wise permutations seeded by (seed, block, epoch)."""
        n, bs = len(self.data), self.config.batch_size
        per_epoch = n // bs  # drop the ragged end, so every batch has batch_size examples
        epoch, j = divmod(step, per_epoch)
        if self._perm.get(b, (None,))[0] != epoch:
            g = rng.generator("cpu", self.config.seed, rng.DATA, b, epoch)
            self._perm[b] = (epoch, torch.randperm(n, generator=g))
        return self._perm[b][1][j * bs : (j + 1) * bs]

    def step(self, b: int) -> torch.Tensor:
        """One optimizer step of block b (touches block b's tensors only); returns the loss tensor."""
        cfg, s = self.config, self.steps_done[b]
        block, opt = self.model.blocks[b], self.optimizers[b]
        batch = {
            k: v.to(self.device, non_blocking=True)
            for k, v in self.data.batch(self._batch_indices(b, s)).items()
        }
        g = rng.generator(self.device, cfg.seed, rng.TRAIN, b, s)
        sigma = self.schedule.sample_sigma(b, cfg.batch_size, g, self.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(s, cfg)
        block.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, _ = self.task.loss(block, batch, sigma, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # with no clipping, max_norm=inf still yields the norm (for logging and the NaN check) and scales by 1
        grad_norm = torch.nn.utils.clip_grad_norm_(block.parameters(), cfg.grad_clip or math.inf)
        opt.step()
        self.steps_done[b] += 1
        self._windows[b].add(loss, grad_norm)
        return loss

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> BlockModel:
        """Run the block schedule to the end, logging and checkpointing; returns the trained model.

        Ctrl-C finishes the current step, saves (with out_dir) and re-raises KeyboardInterrupt; resume=True
        then continues exactly. Any other error saves nothing, so the last checkpoint stays as it was.
        """
        if self.run_dir is not None:
            self._write_config()
        start = sum(self.steps_done)
        self._clock = (time.perf_counter(), start)
        bar = tqdm(
            total=len(self.order),
            initial=start,
            disable=not self.config.progress,
            desc="train",
            unit="step",
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file: a line every 30 s
        )
        self._mid_step = False
        try:
            with _ctrl_c_between_steps() as interrupted:
                for pos in range(start, len(self.order)):
                    self._mid_step = True
                    b = int(self.order[pos])
                    self.step(b)
                    self._mid_step = False
                    if interrupted():
                        raise KeyboardInterrupt
                    self._after_step(pos, b, bar)
        except KeyboardInterrupt:
            bar.close()
            if self.run_dir is not None and self._mid_step:
                msg = f"interrupted during a step: nothing saved; {self.run_dir} holds the last checkpoint"
                warnings.warn(msg, stacklevel=2)
            elif self.run_dir is not None:
                self.save()
                msg = (
                    f"interrupted: saved {self.run_dir} at block steps {self.steps_done}; resume to continue"
                )
                warnings.warn(msg, stacklevel=2)
            raise
        bar.close()
        self.save(complete=True)
        return self.model

    def _after_step(self, pos: int, b: int, bar) -> None:
        cfg = self.config
        if self.steps_done[b] % cfg.log_every == 0 or self.steps_done[b] == cfg.steps_per_block:
            bar.set_postfix(self._log(b), refresh=False)
        bar.update(1)
        if self.callback is not None:
            self.callback(self, b)
        if cfg.ckpt_every and (pos + 1) % cfg.ckpt_every == 0 and pos + 1 < len(self.order):
            self.save()

    def _log(self, b: int) -> dict:
        """Write block b's metric line (one sync) and raise if its loss or gradient went non-finite."""
        w = self._windows[b]
        if w.steps == 0:
            return {}
        loss, grad_norm = (w.loss / w.steps).item(), w.grad_norm.item()  # the sync: all queued work is done
        self._check_finite(b, loss, grad_norm, w.steps)
        now, pos = time.perf_counter(), sum(self.steps_done)
        step_ms = 1000 * (now - self._clock[0]) / max(1, pos - self._clock[1])
        self._clock = (now, pos)
        lo, hi = self.schedule.interval(b)
        rec = {
            "block": b,
            "step": self.steps_done[b],
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_at(self.steps_done[b] - 1, self.config),
            "sigma_lo": lo,
            "sigma_hi": hi,
            "step_ms": step_ms,  # mean wall time of a step (of any block) since the previous metric line
        }
        if self.device.type == "cuda":
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        self._windows[b] = _Window()
        return {"block": b, "loss": f"{loss:.4f}"}

    def _check_finite(self, b: int, loss: float, grad_norm: float, window: int) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        end = self.steps_done[b]
        saved = (
            f"the last checkpoint ({self.run_dir}, block {b} at step {self.saved_steps[b]}) is intact; "
            if (self.run_dir is not None and self._manifest is not None)
            else ""
        )
        raise TrainingDiverged(
            f"block {b}: the loss or gradient became non-finite (loss {loss}, grad norm {grad_norm}) "
            f"between its "
            f"steps {end - window + 1} and {end}. Nothing was saved after it: {saved}lower --lr, lengthen "
            f"--warmup, set --grad-clip, or use --precision fp32."
        )

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "train": asdict(self.config),
            "task": self.task.to_dict(),
            "layers": self.layers,
            "data": getattr(self.data, "name", type(self.data).__name__),
            "versions": _versions(),
        }
        checkpoint.atomic_write(self.run_dir / "config.json", json.dumps(info, indent=1).encode())

    def save(self, complete: bool = False) -> None:
        """Checkpoint every block whose step count changed since the last save (no-op without out_dir)."""
        if self.run_dir is None:
            return
        for b in range(self.config.num_blocks):  # never write weights that came from a diverged step
            w = self._windows[b]
            if w.steps:
                self._check_finite(b, w.loss.item(), w.grad_norm.item(), w.steps)
        changed = {
            b: checkpoint.block_state(self.model.blocks[b], self.optimizers[b])
            for b in range(self.config.num_blocks)
            if self.steps_done[b] != self.saved_steps[b] or self._manifest is None
        }
        prev = self._manifest["blocks"] if self._manifest else [{} for _ in self.steps_done]
        manifest = {
            "train": asdict(self.config),
            "task": self.task.to_dict(),
            "layers": self.layers,
            "schedule": self.schedule.to_dict(),
            "blocks": [{**prev[b], "steps": self.steps_done[b]} for b in range(self.config.num_blocks)],
            "complete": complete,
            # every random draw is a function of (seed, stream, block, step): the steps are the whole state
            "rng": {"kind": "counter", "seed": self.config.seed, "key": "(seed, stream, block, step)"},
            "versions": _versions(),
        }
        self._manifest = checkpoint.save_blocks(self.run_dir, manifest, changed)
        self.saved_steps = list(self.steps_done)

    def _resume(self) -> None:
        if self.run_dir is None:
            raise ValueError("resume=True needs out_dir (--out): the run folder to continue")
        manifest = checkpoint.read_manifest(self.run_dir)
        saved, now = manifest["train"], asdict(self.config)
        diff = {k: (saved.get(k), v) for k, v in now.items() if k not in _RESUME_FREE and saved.get(k) != v}
        if manifest["task"] != self.task.to_dict():
            diff["task"] = (manifest["task"], self.task.to_dict())
        if diff:
            lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"cannot resume {self.run_dir}: the configuration differs ({lines}). Use the saved values."
            )
        steps = [e["steps"] for e in manifest["blocks"]]
        pos = sum(steps)
        if np.bincount(self.order[:pos], minlength=self.config.num_blocks).tolist() != steps:
            raise checkpoint.CheckpointError(
                f"{self.run_dir}: block steps {steps} do not match the block schedule"
            )
        for b, n in enumerate(steps):
            if n:
                tensors = checkpoint.read_block(self.run_dir, manifest, b)
                checkpoint.load_block_state(self.model.blocks[b], tensors, self.optimizers[b], n)
        self.steps_done, self.saved_steps, self._manifest = list(steps), list(steps), manifest
        _trim_metrics(self.run_dir / "metrics.jsonl", steps)


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Hold a Ctrl-C until the current step has finished, so a save never sees a half-updated block.

    Yields a function that says whether Ctrl-C was pressed; a second Ctrl-C interrupts at once. Only the main
    thread can own signal handlers; elsewhere Ctrl-C is left as it is.
    """
    pressed = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, old)


def _trim_metrics(path: Path, steps: list[int]) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by the crash we resume from
            continue
        if rec["step"] <= steps[rec["block"]]:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if keep != lines:
        checkpoint.atomic_write(path, "".join(keep).encode())


def _versions() -> dict:
    return {"dblocks_fast": __version__, "torch": torch.__version__}


def train(
    task, data, config: TrainConfig | None = None, *, resume: bool = False, callback=None
) -> BlockModel:
    """Train `task` on `data` block by block; returns the trained BlockModel.

    Args:
        task: e.g. tasks.ImageGeneration(DiTConfig(...)).
        data: the training set (an object with len() and batch(indices)), e.g. data.load_digits("train").
        config: TrainConfig; out_dir=None trains in memory only.
        resume: continue the run in config.out_dir exactly where its last checkpoint left off.
        callback: called as callback(trainer, block) after every step (e.g. for custom logging).
    """
    return Trainer(task, data, config or TrainConfig(), resume=resume, callback=callback).fit()
