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
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, checkpoint, distributed, optim, rng
from .lr import lr_at
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
    schedule: str = "random"  # block order: "random" (seeded interleaving), "sequential", "chunked"
    chunk_steps: int = 50  # schedule="chunked": a block takes this many steps before another block's turn
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
    offload: str = "none"  # where blocks wait while others train: "none" (device), "host" or "disk"
    prefetch: bool = True  # with offload: copy the next block in while the current one trains
    only_blocks: list[int] | None = None  # train just these blocks here; None = all (see dblocks-fast merge)
    distributed: str = "auto"  # "auto": block-parallel under torchrun (WORLD_SIZE > 1); "on"; "off"

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
            self.schedule in ("random", "sequential", "chunked"),
            f"schedule must be 'random', 'sequential' or 'chunked', not {self.schedule!r}",
        )
        need(self.chunk_steps >= 1, f"chunk_steps must be >= 1, got {self.chunk_steps}")
        need(
            self.precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {self.precision!r}"
        )
        need(self.kernels in KERNELS, f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.ckpt_every >= 0, f"ckpt_every must be >= 0, got {self.ckpt_every}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(
            self.offload in ("none", "host", "disk"),
            f"offload must be 'none', 'host' or 'disk', got {self.offload!r}",
        )
        need(
            self.distributed in ("auto", "on", "off"),
            f"distributed must be 'auto', 'on' or 'off', got {self.distributed!r}",
        )
        if self.only_blocks is not None:
            blocks = list(self.only_blocks)
            need(len(blocks) > 0, "only_blocks is empty; give at least one block, or None for all")
            need(len(set(blocks)) == len(blocks), f"only_blocks {blocks} names a block twice")
            bad = [b for b in blocks if not 0 <= b < self.num_blocks]
            need(not bad, f"only_blocks {blocks}: {bad} not in 0..{self.num_blocks - 1}")

    def blocks_to_train(self) -> list[int]:
        return sorted(self.only_blocks) if self.only_blocks is not None else list(range(self.num_blocks))


# Fields that may differ when a run is resumed: they change where and how a run reports, or which process
# trains which block, never a block's numbers.
_RESUME_FREE = distributed.RESUME_FREE


class TrainingDiverged(FloatingPointError):
    """The loss or gradient of a block became NaN or infinite."""


def block_order(
    schedule: str, num_blocks: int, steps_per_block: int, seed: int, chunk_steps: int = 50
) -> np.ndarray:
    """The block trained at each global step: sequential (0,0,...,1,1,...), a seeded random interleaving of
    single steps, or "chunked": runs of chunk_steps steps of one block, the runs in a seeded random order
    (fewer block switches, so less paging, than "random")."""
    order = np.repeat(np.arange(num_blocks, dtype=np.int32), steps_per_block)
    gen = np.random.default_rng(rng.derive_seed(seed, rng.ORDER))
    if schedule == "random":
        order = gen.permutation(order)
    elif schedule == "chunked":
        runs = [
            np.full(min(chunk_steps, steps_per_block - start), b, dtype=np.int32)
            for b in range(num_blocks)
            for start in range(0, steps_per_block, chunk_steps)
        ]
        order = np.concatenate([runs[i] for i in gen.permutation(len(runs))])
    return order


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
    """Holds the blocks, their optimizers and their step counts; `fit()` runs the schedule.

    Under torchrun (or with config.distributed="on") each process holds and trains only the blocks placed on
    it (distributed.place); `only_blocks` restricts training to some blocks. Blocks not trained here are
    AbsentBlock placeholders with no tensors, and `optimizers[b]` is None for them.
    """

    def __init__(
        self, task, data, config: TrainConfig, *, resume: bool = False, callback: Callable | None = None
    ):
        config.validate()
        self.task, self.data, self.config, self.callback = task, data, config, callback
        self.comm, self.device = distributed.connect(
            config.distributed, config.blocks_to_train(), config.device
        )
        try:
            self._setup(task, data, config, resume)
        except BaseException:
            self.comm.close()  # leave no process group behind
            raise

    def _setup(self, task, data, config: TrainConfig, resume: bool) -> None:
        self.owned = list(self.comm.placement.blocks)  # the blocks this process trains
        group = len(self.comm.placement.group)
        if config.batch_size % group:
            raise ValueError(
                f"batch_size {config.batch_size} does not split evenly over the {group} ranks that share a "
                f"block; use a multiple of {group}"
            )
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
        self.run_dir = Path(config.out_dir) if config.out_dir else None
        if not resume and self.run_dir is not None and (self.run_dir / checkpoint.MANIFEST).exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run; pass resume=True (--resume) to continue it, or choose "
                f"another out_dir. Nothing was changed."
            )
        self.store = None
        if config.offload == "none":
            only = set(self.owned)
            self.model = BlockModel.create(task, self.schedule, self.layers, config.seed, only=only)
            self.model.to(self.device).set_kernels(config.kernels)
            self.optimizers = [
                self._optimizer(blk) if b in self.owned else None for b, blk in enumerate(self.model.blocks)
            ]
        else:
            self._build_paged(task, config)
        self.steps_done = [0] * config.num_blocks
        self.saved_steps = [0] * config.num_blocks
        self.order = block_order(
            config.schedule, config.num_blocks, config.steps_per_block, config.seed, config.chunk_steps
        )
        self._perm: dict[int, tuple[int, torch.Tensor]] = {}
        self._windows = [_Window() for _ in range(config.num_blocks)]
        self._clock = (time.perf_counter(), 0)  # (time, total steps) at the last metric line
        self._mid_step = False
        self._manifest: dict | None = None
        if resume:
            self._resume()

    def _optimizer(self, block: torch.nn.Module) -> torch.optim.Optimizer:
        # flat-buffer AdamW: one fused kernel a step on CUDA, torch.optim.AdamW's bits on the CPU. Paged
        # blocks are laid out flat by the store instead (the same [param | exp_avg | exp_avg_sq] layout).
        cfg = self.config
        return optim.AdamW(
            block.parameters(),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
            pack=cfg.offload == "none",
        )

    def _build_paged(self, task, config: TrainConfig) -> None:
        """offload="host"/"disk": build one block at a time straight into the store, after a preflight."""
        from . import paging
        from .model import AbsentBlock, build_block

        with torch.device("meta"):  # sizes without memory
            skeletons = [task.build_block(b, self.layers[b]) for b in self.owned]
            numels = [sum(p.numel() for p in blk.parameters()) for blk in skeletons]
        if config.offload == "disk":
            if self.run_dir is None:
                self._paged_tmp = tempfile.TemporaryDirectory(prefix="dblocks-paged-")
                folder = Path(self._paged_tmp.name)
            else:  # one folder per rank: the ranks of a data-parallel group hold the same blocks
                folder = self.run_dir / "paged" / (f"rank{self.comm.rank}" if self.comm.distributed else "")
        else:
            folder = None
        self.memory_plan = paging.preflight(config.offload, numels, self.device, folder or self.run_dir)
        self.store = paging.BlockStore(config.offload, self.device, folder)
        blocks, self.optimizers = [], [None] * config.num_blocks
        for b, n in enumerate(self.layers):
            if b not in self.owned:
                blocks.append(AbsentBlock(b))
                continue
            block = build_block(task, b, n, config.seed)  # on the CPU; the store takes its tensors
            self.optimizers[b] = self._optimizer(block)
            self.store.add(b, block, self.optimizers[b])
            blocks.append(block)
        self.model = BlockModel(task, self.schedule, self.layers, blocks).set_kernels(config.kernels)

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
        """One optimizer step of block b (touches block b's tensors only); returns the loss tensor.

        With data parallelism this rank computes its rows of the batch and the group averages the gradients.
        """
        if b not in self.owned:
            raise ValueError(f"block {b} is not trained by this process (it trains blocks {self.owned})")
        cfg, s = self.config, self.steps_done[b]
        block, opt = self.model.blocks[b], self.optimizers[b]
        if self.store is not None:
            self.store.activate(b)
        lo, hi = self.comm.placement.rows(cfg.batch_size)
        indices = self._batch_indices(b, s)[lo:hi]
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(indices).items()}
        g = rng.generator(self.device, cfg.seed, rng.TRAIN, b, s)
        if hasattr(self.task, "sample_noise"):  # its own noise process (masked diffusion: a masking level t)
            level = self.task.sample_noise(self.schedule, b, cfg.batch_size, g, self.device)
        else:
            level = self.schedule.sample_sigma(b, cfg.batch_size, g, self.device)
        sigma = level[lo:hi]
        for group in opt.param_groups:
            group["lr"] = lr_at(s, cfg)
        block.train()
        rows = {} if hi - lo == cfg.batch_size else {"rows": (lo, cfg.batch_size)}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, _ = self.task.loss(block, batch, sigma, g, **rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.comm.average_grads(block.parameters())  # a no-op on one process
        # with no clipping, max_norm=inf still yields the norm (for logging and the NaN check) and scales by 1
        grad_norm = torch.nn.utils.clip_grad_norm_(block.parameters(), cfg.grad_clip or math.inf)
        opt.step()
        # free the gradients now, not at the block's next step: otherwise every block trained so far keeps
        # a block's worth of gradients on the device (and on a paged-out block, beside nothing else)
        opt.zero_grad(set_to_none=True)
        self.steps_done[b] += 1
        self._windows[b].add(loss, grad_norm)
        return loss

    # --- the loop -------------------------------------------------------------------------------------------
    def _positions(self) -> tuple[int, np.ndarray]:
        """(first position of the block order still to run, each position's step index within its block).

        Every process computes the same start from the same block steps, so periodic checkpoints fall on the
        same positions on every rank.
        """
        order = self.order
        step_of = np.zeros(len(order), dtype=np.int64)
        for b in range(self.config.num_blocks):
            at = np.flatnonzero(order == b)
            step_of[at] = np.arange(len(at))
        todo = np.isin(order, self.config.blocks_to_train()) & (step_of >= np.asarray(self.steps_done)[order])
        return (int(np.argmax(todo)) if todo.any() else len(order)), step_of

    def fit(self) -> BlockModel:
        """Run the block schedule to the end, logging and checkpointing; returns the trained model.

        Ctrl-C finishes the current step, saves (with out_dir) and re-raises KeyboardInterrupt; resume=True
        then continues exactly. Any other error saves nothing, so the last checkpoint stays as it was. Under
        torchrun a Ctrl-C stops every rank without saving (they stop at different steps); the last periodic
        checkpoint stays valid.
        """
        try:
            return self._fit()
        finally:
            self.comm.close()

    def _fit(self) -> BlockModel:
        cfg = self.config
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # every rank may write metrics before rank 0
            if self.comm.rank == 0:
                self._write_config()
        start, step_of = self._positions()
        owned = set(self.owned)
        upcoming = self._upcoming(step_of) if self.store is not None and cfg.prefetch else None
        self._clock = (time.perf_counter(), sum(self.steps_done[b] for b in owned))
        bar = tqdm(
            total=cfg.steps_per_block * len(owned),
            initial=self._clock[1],
            disable=not cfg.progress or self.comm.rank != 0,
            desc="train" if not self.comm.distributed else f"train (rank 0 of {self.comm.world})",
            unit="step",
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file: a line every 30 s
        )
        self._mid_step = False
        try:
            with _ctrl_c_between_steps() as interrupted:
                for pos in range(start, len(self.order)):
                    b = int(self.order[pos])
                    if b in owned and step_of[pos] == self.steps_done[b]:
                        self._mid_step = True
                        self.step(b)
                        self._mid_step = False
                        if upcoming is not None and upcoming[pos] >= 0:
                            self.store.prefetch(int(upcoming[pos]), active=b)  # loads while b computes
                        if interrupted():
                            raise KeyboardInterrupt
                        self._after_step(b, bar)
                    if cfg.ckpt_every and (pos + 1) % cfg.ckpt_every == 0 and pos + 1 < len(self.order):
                        self.save()
        except KeyboardInterrupt:
            bar.close()
            if self.run_dir is not None and (self._mid_step or self.comm.distributed):
                why = "during a step" if self._mid_step else "in block-parallel training"
                msg = f"interrupted {why}: nothing saved; {self.run_dir} holds the last checkpoint"
                warnings.warn(msg, stacklevel=2)
            elif self.run_dir is not None:
                self.save()
                msg = (
                    f"interrupted: saved {self.run_dir} at block steps {self.steps_done}; resume to continue"
                )
                warnings.warn(msg, stacklevel=2)
            raise
        bar.close()
        self.save()
        self._release_paged()
        return self.model

    def _upcoming(self, step_of: np.ndarray) -> np.ndarray:
        """For each position, the next block this process trains that differs from the one at it (-1: none).

        The block schedule is fixed in advance, so paging always knows what to prefetch.
        """
        order = self.order
        todo = np.isin(order, self.owned) & (step_of >= np.asarray(self.steps_done)[order])
        out = np.full(len(order), -1, dtype=np.int64)
        first = second = -1  # the nearest trained block after pos, and the nearest one after it that differs
        for pos in range(len(order) - 1, -1, -1):
            b = int(order[pos])
            out[pos] = first if first != b else second
            if todo[pos] and b != first:
                first, second = b, first
        return out

    def _release_paged(self) -> None:
        """After training: host-tier blocks stay usable on the CPU; disk-tier blocks say where they are."""
        if self.store is None:
            return
        self.store.flush()
        if self.config.offload != "disk":
            return
        from .model import PagedOutBlock

        for b in self.owned:
            self.model.blocks[b] = PagedOutBlock(b, self.run_dir)
        if self.run_dir is not None:  # the checkpoint just saved holds every block: the paging files can go
            self.store.close()

    def block_tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Block b's weights and AdamW moments as named CPU tensors (the checkpoint format), wherever."""
        if self.store is not None and self.store.closed:  # disk tier after training: the checkpoint has it
            return checkpoint.read_block(self.run_dir, self._manifest, b)
        if self.store is not None:
            return self.store.tensors(b)
        return checkpoint.block_state(self.model.blocks[b], self.optimizers[b])

    def _after_step(self, b: int, bar) -> None:
        cfg = self.config
        if self.steps_done[b] % cfg.log_every == 0 or self.steps_done[b] == cfg.steps_per_block:
            bar.set_postfix(self._log(b), refresh=False)
        bar.update(1)
        if self.callback is not None:
            self.callback(self, b)

    def _log(self, b: int) -> dict:
        """Write block b's metric line (one sync) and raise if its loss or gradient went non-finite."""
        w = self._windows[b]
        if w.steps == 0:
            return {}
        # the sync: all queued work is done. The loss is the mean over the block's data-parallel group.
        loss, grad_norm = self.comm.average_scalars(torch.stack([w.loss / w.steps, w.grad_norm])).tolist()
        self._check_finite(b, loss, grad_norm, w.steps)
        now, done = time.perf_counter(), sum(self.steps_done[i] for i in self.owned)
        step_ms = 1000 * (now - self._clock[0]) / max(1, done - self._clock[1])
        self._clock = (now, done)
        if hasattr(self.task, "sample_noise"):  # its own noise levels (masked diffusion: t, not sigma)
            lo, hi = self.task.interval(self.schedule, b)
        else:
            lo, hi = self.schedule.interval(b)
        rec = {
            "block": b,
            "step": self.steps_done[b],
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_at(self.steps_done[b] - 1, self.config),
            "sigma_lo": lo,
            "sigma_hi": hi,
            "step_ms": step_ms,  # mean wall time of a step of this process since its previous metric line
        }
        if self.comm.distributed:
            rec["rank"] = self.comm.rank
        if self.device.type == "cuda":
            rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.run_dir is not None and self.comm.placement.leader:
            with open(self.run_dir / "metrics.jsonl", "a") as f:  # one short append per line: no interleaving
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

    def _has_file(self, b: int) -> bool:
        return self._manifest is not None and bool(self._manifest["blocks"][b].get("file"))

    def save(self) -> None:
        """Checkpoint every block whose step count changed since the last save (no-op without out_dir).

        Collective under torchrun: every rank calls it at the same position of the block order. The group
        leaders write their blocks' files, the ranks exchange the file names, and rank 0 writes the manifest.
        """
        if self.run_dir is None:
            return
        cfg = self.config
        problems = []
        for b in self.owned:  # never write weights that came from a diverged step
            w = self._windows[b]
            if w.steps:
                try:
                    self._check_finite(b, w.loss.item(), w.grad_norm.item(), w.steps)
                except TrainingDiverged as e:
                    problems.append(str(e))
        changed = [
            b for b in self.owned if self.steps_done[b] != self.saved_steps[b] or not self._has_file(b)
        ]
        status = self.comm.all_gather((problems, changed), "the checkpoint")
        problems = [p for ps, _ in status for p in ps]
        if problems:
            more = f" ({len(problems) - 1} more blocks diverged)" if len(problems) > 1 else ""
            raise TrainingDiverged(problems[0] + more)
        if not any(c for _, c in status):
            return
        written = {}
        if self.comm.placement.leader:
            for b in changed:
                state = self.block_tensors(b)
                written[b] = checkpoint.write_block(self.run_dir, b, self.steps_done[b], state)
        blocks = [
            dict(e) for e in (self._manifest["blocks"] if self._manifest else [{"steps": 0}] * cfg.num_blocks)
        ]
        for part in self.comm.all_gather(written, "the checkpoint"):
            for b, entry in part.items():
                blocks[b] = entry
        manifest = {
            "train": asdict(cfg),
            "task": self.task.to_dict(),
            "layers": self.layers,
            "schedule": self.schedule.to_dict(),
            "blocks": blocks,
            "complete": all(e["steps"] == cfg.steps_per_block for e in blocks),
            # every random draw is a function of (seed, stream, block, step): the steps are the whole state
            "rng": {"kind": "counter", "seed": cfg.seed, "key": "(seed, stream, block, step)"},
            "versions": _versions(),
        }
        if self.comm.rank == 0:
            manifest = checkpoint.commit(self.run_dir, manifest)
        else:
            manifest = {**manifest, "format": checkpoint.FORMAT}
        self.comm.barrier("the checkpoint")  # nobody writes the next files before this manifest is in place
        self._manifest = manifest
        for b in self.owned:
            self.saved_steps[b] = self.steps_done[b]

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
        spb = self.config.steps_per_block
        if len(steps) != self.config.num_blocks or not all(0 <= n <= spb for n in steps):
            raise checkpoint.CheckpointError(
                f"{self.run_dir}: block steps {steps} do not fit {self.config.num_blocks} blocks of "
                f"{self.config.steps_per_block} steps"
            )
        for b in self.owned:
            if steps[b]:
                tensors = checkpoint.read_block(self.run_dir, manifest, b)
                if self.store is not None:
                    self.store.load(b, tensors, steps[b])
                else:
                    checkpoint.load_block_state(self.model.blocks[b], tensors, self.optimizers[b], steps[b])
        self.steps_done, self.saved_steps, self._manifest = list(steps), list(steps), manifest
        if self.comm.rank == 0:
            _trim_metrics(self.run_dir / "metrics.jsonl", steps)
        self.comm.barrier("resuming")


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
