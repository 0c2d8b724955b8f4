"""Where a run's figures go beside metrics.jsonl: TensorBoard (torch.utils.tensorboard) or wandb.

`open_logger(kind, run_dir)` gives a `Logger` for TrainConfig.io.log ("none" gives None). The trainer sends
every metric line through `train_scalars` (per-block loss, gradient norm, learning rate and noise interval
at the block's step; steps/s, samples/s and peak memory at the process's step); the CLI sends the sample grid
and the scores of an evaluation. metrics.jsonl stays the record that resuming and comparing runs read; these
are views of it for people.
"""

from __future__ import annotations

import os
import resource
import sys
import zlib
from pathlib import Path

import numpy as np

from .config import LOGGERS

__all__ = ["LOGGERS", "TENSORBOARD_DIR", "Logger", "check_logger", "open_logger", "train_scalars"]

TENSORBOARD_DIR = "tensorboard"  # in the run folder: `tensorboard --logdir RUN/tensorboard`


class Logger:
    """One run's destination for scalars and images."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: (H, W, C) floats in [0, 1], C = 1 or 3."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardLogger(Logger):
    """Event files in RUN/tensorboard (one file a process and start, as SummaryWriter names them)."""

    def __init__(self, run_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ValueError(
                f"log='tensorboard' (--log tensorboard) needs the tensorboard package: pip install "
                f"tensorboard (or pip install 'dblocks-fast[logging]'); {e}"
            ) from None
        self.folder = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, np.ascontiguousarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A wandb run in RUN/wandb, offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later).

    The wandb run's id is derived from the run folder's path, so a resumed run continues the same one."""

    def __init__(self, run_dir: str | os.PathLike, config: dict | None = None):
        try:
            import wandb
        except ImportError:
            raise ValueError("log='wandb' (--log wandb) needs the wandb package: pip install wandb") from None
        path = Path(run_dir).resolve()
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dblocks-fast"),
            name=path.name,
            id=f"dblocks-{zlib.crc32(str(path).encode()):08x}",
            resume="allow",
            dir=str(path),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config or {},
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        # wandb's own step must only grow, and a block's step does not across blocks: give it as a field
        self.run.log({**values, "step": step})

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        picture = self.wandb.Image(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        self.run.log({tag: picture, "step": step})

    def close(self) -> None:
        self.run.finish()


def check_logger(kind: str) -> None:
    """Raise ValueError, saying what to install, if the package that `kind` needs is missing (the trainer
    calls it before it writes anything)."""
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"log='tensorboard' (--log tensorboard) needs the tensorboard package: pip install "
                f"tensorboard (or pip install 'dblocks-fast[logging]'); {e}"
            ) from None
    elif kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("log='wandb' (--log wandb) needs the wandb package: pip install wandb") from None


def open_logger(kind: str, run_dir: str | os.PathLike, config: dict | None = None) -> Logger | None:
    """The logger of TrainConfig.io.log `kind` writing into the run folder; None for "none"."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir)
    if kind == "wandb":
        return WandbLogger(run_dir, config)
    raise ValueError(f"log must be one of {LOGGERS}, got {kind!r}")


def peak_host_bytes() -> int:
    """This process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def train_scalars(rec: dict, batch_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """(the block's scalars, the process's) of a metric line: the block's at its own step, tagged
    block<b>/...; steps/s, samples/s (of the block's whole batch) and peak memory (the device's since the
    last line on CUDA, the process's resident peak otherwise)."""
    b = rec["block"]
    block = {f"block{b}/{k}": float(rec[k]) for k in ("loss", "grad_norm", "lr", "sigma_lo", "sigma_hi")}
    steps_per_s = 1000.0 / rec["step_ms"] if rec["step_ms"] > 0 else 0.0
    process = {"speed/steps_per_s": steps_per_s, "speed/samples_per_s": steps_per_s * batch_size}
    if "peak_mem_bytes" in rec:
        process["memory/peak_device_bytes"] = float(rec["peak_mem_bytes"])
    else:
        process["memory/peak_host_bytes"] = float(peak_host_bytes())
    return block, process
