"""The torch device a setting names, checked before anything runs on it or is written for it.

One place for "auto", "cpu", "cuda", "cuda:N": the trainer (through distributed.connect) and `load` both
resolve `device` here, so a device this machine does not have is one ValueError that says what to use
instead, not a traceback from deep inside torch at the first step.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICES_HELP", "resolve"]

DEVICES_HELP = "auto, cpu, cuda or cuda:N"  # what --device accepts, for messages and --help


def resolve(name: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The device `name` names on this machine.

    Args:
        name: "auto" or None (cuda if available, else cpu), "cpu", "cuda", "cuda:N", or any other torch
            device this machine has (e.g. "mps").
        local_rank: under torchrun, this process's local rank: "auto" and a bare "cuda" become
            cuda:local_rank.
    Returns:
        The torch.device. Raises ValueError for a string that names no device and for a device that this
        machine (or this build of torch) does not have.
    """
    if name is None or name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {name!r} is not a device; use {DEVICES_HELP}") from None
    if dev.type == "cuda":
        return _cuda(dev, name, local_rank)
    backend = getattr(torch, dev.type, None)  # torch.mps, torch.xpu, ... say whether they are there
    if dev.type not in ("cpu", "meta") and not getattr(backend, "is_available", lambda: True)():
        raise ValueError(f"device {name!r} is not available on this machine; use {DEVICES_HELP}")
    return dev


def _cuda(dev: torch.device, name, local_rank: int | None) -> torch.device:
    if not torch.cuda.is_available():
        why = "this build of torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device {name!r} was requested but CUDA is not available ({why}); use --device cpu")
    if dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        if local_rank is not None:  # torchrun started more processes on this node than it has GPUs
            raise ValueError(
                f"this process wants GPU {dev.index} but the machine has {count}: start at most {count} "
                f"processes per node (torchrun --nproc-per-node), or train on CPU processes with --device cpu"
            )
        raise ValueError(
            f"device {name!r} was requested but this machine has {count} GPU{'s' if count > 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); use one of those, or cuda"
        )
    return dev
