"""dblocks_fast.train(): block-wise training, where each step trains one block only.

Wiring only; the math lives in schedule, precond, the task and ops. Every block has its own AdamW, its own
warm-up + cosine schedule counted in its own steps, its own data order and its own random stream, all
derived from (seed, block, step) (see rng.py): the order in which blocks are trained changes no bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, ops, optim, rng, storage
from .checkpoint import FORMAT, RunFolder, RunInUse
from .config import TrainConfig
from .data import training_batch
from .lr import lr_at
from .model import AbsentBlock, BlockModel, build_block, layer_ranges, split_layers
from .tasks.base import check_protocol

__all__ = ["Preempted", "TrainConfig", "Trainer", "TrainingDiverged", "train", "block_order", "lr_at"]


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

    Where the blocks' weights and AdamW moments live is the storage's business (`storage.create` from
    config.storage: resident on the device, or paged to host memory or disk); the run folder's files are
    `checkpoint.RunFolder`'s. Under torchrun (or with config.runtime.distributed="on") each process holds
    and trains only the blocks placed on it (distributed.place); `only_blocks` restricts training to some
    blocks. Blocks not trained here are AbsentBlock placeholders with no tensors, and `optimizers[b]` is None
    for them.
    """

    def __init__(
        self,
        task,
        data,
        config: TrainConfig,
        *,
        resume: bool = False,
        extend: bool = False,
        callback: Callable | None = None,
    ):
        config.validate()
        check_protocol(task)  # a missing method is one clear error now, not an AttributeError mid-run
        if extend and not resume:
            raise ValueError("extend=True (--extend) continues a run: it needs resume=True (--resume)")
        self.task, self.data, self.config, self.callback = task, data, config, callback
        self.run, self._created_run = None, False
        self._logger = None  # TensorBoard or wandb (config.io.log), opened when fit() starts
        rt = config.runtime
        self.comm, self.device = distributed.connect(rt.distributed, config.blocks_to_train(), rt.device)
        try:
            self._setup(task, data, config, resume, extend)
        except BaseException:
            self._release_run(failed=True)
            self.comm.close()  # leave no process group behind
            raise

    def _setup(self, task, data, config: TrainConfig, resume: bool, extend: bool) -> None:
        ops.check_kernels(config.runtime.kernels, self.device)  # not at the first step, after config.json
        if config.io.log != "none":
            from .loggers import check_logger

            check_logger(config.io.log)  # a missing package: an error now, before the run folder is written
        self.owned = list(self.comm.placement.blocks)  # the blocks this process trains
        group = len(self.comm.placement.group)
        if config.batch_size % group:
            raise ValueError(
                f"batch_size {config.batch_size} does not split evenly over the {group} ranks that share a "
                f"block; use a multiple of {group}"
            )
        self.schedule = task.noise_process(config.noise, config.num_blocks)  # EDM, flow matching, masking
        self.layers = split_layers(task.num_layers, config.num_blocks, config.layers)
        self.ranges = layer_ranges(self.layers)  # block b owns the model's layers [l_b, l_b+1)
        task.check_data(data)
        if config.batch_size > len(data):
            raise ValueError(
                f"batch_size {config.batch_size} is larger than the training set ({len(data)} examples); "
                f"lower --batch-size"
            )
        self.run = RunFolder(config.io.out_dir) if config.io.out_dir else None
        self._take_run_folder(resume)  # before anything is written there, even the disk tier's scratch files
        if not resume and self.run is not None and self.run.holds_run():
            raise FileExistsError(
                f"{self.run} already holds a run; pass resume=True (--resume) to continue it, or choose "
                f"another out_dir. Nothing was changed."
            )
        self._build(task, config)
        self.steps_done = [0] * config.num_blocks
        self.saved_steps = [0] * config.num_blocks
        chunk = config.chunk_steps or max(1, len(data) // config.batch_size)  # 0: an epoch a turn
        self.order = block_order(
            config.schedule, config.num_blocks, config.steps_per_block, config.seed, chunk
        )
        self._perm: dict[int, tuple[int, torch.Tensor]] = {}
        self._windows = [_Window() for _ in range(config.num_blocks)]
        self._clock = (time.perf_counter(), 0)  # (time, total steps) at the last metric line
        self._mid_step = False
        if resume:
            self._resume(extend)

    def _take_run_folder(self, resume: bool) -> None:
        """Lock the run folder for this run (rank 0 holds it for all ranks); refuse one that another holds.

        A fresh start into a folder without a checkpoint drops the metric lines found there: they are a
        start's that was killed before its first checkpoint, and this run takes those steps again.
        """
        if self.run is None:
            return
        self._created_run = not self.run.path.exists()
        problem = None
        if self.comm.rank == 0:
            try:
                self.run.lock()
            except RunInUse as e:
                problem = str(e)
            if problem is None and not resume and not self.run.holds_run():
                self.run.trim_metrics([0] * self.config.num_blocks)  # before any rank writes a line
        problems = [p for p in self.comm.all_gather(problem, "locking the run folder") if p]
        if problems:
            raise RunInUse(problems[0])

    def _release_run(self, failed: bool = False) -> None:
        """Unlock the run folder; after a failed set-up, leave no folder that it created and left empty."""
        if self.run is None:
            return
        held = self.run.locked
        self.run.unlock()
        path = self.run.path
        if failed and held and self._created_run and {p.name for p in path.iterdir()} <= {RunFolder.LOCK}:
            (path / RunFolder.LOCK).unlink(missing_ok=True)
            path.rmdir()

    def _build(self, task, config: TrainConfig) -> None:
        """The storage first (the paged tiers' preflight refuses a model that does not fit before anything
        is allocated), then each block, built on the CPU from its own seed and handed to the storage."""
        with torch.device("meta"):  # sizes without memory
            skeletons = [task.build_block(b, self.ranges[b]) for b in self.owned]
            numels = [sum(p.numel() for _, p in optim.trained(blk)) for blk in skeletons]
            frozen = [sum(p.numel() * p.element_size() for p in optim.frozen(blk)) for blk in skeletons]
        st = config.storage
        rank = self.comm.rank if self.comm.distributed else None
        folder = self.run.paged_folder(rank) if self.run is not None else None
        self.storage = storage.create(
            st.offload, self.device, folder=folder, prefetch=st.prefetch, numels=numels, frozen=frozen
        )
        blocks, self.optimizers = [], [None] * config.num_blocks
        for b, layers in enumerate(self.ranges):
            if b not in self.owned:
                blocks.append(AbsentBlock(b))
                continue
            block = build_block(task, b, layers, config.seed)
            self.optimizers[b] = self._optimizer(block)
            self.storage.add(b, block, self.optimizers[b])
            blocks.append(block)
        self.model = BlockModel(task, self.schedule, self.layers, blocks).set_kernels(config.runtime.kernels)

    def _optimizer(self, block: torch.nn.Module) -> torch.optim.Optimizer:
        # flat-buffer AdamW: one fused kernel a step on CUDA, torch.optim.AdamW's bits on the CPU. The
        # storage lays the block out flat (optim.FlatLayout) wherever it keeps it, so nothing is packed here
        o = self.config.optimizer
        betas = (o.beta1, o.beta2)
        params = [p for _, p in optim.trained(block)]
        if not params:
            raise ValueError(f"a {self.task.kind} block has no trained parameters (none has requires_grad)")
        return optim.AdamW(params, lr=o.lr, betas=betas, weight_decay=o.weight_decay, pack=False)

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
        self.storage.activate(b)
        lo, hi = self.comm.placement.rows(cfg.batch_size)
        indices = self._batch_indices(b, s)
        batch = training_batch(self.data, indices, cfg.seed, b, s, (lo, hi))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        g = rng.generator(self.device, cfg.seed, rng.TRAIN, b, s)
        level = self.schedule.sample(b, cfg.batch_size, g, self.device)[lo:hi]
        for group in opt.param_groups:
            group["lr"] = lr_at(s, cfg)
        block.train()
        rows = {} if hi - lo == cfg.batch_size else {"rows": (lo, cfg.batch_size)}
        bf16 = cfg.runtime.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = self.task.loss(block, batch, level, g, **rows, process=self.schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = opt.param_groups[0]["params"]  # the trained ones (a LoRA block's adapters)
        self.comm.average_grads(params)  # a no-op on one process
        # with no clipping, max_norm=inf still yields the norm (for logging and the NaN check) and scales by 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip or math.inf)
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
            self.close()

    def close(self) -> None:
        """Release the run folder (its lock) and the process group; fit() does it when it ends. A Trainer
        that is never fit holds its run folder until this call or until it is garbage-collected."""
        if self._logger is not None:
            self._logger.close()
            self._logger = None
        self.comm.close()
        self._release_run()

    def _fit(self) -> BlockModel:
        cfg = self.config
        if self.run is not None:
            self.run.path.mkdir(parents=True, exist_ok=True)  # every rank may write metrics before rank 0
            if self.comm.rank == 0:
                data = getattr(self.data, "name", type(self.data).__name__)
                self.run.write_config(cfg, self.task.to_dict(), self.layers, data)
            self._open_logger()
        start, step_of = self._positions()
        owned = set(self.owned)
        upcoming = self._upcoming(step_of) if self.storage.prefetches else None
        self._clock = (time.perf_counter(), sum(self.steps_done[b] for b in owned))
        bar = tqdm(
            total=cfg.steps_per_block * len(owned),
            initial=self._clock[1],
            disable=not cfg.io.progress or self.comm.rank != 0,
            desc="train" if not self.comm.distributed else f"train (rank 0 of {self.comm.world})",
            unit="step",
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file: a line every 30 s
        )
        self._mid_step = False
        ckpt_every = cfg.io.ckpt_every
        try:
            with _stops_between_steps() as pending:
                for pos in range(start, len(self.order)):
                    b = int(self.order[pos])
                    if b in owned and step_of[pos] == self.steps_done[b]:
                        self._mid_step = True
                        self.step(b)
                        self._mid_step = False
                        if upcoming is not None and upcoming[pos] >= 0:
                            self.storage.prefetch(int(upcoming[pos]), active=b)  # loads while b computes
                        stop = pending()
                        if stop is not None:
                            raise KeyboardInterrupt if stop == "SIGINT" else Preempted(stop)
                        self._after_step(b, bar)
                    if ckpt_every and (pos + 1) % ckpt_every == 0 and pos + 1 < len(self.order):
                        self.save()
        except KeyboardInterrupt as e:  # Ctrl-C, or a Preempted (SIGTERM, SIGUSR1)
            bar.close()
            what = f"stopped by {e.signal}" if isinstance(e, Preempted) else "interrupted"
            if self.run is not None and (self._mid_step or self.comm.distributed):
                why = "during a step" if self._mid_step else "in block-parallel training"
                msg = f"{what} {why}: nothing saved; {self.run} holds the last checkpoint"
                warnings.warn(msg, stacklevel=2)
            elif self.run is not None:
                self.save()
                msg = f"{what}: saved {self.run} at block steps {self.steps_done}; resume to continue"
                warnings.warn(msg, stacklevel=2)
            raise
        bar.close()
        self.save()
        # the checkpoint just saved holds every block: the storage may hand its copies over to it
        self.storage.release(self.model, self.run)
        return self.model

    def _open_logger(self) -> None:
        """config.io.log's logger: TensorBoard in every process that writes metric lines (each its own event
        file in one folder), wandb in rank 0 only (one wandb run; under torchrun it shows rank 0's blocks)."""
        kind = self.config.io.log
        writes = self.comm.placement.leader if kind == "tensorboard" else self.comm.rank == 0
        if kind != "none" and writes and self._logger is None:
            from .loggers import open_logger

            self._logger = open_logger(kind, self.run.path, dataclasses.asdict(self.config))

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

    def block_tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Block b's weights and AdamW moments as named CPU tensors (the checkpoint format), wherever."""
        return self.storage.tensors(b)

    def _after_step(self, b: int, bar) -> None:
        cfg = self.config
        if self.steps_done[b] % cfg.io.log_every == 0 or self.steps_done[b] == cfg.steps_per_block:
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
        if self.run is not None and self.comm.placement.leader:
            self.run.append_metrics(rec)
        if self._logger is not None:
            from .loggers import train_scalars

            block, process = train_scalars(rec, self.config.batch_size)
            self._logger.scalars(block, rec["step"])  # a block's curve over its own steps
            self._logger.scalars(process, done)  # throughput and memory over this process's steps
        self._windows[b] = _Window()
        return {"block": b, "loss": f"{loss:.4f}"}

    def _check_finite(self, b: int, loss: float, grad_norm: float, window: int) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        end = self.steps_done[b]
        saved = (
            f"the last checkpoint ({self.run}, block {b} at step {self.saved_steps[b]}) is intact; "
            if (self.run is not None and self.run.manifest is not None)
            else ""
        )
        raise TrainingDiverged(
            f"block {b}: the loss or gradient became non-finite (loss {loss}, grad norm {grad_norm}) "
            f"between its "
            f"steps {end - window + 1} and {end}. Nothing was saved after it: {saved}lower --lr, lengthen "
            f"--warmup, set --grad-clip, or use --precision fp32."
        )

    # --- checkpoints ----------------------------------------------------------------------------------------
    def _manifest_now(self, blocks: list[dict]) -> dict:
        return RunFolder.new_manifest(
            self.config, self.task.to_dict(), self.layers, self.schedule.to_dict(), blocks
        )

    def save(self) -> None:
        """Checkpoint every block whose step count changed since the last save (no-op without out_dir).

        Collective under torchrun: every rank calls it at the same position of the block order. The group
        leaders write their blocks' files, the ranks exchange the file names, and rank 0 writes the manifest.
        """
        if self.run is None:
            return
        last = self.run.manifest
        problems = []
        for b in self.owned:  # never write weights that came from a diverged step
            w = self._windows[b]
            if w.steps:
                try:
                    self._check_finite(b, w.loss.item(), w.grad_norm.item(), w.steps)
                except TrainingDiverged as e:
                    problems.append(str(e))
        changed = [
            b
            for b in self.owned
            if self.steps_done[b] != self.saved_steps[b] or not (last and last["blocks"][b].get("file"))
        ]
        status = self.comm.all_gather((problems, changed), "the checkpoint")
        problems = [p for ps, _ in status for p in ps]
        if problems:
            more = f" ({len(problems) - 1} more blocks diverged)" if len(problems) > 1 else ""
            raise TrainingDiverged(problems[0] + more)
        if not any(c for _, c in status):
            return
        written = {}
        try:
            if self.comm.placement.leader:
                # the files' sizes are known before any is written: refuse a checkpoint that cannot fit
                self.run.check_space(sum(self._checkpoint_bytes(b) for b in changed))
                for b in changed:
                    written[b] = self.run.write_block(b, self.steps_done[b], self.block_tensors(b))
            blocks = [dict(e) for e in (last["blocks"] if last else [{"steps": 0}] * self.config.num_blocks)]
            for part in self.comm.all_gather(written, "the checkpoint"):
                for b, entry in part.items():
                    blocks[b] = entry
            manifest = self._manifest_now(blocks)
            if self.comm.rank == 0:
                self.run.commit(manifest)
            else:
                self.run.manifest = {**manifest, "format": FORMAT}
        except BaseException:
            # no manifest names what this save wrote: remove it, so a failure leaves only the last checkpoint
            self.run.discard([e["file"] for e in written.values()])
            raise
        self.comm.barrier("the checkpoint")  # nobody writes the next files before this manifest is in place
        for b in self.owned:
            self.saved_steps[b] = self.steps_done[b]

    def _checkpoint_bytes(self, b: int) -> int:
        """The size of block b's checkpoint file: its weights and both AdamW moments, in float32."""
        return 12 * sum(p.numel() for p in self.model.blocks[b].parameters())

    def _resume(self, extend: bool = False) -> None:
        if self.run is None:
            raise ValueError("resume=True needs out_dir (--out): the run folder to continue")
        steps = self.run.resume(self._manifest_now([{"steps": 0}] * self.config.num_blocks), extend)
        for b in self.owned:
            if steps[b]:
                self.storage.load(b, self.run.read_block(b), steps[b])
        self.steps_done, self.saved_steps = list(steps), list(steps)
        if self.comm.rank == 0:
            self.run.trim_metrics(steps)
            self.run.remove_unnamed()  # block files a crash or a full disk left behind
        self.comm.barrier("resuming")


class Preempted(KeyboardInterrupt):
    """Training stopped on SIGTERM or SIGUSR1 (what cluster schedulers and spot instances send before they
    kill): the current step finished and, with a run folder, the run was saved. `signal` names the signal."""

    def __init__(self, signal: str):
        super().__init__(signal)
        self.signal = signal


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


@contextlib.contextmanager
def _stops_between_steps():
    """Hold Ctrl-C (SIGINT), SIGTERM and SIGUSR1 until the current step has finished, so a save never sees a
    half-updated block.

    Yields a function that names the first such signal received (None if none). A second Ctrl-C interrupts
    at once; a second SIGTERM does not (a scheduler's SIGKILL follows anyway). Only the main thread can own
    signal handlers; elsewhere the signals are left as they are.
    """
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if got and name == "SIGINT":
            raise KeyboardInterrupt
        if not got:
            got.append(name)

    sigs = [getattr(signal, s) for s in _STOP_SIGNALS if hasattr(signal, s)]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield lambda: got[0] if got else None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(
    task,
    data,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    extend: bool = False,
    callback=None,
) -> BlockModel:
    """Train `task` on `data` block by block; returns the trained BlockModel.

    Args:
        task: e.g. tasks.ImageGeneration(DiTConfig(...)).
        data: the training set (an object with len() and batch(indices)), e.g. data.load_digits("train").
        config: TrainConfig; out_dir=None trains in memory only.
        resume: continue the run in config.out_dir exactly where its last checkpoint left off.
        extend: with resume, train a run further: config.steps_per_block may be larger than the run's. Each
            block's learning rate then follows the warm-up + cosine schedule of the new length from the step
            it has reached (so it rises from the old schedule's end to the new curve's value there); the
            result is not the run that a longer plan from the start would have given.
        callback: called as callback(trainer, block) after every step (e.g. for custom logging).

    Raises Preempted (a KeyboardInterrupt) after saving when SIGTERM or SIGUSR1 arrives, KeyboardInterrupt
    after saving on Ctrl-C, RunInUse when another process trains into the same run folder.
    """
    trainer = Trainer(task, data, config or TrainConfig(), resume=resume, extend=extend, callback=callback)
    return trainer.fit()
