"""What every benchmark result records: device, versions, commit, date and the command that made it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + " CPU"
    except OSError:
        pass
    return f"{platform.machine()} CPU"


def provenance(device: torch.device) -> dict:
    import dblocks_fast

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parent,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=RESULTS.parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        # a copy of the tree without .git (a lent GPU machine): gpu_session.py passes the commit in
        commit, dirty = os.environ.get("DBLOCKS_COMMIT", "unknown"), False
    return {
        "device": device_name(device),
        "device_type": device.type,
        "versions": {
            "dblocks_fast": dblocks_fast.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "commit": commit + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def write(name: str, prov: dict, record: dict, markdown: str, out: Path = RESULTS) -> Path:
    """results/<name>-<device type>.json and .md; the JSON holds everything, the markdown the table.

    prov: provenance() taken when the benchmark started, so the commit is the code that was measured.
    """
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{prov['device_type']}"
    Path(f"{stem}.json").write_text(json.dumps({"benchmark": name, **prov, **record}, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown)
    return Path(f"{stem}.json")


def figure(width: float = 4.5, height: float = 3.2, ncols: int = 1):
    """A matplotlib (figure, axes) drawn off-screen, for a benchmark's PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=120)


def save_figure(fig, name: str, prov: dict, out: Path = RESULTS) -> Path:
    """results/<name>-<device type>.png, beside the JSON and markdown of the same run."""
    import matplotlib.pyplot as plt

    path = Path(out) / f"{name}-{prov['device_type']}.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def header(title: str, prov: dict, quick: bool) -> list[str]:
    """The first lines of a benchmark's markdown: what, where, when, and the command."""
    return [
        f"# {title}",
        "",
        f"{prov['device']}; torch {prov['versions']['torch']}; commit {prov['commit']}; {prov['date']}",
        f"`{prov['command']}`" + ("  (--quick: a pipeline check, not a measurement)" * quick),
        "",
    ]


def partial(record: dict) -> list[str]:
    """The line a record written before its run finished starts its table with (none when complete)."""
    return [] if record.get("complete", True) else ["**Partial**: the run stopped after these rows.", ""]


def markdown(title: str, prov: dict, record: dict, table: list[str]) -> str:
    """A benchmark's markdown file: header(), a partial run said as such, then its table."""
    return "\n".join(header(title, prov, record.get("quick", False)) + partial(record) + table) + "\n"


def speedup_plot(series: dict, xlabel: str, ylabel: str, title: str, name: str, prov: dict, out: Path,
                 cores: int | None = None) -> Path:  # fmt: skip
    """Speed-up against a count (blocks, processes), one line per series, with the ideal y = x."""
    fig, ax = figure()
    xs = sorted({x for pts in series.values() for x, _ in pts})
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=label)
    ax.plot(xs, xs, "--", color="grey", label="ideal")
    if cores is not None:
        ax.axvline(cores, color="red", lw=0.8, ls=":", label=f"{cores} cores")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, name, prov, out)


def pending_figure(name: str, prov: dict, out: Path = RESULTS) -> Path:
    """The PNG of a GPU benchmark that ran without CUDA: it says the figures are pending, and why."""
    fig, ax = figure(6, 3.2)
    ax.text(0.5, 0.5, "GPU figures pending:\nno CUDA device where this ran", ha="center", va="center")
    ax.set_axis_off()
    return save_figure(fig, name, prov, out)
