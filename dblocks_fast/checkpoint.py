"""Run folders: one safetensors file per block (weights and AdamW state) and a JSON manifest.

`RunFolder` is the one place that names a run folder's files and writes them: the manifest, the block
files, config.json, cli.json, metrics.jsonl, eval.json, the paged files' folder; `merge_runs` assembles one
run folder from runs that trained disjoint blocks. Everything else asks it.

The manifest is the commit point. A save writes each changed block to a new file named by its step count
(temporary file, fsync, rename), then replaces the manifest the same way, then deletes the block files the
new manifest no longer names. A crash at any point leaves the previous manifest and every file it names
intact. Block files carry a CRC-32 in the manifest, so a damaged file is reported, never silently loaded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
import weakref
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import optim
from .config import RESUME_FREE, TrainConfig

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked (see RunFolder.lock)
    fcntl = None

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "RunFolder",
    "atomic_write",
    "block_state",
    "load_block_state",
    "merge_runs",
    "read_manifest",
    "read_block",
]

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
# 2: the settings under "train" are grouped (config.TrainConfig); 1: flat. This version reads both.
FORMAT = "dblocks_fast.run/2"
_READS = ("dblocks_fast.run/1", FORMAT)


class CheckpointError(RuntimeError):
    """A run folder that cannot be read or written: missing, incomplete or damaged files, no space, in use."""


class DiskFull(CheckpointError):
    """A write ran out of disk space; what it had written is gone and the last good checkpoint stays."""

    def __init__(self, path: Path, need: int):
        self.path, self.need = Path(path), need
        free = _free_bytes(self.path.parent)
        super().__init__(
            f"no space left on the device of {self.path.parent} while writing {self.path.name} "
            f"({_size(need)}; {_size(free)} free now): nothing of it was kept, and the last good "
            f"checkpoint is as it was. Free space there (or move the run folder) and resume with --resume."
        )


class RunInUse(CheckpointError):
    """Another process holds the run folder."""


class NotWritable(CheckpointError):
    """A file of the run folder cannot be written: a read-only filesystem, or no permission."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(
            f"cannot write {self.path}: {reason}. Training, resuming, merging into and evaluating a run need "
            f"its folder writable; nothing in it was changed. Make it writable, or copy the run to a "
            f"writable place and use the copy (sampling reads a read-only run as it is)."
        )


@contextlib.contextmanager
def _writing(path: Path, need: int):
    """Report the OS's refusal of a write to `path` (`need` bytes) as what the user can act on: DiskFull for a
    full disk, NotWritable for a read-only filesystem or a missing permission; other errors pass as they are.
    """
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as e:  # safetensors raises its own error type, with the OS's words
        code, words = getattr(e, "errno", None), str(e)
        if code == errno.ENOSPC or "No space left" in words:
            raise DiskFull(Path(path), need) from e
        if code in (errno.EROFS, errno.EACCES, errno.EPERM) or any(
            w in words for w in ("Read-only file system", "Permission denied")
        ):
            raise NotWritable(Path(path), getattr(e, "strerror", None) or words) from e
        raise


def _size(n: float) -> str:
    """Bytes in the unit that shows them: 2.15 GB, 310.4 MB, 133 kB, 0 bytes (a small run's checkpoint in GB
    would read 0.00)."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 0)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} bytes"


def _free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


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
    with _writing(path, len(data)), _staged(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, scratch=False):
    """Write tensors as safetensors to `path`, atomically as atomic_write does, streamed to disk rather than
    serialized in memory first (that would hold two more copies of a block); returns (size, CRC-32).

    scratch=True (paged blocks, which a crashed run never reads back): no fsync and no CRC (returns None).
    """
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with _writing(path, need), _staged(path, durable=not scratch) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        return None if scratch else file_crc32(Path(tmp))


def atomic_copy(src: Path, dst: Path, expect: tuple[int, int]) -> None:
    """Copy a file to `dst` atomically (streamed), checking the copy's (size, CRC-32) against `expect`."""
    with _writing(dst, expect[0]), _staged(dst) as tmp:
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
    """A block's trained parameters and their AdamW moments as flat named CPU tensors (frozen ones, a LoRA
    block's base weights, are the block builder's: see optim.trained)."""
    out = {}
    for name, p in optim.trained(block):
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
    params = dict(optim.trained(block))
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


class RunFolder:
    """A run folder: what it holds, under which names, and how each file is written (atomically).

    `manifest` is the last manifest read or committed through this object (None before either).
    """

    MANIFEST = MANIFEST  # the commit point: settings, task, layers, schedule, one entry per block
    CONFIG = "config.json"  # the resolved settings, written when training starts
    CLI = "cli.json"  # what the CLI knows that the library does not: the preset and data path
    METRICS = "metrics.jsonl"  # a line per block per log_every of its steps
    EVAL = "eval.json"  # the figures of the last `dblocks-fast eval` or train
    SAMPLES = "samples.png"  # the sample grid that eval writes for image models
    CLASSIFIER = "classifier.safetensors"  # the digits judge, cached with the data it was trained on
    BLOCKS = "blocks"  # block files: blocks/block{b:03d}-step{steps:09d}.safetensors
    PAGED = "paged"  # offload="disk": the scratch files of paged blocks (one folder per rank)
    LOCK = ".lock"  # flock'ed by the process that trains into the folder; holds its pid and host

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest: dict | None = None
        self._lock_fd: int | None = None

    # --- one training at a time ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder for this process until `unlock` (or exit: the OS drops the lock of a process that
        dies, so a crashed run never blocks its resumption). A second process gets RunInUse, naming the
        holder: two trainings into one folder would overwrite each other's checkpoints. On filesystems
        without flock (some network mounts) this lock is advisory at best."""
        if self._lock_fd is not None or fcntl is None:
            return
        with _writing(self.path / self.LOCK, 0):  # a read-only run folder: say so before anything else
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(
                f"{self.path} is in use by {holder}: two trainings into one run folder would overwrite each "
                f"other's checkpoints. Wait for that run to end (or stop it), or train into another --out."
            ) from None
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError):  # who holds it is for messages only; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {when})\n".encode())
        self._lock_fd = fd
        self._lock_finalizer = weakref.finalize(self, os.close, fd)

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_fd is not None

    def unlock(self) -> None:
        """Release the folder (closing the lock file drops the lock)."""
        if self._lock_fd is not None:
            self._lock_finalizer()
            self._lock_fd = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def holds_run(self) -> bool:
        """Whether a checkpoint has been committed here."""
        return (self.path / MANIFEST).exists()

    def paged_folder(self, rank: int | None = None) -> Path:
        """Where offload="disk" keeps its scratch files; a folder per rank under torchrun (the ranks of a
        data-parallel group hold the same blocks)."""
        return self.path / self.PAGED / (f"rank{rank}" if rank is not None else "")

    # --- reading ------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        """The run's manifest, with errors that say what is wrong and what to do."""
        path = self.path / MANIFEST
        if not self.path.is_dir():
            raise CheckpointError(f"run folder {self.path} does not exist")
        if not path.is_file():
            raise CheckpointError(
                f"{self.path} has no {MANIFEST}: it holds no finished checkpoint (was training stopped "
                f"before the first save?). Train into it without --resume to start afresh."
            )
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path} is damaged ({e}); restore it from a backup or start a new run"
            ) from e
        if manifest.get("format") not in _READS:
            raise CheckpointError(
                f"{path}: format {manifest.get('format')!r}; this version reads "
                f"{' and '.join(map(repr, _READS))}: use the version of dblocks_fast that wrote it"
            )
        self.manifest = manifest
        return manifest

    def read_block(self, b: int, manifest: dict | None = None) -> dict[str, torch.Tensor]:
        """Block b's tensors, checked against the manifest's size and CRC-32 (default: the last manifest)."""
        manifest = manifest or self.manifest or self.read_manifest()
        entry = manifest["blocks"][b]
        if not entry.get("file"):
            raise CheckpointError(
                f"block {b} has no checkpoint in {self.path}: it was not trained there (a run with "
                f"--only-blocks, or one stopped before the first save). Train it, or merge the run that "
                f"trained it: dblocks-fast merge RUN_A RUN_B ... --out RUN"
            )
        path = self.path / entry["file"]
        if not path.is_file():
            raise CheckpointError(
                f"block {b}'s checkpoint {path} is missing; the run folder is incomplete. Restore the file, "
                f"or start a new run."
            )
        if file_crc32(path) != (entry["bytes"], entry["crc32"]):
            raise CheckpointError(
                f"block {b}'s checkpoint {path} is corrupt (size or CRC-32 differs from the manifest); "
                f"restore the file from a backup, or start a new run."
            )
        return load_file(path)

    def read_json(self, name: str) -> dict | None:
        """One of the run's JSON files (CONFIG, CLI, EVAL), or None if it has none."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    # --- writing ------------------------------------------------------------------------------------------
    def write_json(self, name: str, info: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / name, json.dumps(info, indent=1).encode())

    def write_config(self, config: TrainConfig, task: dict, layers: list[int], data: str) -> None:
        """config.json: the resolved settings, written when training starts (before any checkpoint)."""
        info = {"train": asdict(config), "task": task, "layers": layers, "data": data, "versions": versions()}
        self.write_json(self.CONFIG, info)

    def write_block(self, b: int, steps: int, tensors: dict[str, torch.Tensor]) -> dict:
        """Write block b's tensors to a new file named by its step count; returns its manifest entry."""
        (self.path / self.BLOCKS).mkdir(parents=True, exist_ok=True)
        rel = f"{self.BLOCKS}/block{b:03d}-step{steps:09d}.safetensors"
        # one metadata key: safetensors writes its metadata map in a random order, and the same training
        # must write the same bytes
        meta = {"dblocks_fast": json.dumps({"block": b, "steps": steps}, sort_keys=True)}
        size, crc = atomic_save(self.path / rel, tensors, metadata=meta)
        return {"steps": steps, "file": rel, "bytes": size, "crc32": crc}

    @staticmethod
    def new_manifest(
        config: TrainConfig, task: dict, layers: list[int], schedule: dict, blocks: list
    ) -> dict:
        """The manifest of a run whose blocks are `blocks` (one entry each, as `write_block` returns)."""
        return {
            "train": asdict(config),
            "task": task,
            "layers": layers,
            "schedule": schedule,
            "blocks": blocks,
            "complete": all(e["steps"] == config.steps_per_block for e in blocks),
            # every random draw is a function of (seed, stream, block, step): the steps are the whole state
            "rng": {"kind": "counter", "seed": config.seed, "key": "(seed, stream, block, step)"},
            "versions": versions(),
        }

    def check_space(self, need: int) -> None:
        """Refuse a checkpoint of `need` bytes before writing any of it, with the numbers (the new block files
        are written beside the old ones, which go only once the new manifest is in place)."""
        free = _free_bytes(self.path)
        margin = 16 << 20  # the manifest, metrics lines and the filesystem's own rounding
        if need + margin > free:
            raise CheckpointError(
                f"not enough disk space for a checkpoint in {self.path}: it needs {_size(need)} (and "
                f"{_size(margin)} to spare), {_size(free)} are free. Nothing was written; the last good "
                f"checkpoint stays. Free {_size(need + margin - free)} there (or move the run folder) and "
                f"resume with --resume."
            )

    def remove_unnamed(self, manifest: dict | None = None, keep=()) -> None:
        """Delete block files that the manifest does not name, and the temporary files of writes a crash cut
        short: in blocks/ and beside the manifest (the paged folders' are the disk tier's to clear)."""
        manifest = manifest or self.manifest
        named = {e["file"] for e in manifest["blocks"] if e.get("file")} | set(keep)
        for f in self.path.glob(".*.tmp"):  # _staged's: .manifest.json.*.tmp, .metrics.jsonl.*.tmp, ...
            f.unlink(missing_ok=True)
        folder = self.path / self.BLOCKS
        if not folder.is_dir():
            return
        for f in folder.iterdir():
            rel = f"{self.BLOCKS}/{f.name}"
            stale = f.name.endswith(".tmp") or (f.name.startswith("block") and rel not in named)
            if f.is_file() and stale:
                f.unlink(missing_ok=True)

    def discard(self, files: list[str]) -> None:
        """Delete block files written for a checkpoint that did not commit (never one the manifest names)."""
        named = {e["file"] for e in self.manifest["blocks"] if e.get("file")} if self.manifest else set()
        for rel in files:
            if rel not in named:
                (self.path / rel).unlink(missing_ok=True)

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (the commit point), then delete the block files it no longer names."""
        manifest = {**manifest, "format": FORMAT}
        named = {e["file"] for e in manifest["blocks"] if e.get("file")}
        missing = sorted(f for f in named if not (self.path / f).is_file())
        if missing:
            raise CheckpointError(
                f"{self.path}: block files {missing[:3]} are not there, so the manifest was not written "
                f"(the previous checkpoint stays). With several processes or machines the run folder must be "
                f"on a filesystem they all share; otherwise train with --only-blocks per machine and merge "
                f"the runs."
            )
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        self.manifest = manifest
        self.remove_unnamed(manifest)
        return manifest

    # --- metrics ------------------------------------------------------------------------------------------
    def append_metrics(self, rec: dict) -> None:
        line = json.dumps(rec) + "\n"
        path = self.path / self.METRICS
        with _writing(path, len(line)), open(path, "a") as f:  # one short append a line: no interleaving
            f.write(line)

    def metrics(self, blocks=None) -> list[str]:
        """The metric lines (of `blocks` only, if given), each ending in a newline; cut lines are skipped."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        keep = []
        for ln in path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if blocks is None or rec.get("block") in blocks:
                keep.append(ln + "\n")
        return keep

    def trim_metrics(self, steps: list[int]) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
        path = self.path / self.METRICS
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
            atomic_write(path, "".join(keep).encode())

    # --- resuming -----------------------------------------------------------------------------------------
    def resume(self, now: dict, extend: bool = False) -> list[int]:
        """Check that this run can be continued with the manifest `now` would write (RunFolder.new_manifest
        of the current settings) and return the block steps it holds. Settings in config.RESUME_FREE may
        differ; anything else that differs is an error that lists the differences. extend=True allows a
        larger steps_per_block (training a finished run further)."""
        manifest = self.read_manifest()
        saved, wanted = comparable(manifest), comparable(now)
        old_spb, spb = saved["train"]["steps_per_block"], wanted["train"]["steps_per_block"]
        if extend and spb < old_spb:
            raise ValueError(
                f"cannot extend {self.path} to {spb} steps a block: it was planned for {old_spb}, and steps "
                f"already taken cannot be undone"
            )
        if extend:
            saved["train"]["steps_per_block"] = spb
        diff = _differences(saved, wanted)
        if diff:
            lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diff)
            more = (
                " To train a run further, pass extend=True (--extend) with the larger steps_per_block."
                if any(k == "train.steps_per_block" for k, _, _ in diff) and spb > old_spb
                else ""
            )
            raise ValueError(
                f"cannot resume {self.path}: the configuration differs ({lines}). Use the saved values.{more}"
            )
        steps = [e["steps"] for e in manifest["blocks"]]
        num_blocks = len(now["blocks"])
        if len(steps) != num_blocks or not all(0 <= n <= spb for n in steps):
            raise CheckpointError(
                f"{self.path}: block steps {steps} do not fit {num_blocks} blocks of {spb} steps"
            )
        return steps


def versions() -> dict:
    from . import __version__

    return {"dblocks_fast": __version__, "torch": torch.__version__}


def comparable(manifest: dict) -> dict:
    """What must be equal for two runs' blocks to belong to one model: every setting but RESUME_FREE's
    (flat, whatever the format that wrote it), the task and the layers. The noise process is not compared
    on its own: the task makes it from the settings (and older runs recorded an EDM schedule even for the
    masked-diffusion LM, whose process is its masking)."""
    train = TrainConfig.from_dict(manifest["train"]).flat()
    return {
        "train": {k: v for k, v in train.items() if k not in RESUME_FREE},
        "task": manifest["task"],
        "layers": manifest["layers"],
    }


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) for every leaf where two nested dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((f"{prefix}{k}", va, vb))
    return out


def merge_runs(runs, out: str | os.PathLike) -> dict:
    """Assemble one run folder at `out` from runs that trained disjoint sets of blocks.

    Each block must have been trained (taken at least one step) in exactly one of `runs`, and the runs must
    agree on everything that determines a block's numbers (task, layers, schedule, seed, optimizer settings).
    The result is the run folder a single run of all blocks would have written: every tensor equal bit for
    bit. Nothing is written at `out` unless every check passes; the manifest is written last. Runs written
    by older versions (format 1) merge too; the result is in the current format.

    `out` must be new or empty, or hold what the same merge wrote: one stopped before its end (a crash, a
    kill) left no manifest, and is started over; one that finished is found done (nothing is copied).
    """
    runs = [RunFolder(r) for r in runs]
    if len(runs) < 1:
        raise ValueError("merge needs at least one run folder")
    if len({r.path.resolve() for r in runs}) != len(runs):
        raise ValueError("a run folder is named twice")
    out = RunFolder(out)
    done = _merged_before(out, runs)
    manifests = [r.read_manifest() for r in runs]
    ref = comparable(manifests[0])
    for r, m in zip(runs[1:], manifests[1:]):
        diff = _differences(ref, comparable(m))
        if diff:
            listed = "; ".join(f"{k} ({a!r} vs {b!r})" for k, a, b in diff[:6])
            raise ValueError(
                f"{runs[0]} and {r} were trained with different settings, so their blocks do not belong to "
                f"one model: {listed}"
            )
    num_blocks = len(manifests[0]["blocks"])
    owner: dict[int, int] = {}
    for b in range(num_blocks):
        trained = [i for i, m in enumerate(manifests) if m["blocks"][b].get("steps", 0) > 0]
        if not trained:
            raise ValueError(
                f"block {b} was trained in none of {', '.join(map(str, runs))}: train it with "
                f"--only-blocks {b} (same settings) and merge that run too"
            )
        if len(trained) > 1:
            names = " and ".join(str(runs[i]) for i in trained)
            raise ValueError(f"block {b} was trained in both {names}; keep it in one run only")
        owner[b] = trained[0]
    # check every block file before writing anything
    payload = {}
    for b, i in owner.items():
        entry = manifests[i]["blocks"][b]
        path = runs[i] / entry["file"]
        if not path.is_file() or file_crc32(path) != (entry["bytes"], entry["crc32"]):
            raise CheckpointError(
                f"block {b}'s checkpoint {path} is missing or corrupt (size or CRC-32 differs from the "
                f"manifest); restore it, or train the block again"
            )
        payload[b] = (entry, path)
    out.lock()  # a training or another merge into `out` meanwhile would mix two runs' files
    try:
        if done is None:
            return _write_merge(out, runs, manifests, owner, payload)
        if any(done["blocks"][b] != entry for b, (entry, _) in payload.items()):
            raise FileExistsError(
                f"{out} holds a merge of these runs, but their blocks have changed since; merge into a new "
                f"folder"
            )
        out.remove_unnamed(done)  # what a merge stopped right after its manifest left
        return done
    finally:
        out.unlock()


# what a merge writes into its folder (besides temporary files): a folder without a manifest that holds
# nothing else is a merge that was stopped before its end
_MERGE_WRITES = {RunFolder.BLOCKS, RunFolder.CONFIG, RunFolder.CLI, RunFolder.METRICS, RunFolder.LOCK}


def _merged_before(out: RunFolder, runs: list[RunFolder]) -> dict | None:
    """Whether a merge of `runs` may write into `out`: the manifest of the same merge finished there before,
    or None for a new or empty folder or one the same merge was stopped in; FileExistsError otherwise."""
    if not out.path.is_dir():
        return None
    if out.holds_run():
        manifest = out.read_manifest()
        if manifest.get("merged_from") == [str(r.path.resolve()) for r in runs]:
            return manifest
        raise FileExistsError(f"{out} already holds a run; merge into a new folder")
    found = [p.name for p in out.path.iterdir()]
    if (out / RunFolder.BLOCKS).is_dir():
        found += [f"{RunFolder.BLOCKS}/{p.name}" for p in (out / RunFolder.BLOCKS).iterdir()]

    def merge_wrote(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".") and name.endswith(".tmp"):  # _staged's temporary files
            return True
        if rel.startswith(f"{RunFolder.BLOCKS}/"):
            return name.startswith("block") and name.endswith(".safetensors")
        return rel in _MERGE_WRITES

    odd = sorted(f for f in found if not merge_wrote(f))
    if odd:
        raise FileExistsError(
            f"{out} is not empty: it holds {', '.join(odd[:3])}, which a merge does not write; merge into a "
            f"new or empty folder"
        )
    return None


def _write_merge(out: RunFolder, runs, manifests, owner: dict[int, int], payload: dict) -> dict:
    """Copy each block's file from the run that trained it, then config.json, cli.json and the metric lines,
    then the manifest (the commit); files a stopped merge left are replaced or, at the commit, removed."""
    num_blocks = len(manifests[0]["blocks"])
    (out / RunFolder.BLOCKS).mkdir(parents=True, exist_ok=True)
    blocks = []
    for b in range(num_blocks):
        entry, src = payload[b]
        atomic_copy(src, out / entry["file"], (entry["bytes"], entry["crc32"]))
        blocks.append(dict(entry))
    first = manifests[0]
    config = TrainConfig.from_dict(first["train"])
    config.only_blocks, config.io.out_dir = None, str(out)
    manifest = {
        **first,
        **RunFolder.new_manifest(config, first["task"], first["layers"], first["schedule"], blocks),
        "versions": first.get("versions"),
        "merged_from": [str(r.path.resolve()) for r in runs],
    }
    for name in (RunFolder.CONFIG, RunFolder.CLI):
        info = next((i for i in (r.read_json(name) for r in runs) if i is not None), None)
        if info is not None:
            if name == RunFolder.CONFIG:
                info["train"] = asdict(config)
            out.write_json(name, info)
    lines = [ln for b, i in owner.items() for ln in runs[i].metrics(blocks={b})]
    if lines:
        atomic_write(out / RunFolder.METRICS, "".join(lines).encode())
    else:
        (out / RunFolder.METRICS).unlink(missing_ok=True)
    return out.commit(manifest)


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The manifest of the run folder `run_dir` (RunFolder.read_manifest)."""
    return RunFolder(run_dir).read_manifest()


def read_block(run_dir: str | os.PathLike, manifest: dict, b: int) -> dict[str, torch.Tensor]:
    """Block b's tensors from the run folder `run_dir`, checked against `manifest` (RunFolder.read_block)."""
    return RunFolder(run_dir).read_block(b, manifest)
