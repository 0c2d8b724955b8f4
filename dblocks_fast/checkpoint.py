"""Run folders: one safetensors file per block (weights and AdamW state) and a JSON manifest.

The manifest is the commit point. A save writes each changed block to a new file named by its step count
(temporary file, fsync, rename), then replaces the manifest the same way, then deletes the block files the
new manifest no longer names. A crash at any point leaves the previous manifest and every file it names
intact. Block files carry a CRC-32 in the manifest, so a damaged file is reported, never silently loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "atomic_write",
    "block_state",
    "load_block_state",
    "save_blocks",
    "write_block",
    "commit",
    "read_manifest",
    "read_block",
]

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
FORMAT = "dblocks_fast.run/1"


class CheckpointError(RuntimeError):
    """A run folder that cannot be read: missing, incomplete or damaged files."""


@contextlib.contextmanager
def _staged(path: Path, durable: bool = True):
    """Yield a temporary file name beside `path`; once the body has filled it, fsync it, give it the
    permissions open() would, and rename it over `path` (then fsync the folder). On any error the temporary
    file goes and `path` is untouched: readers see the old file or the new one, never a part of either.
    durable=False skips the fsyncs: still atomic for this machine's readers, but a power cut may lose the
    file (for scratch files that a crashed run does not read again)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part of either."""
    with _staged(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, scratch=False):
    """Write tensors as safetensors to `path`, atomically as atomic_write does, streamed to disk rather than
    serialized in memory first (that would hold two more copies of a block); returns (size, CRC-32).

    scratch=True (paged blocks, which a crashed run never reads back): no fsync and no CRC (returns None).
    """
    with _staged(path, durable=not scratch) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        result = None if scratch else file_crc32(Path(tmp))
    return result


def atomic_copy(src: Path, dst: Path, expect: tuple[int, int]) -> None:
    """Copy a file to `dst` atomically (streamed), checking the copy's (size, CRC-32) against `expect`."""
    with _staged(dst) as tmp:
        shutil.copyfile(src, tmp)
        if file_crc32(Path(tmp)) != tuple(expect):
            raise CheckpointError(f"{src} does not match its manifest (size or CRC-32): changed or damaged")


def file_crc32(path: Path, chunk: int = 1 << 24) -> tuple[int, int]:
    """(size, CRC-32) of a file, read in chunks so a large block never sits in memory twice."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            crc, size = zlib.crc32(data, crc), size + len(data)
    return size, crc


def block_state(block: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """A block's parameters and AdamW moments as flat named CPU tensors."""
    out = {}
    for name, p in block.named_parameters():
        out[f"param/{name}"] = p.detach().cpu()
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"{key}/{name}"] = state[key].detach().cpu()
    return out


def load_block_state(
    block: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 0,
) -> None:
    """The inverse of `block_state`: copy the weights in place, and with `optimizer` its moments and step."""
    params = dict(block.named_parameters())
    want = {f"param/{n}" for n in params}
    have = {k for k in tensors if k.startswith("param/")}
    if want != have:
        missing, extra = sorted(want - have)[:3], sorted(have - want)[:3]
        raise CheckpointError(
            f"the checkpoint does not match the model (missing {missing}, unexpected {extra}); "
            f"was it written "
            f"by a different model configuration?"
        )
    with torch.no_grad():
        for name, p in params.items():
            src = tensors[f"param/{name}"]
            if src.shape != p.shape:
                raise CheckpointError(
                    f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(p.shape)}"
                )
            p.copy_(src)
            if optimizer is not None and f"exp_avg/{name}" in tensors:
                state = optimizer.state[p]
                # the step is a float tensor on the CPU, as torch.optim.AdamW keeps it (capturable=False)
                state["step"] = torch.tensor(float(steps))
                for key in ("exp_avg", "exp_avg_sq"):
                    src = tensors[f"{key}/{name}"]
                    if key in state and state[key].shape == src.shape:
                        state[key].copy_(src)  # in place: the moments may be views of a flat buffer (optim)
                    else:
                        state[key] = src.to(p.device).clone()


def write_block(run_dir: Path, b: int, steps: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write block b's tensors to a new file named by its step count; returns its manifest entry."""
    run_dir = Path(run_dir)
    (run_dir / "blocks").mkdir(parents=True, exist_ok=True)
    rel = f"blocks/block{b:03d}-step{steps:09d}.safetensors"
    size, crc = atomic_save(run_dir / rel, tensors, metadata={"block": str(b), "steps": str(steps)})
    return {"steps": steps, "file": rel, "bytes": size, "crc32": crc}


def commit(run_dir: Path, manifest: dict) -> dict:
    """Write the manifest (the commit point), then delete the block files it no longer names."""
    run_dir = Path(run_dir)
    manifest = {**manifest, "format": FORMAT}
    named = {e["file"] for e in manifest["blocks"] if e.get("file")}
    missing = sorted(f for f in named if not (run_dir / f).is_file())
    if missing:
        raise CheckpointError(
            f"{run_dir}: block files {missing[:3]} are not there, so the manifest was not written (the "
            f"previous checkpoint stays). With several processes or machines the run folder must be on a "
            f"filesystem they all share; otherwise train with --only-blocks per machine and merge the runs."
        )
    atomic_write(run_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    if (run_dir / "blocks").is_dir():
        for f in (run_dir / "blocks").glob("block*.safetensors"):
            if f"blocks/{f.name}" not in named:
                f.unlink()
    return manifest


def save_blocks(run_dir: Path, manifest: dict, changed: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Write the changed blocks, then the manifest (the commit), then drop block files no longer named.

    manifest["blocks"][b] must hold "steps"; this fills in "file", "bytes" and "crc32" for changed blocks and
    keeps the previous entries of the others. Returns the manifest as written.
    """
    for b, tensors in sorted(changed.items()):
        entry = manifest["blocks"][b]
        entry.update(write_block(run_dir, b, entry["steps"], tensors))
    return commit(run_dir, manifest)


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The run's manifest, with errors that say what is wrong and what to do."""
    path = Path(run_dir) / MANIFEST
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir} has no {MANIFEST}: it holds no finished checkpoint (was training stopped before the "
            f"first save?). Train into it without --resume to start afresh."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); restore it from a backup or start a new run") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest


def read_block(run_dir: str | os.PathLike, manifest: dict, b: int) -> dict[str, torch.Tensor]:
    """Block b's tensors, checked against the manifest's size and CRC-32."""
    entry = manifest["blocks"][b]
    if not entry.get("file"):
        raise CheckpointError(
            f"block {b} has no checkpoint in {run_dir}: it was not trained there (a run with --only-blocks, "
            f"or one stopped before the first save). Train it, or merge the run that trained it: "
            f"dblocks-fast merge RUN_A RUN_B ... --out RUN"
        )
    path = Path(run_dir) / entry["file"]
    if not path.is_file():
        raise CheckpointError(
            f"block {b}'s checkpoint {path} is missing; the run folder is incomplete. "
            f"Restore the file, or start "
            f"a new run."
        )
    if file_crc32(path) != (entry["bytes"], entry["crc32"]):
        raise CheckpointError(
            f"block {b}'s checkpoint {path} is corrupt (size or CRC-32 differs from the manifest); "
            f"restore the "
            f"file from a backup, or start a new run."
        )
    return load_file(path)
