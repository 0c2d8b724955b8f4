"""What is the largest DiT I can train on my GPU? Found by trying: end to end against 8 blocks paged to host
memory or to disk, on the whole GPU and under memory caps of 12, 16 and 24 GB (the cards most users own).

    python benchmarks/bench_capacity.py                          # needs CUDA; tens of minutes
    python benchmarks/bench_capacity.py --budget 500             # what 500 s decide, whole GPU first
    python benchmarks/bench_capacity.py --caps 24 --modes disk   # one cell
    python benchmarks/bench_capacity.py --quick                  # small ladder, whole GPU only

Each try is its own process: build a DiT of 24 layers and the given width (latents 32x32x4, patch 2, batch 8,
fp32 weights and AdamW state) and take one optimizer step of every block. A try succeeds when the steps
finish; it fails on a CUDA out-of-memory error, or when the preflight refuses the tier (host memory or disk
too small, or the process killed for host memory), and the record says which. The final checkpoint is not
written: a try measures training, and a 5B-parameter run's checkpoint would fill the disk. Each (cap, mode)
cell bisects the width ladder; under a smaller cap nothing larger than what fitted a larger one is tried.
The cap is torch.cuda.set_per_process_memory_fraction. Without CUDA nothing can be tried, and the record
says so.

Writes results/bench_capacity-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = [512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 5120, 6144]  # heads: width / 128 (or 64)
DEPTH = 24
MODES = {"end-to-end": (1, "none"), "host": (8, "host"), "disk": (8, "disk")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", type=float, nargs="+", default=[0, 24, 16, 12], help="GB; 0 = the whole GPU")
    ap.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    ap.add_argument("--timeout", type=float, default=900, help="seconds one try may take")
    budget = "seconds for the whole search (0: none); cells left undecided say so"
    ap.add_argument("--budget", type=float, default=0, help=budget)
    ap.add_argument("--quick", action="store_true", help="widths up to 1536, whole GPU only")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _config(width: int) -> dict:
    heads = width // 128 if width >= 1024 else width // 64
    return dict(
        image_size=32, channels=4, num_classes=1000, hidden=width, heads=heads, num_layers=DEPTH, patch_size=2
    )


def worker(spec: dict) -> dict:
    import dblocks_fast as dbf
    from dblocks_fast.data import ImageData
    from dblocks_fast.tasks import DiTConfig, ImageGeneration

    device = torch.device("cuda")
    if spec["cap_gb"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1e9 / total), device)
    m = _config(spec["width"])
    gen = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.rand(32, 4, 32, 32, generator=gen) * 2 - 1,
        torch.randint(0, 1000, (32,), generator=gen),
        1000,
        "random",
    )
    blocks, offload = MODES[spec["mode"]]
    cfg = dbf.TrainConfig(
        num_blocks=blocks,
        steps_per_block=1,
        batch_size=8,
        warmup=1,
        schedule="sequential",
        offload=offload,
        device="cuda",
        out_dir=spec["out_dir"],
        ckpt_every=0,
        progress=False,
    )
    try:
        trainer = dbf.Trainer(ImageGeneration(DiTConfig(**m)), data, cfg)
        params = sum(p.numel() for b in trainer.model.blocks for p in b.parameters())
        trainer.save = lambda: None  # a try measures training: a 5B model's checkpoint would fill the disk
        trainer.fit()
    except torch.OutOfMemoryError as e:
        return {"ok": False, "why": f"CUDA out of memory: {str(e).splitlines()[0][:200]}"}
    except MemoryError as e:  # the preflight refused the tier
        return {"ok": False, "why": f"preflight: {str(e)[:300]}"}
    return {"ok": True, "params": params, "peak_device_bytes": torch.cuda.max_memory_allocated(device)}


def _try(mode: str, width: int, cap: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"mode": mode, "width": width, "cap_gb": cap, "out_dir": str(Path(tmp) / "run")}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": f"took over {timeout:.0f} s", "seconds": timeout, "timed_out": True}
        out = {"seconds": time.perf_counter() - t0}
        lines = res.stdout.strip().splitlines()
        if res.returncode == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            return {**out, "ok": False, "why": "host out of memory: the try was killed (SIGKILL)"}
        if res.returncode != 0 or not lines:
            return {**out, "ok": False, "why": f"exit {res.returncode}: {res.stderr.strip()[-300:]}"}
        return {**out, **json.loads(lines[-1])}


def search(attempt, widths: list[int], caps: list[float], modes: list[str]) -> tuple[list[dict], list[dict]]:
    """The largest width of the ladder that trains, for every (cap, mode): (cells, tries).

    attempt(mode, cap, width) -> the try's record, or None when the time budget is spent. Memory grows with
    the width, so each cell is a bisection of the ladder: about 4 tries instead of up to 11. Under a smaller
    cap nothing larger than what fitted a larger one is tried. The whole GPU comes first, then the caps from
    the largest down, so a time budget cuts the least asked-for cells. A try that fails for another reason
    than memory (a crash, a timeout) ends its cell with that reason: it says nothing about what fits.
    """
    cells, tries = [], []
    ceiling = {mode: len(widths) for mode in modes}  # index of the first width known not to fit
    for cap in sorted(caps, key=lambda c: -c if c else -1e9):
        for mode in modes:
            lo, hi = -1, ceiling[mode]
            best, stopped = (
                None,
                "end of the ladder" if hi == len(widths) else "nothing larger fitted a larger cap",
            )
            while hi - lo > 1:
                mid = (lo + hi) // 2
                r = attempt(mode, cap, widths[mid])
                if r is None:
                    stopped = f"time budget spent (widths {widths[lo + 1]} to {widths[hi - 1]} undecided)"
                    break
                tries.append(r)
                if r["ok"]:
                    lo, best = mid, r
                elif r["why"].startswith(("CUDA out of memory", "preflight", "host out of memory")):
                    hi, stopped = mid, r["why"]
                else:
                    stopped = f"width {widths[mid]} failed: {r['why']}"
                    break
            ceiling[mode] = hi  # decided or not, no width from hi up fitted
            cells.append({"mode": mode, "cap_gb": cap, "largest": best, "stopped_by": stopped})
    return cells, tries


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    prov = common.provenance(device)
    widths = [w for w in WIDTHS if w <= 1536] if args.quick else WIDTHS
    caps = [0] if args.quick else args.caps
    record = {
        "quick": args.quick,
        "settings": {
            "depth": DEPTH,
            "widths": widths,
            "caps_gb": caps,
            "modes": args.modes,
            "batch_size": 8,
            "tokens": 256,
            "budget_s": args.budget,
        },
    }
    if not cuda:
        record["status"] = "not applicable without CUDA: capacity is found by training on the GPU"
    else:
        record["total_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
        deadline = time.monotonic() + args.budget if args.budget else float("inf")

        def attempt(mode: str, cap: float, w: int) -> dict | None:
            left = deadline - time.monotonic()
            if left < 20:
                return None
            print(f"{mode}, cap {cap or 'none'} GB, width {w} ...", flush=True)
            r = _try(mode, w, cap, min(args.timeout, left))
            if r.get("timed_out") and min(args.timeout, left) < args.timeout:
                r["why"] = f"time budget ({args.budget:.0f} s) spent during this try"
            return {"mode": mode, "cap_gb": cap, "width": w, **r}

        record["cells"], record["tries"] = search(attempt, widths, caps, args.modes)
    common.write("bench_capacity", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    """The results as a markdown table, ratios first (also used by the results page)."""
    if "status" in record:
        return [f"**GPU figures pending**: {record['status']}."]
    lines = [
        "| mode | memory cap | params vs end to end | largest width | parameters | stopped by |",
        "|---|---|---|---|---|---|",
    ]
    e2e = {c["cap_gb"]: c["largest"] for c in record["cells"] if c["mode"] == "end-to-end"}
    for c in record["cells"]:
        big, base = c["largest"], e2e.get(c["cap_gb"])
        cap = f"{c['cap_gb']:.0f} GB" if c["cap_gb"] else f"whole GPU ({record['total_gb']:.0f} GB)"
        ratio = f"{big['params'] / base['params']:.1f}x" if big and base else "-"
        width, params = (big["width"], f"{big['params'] / 1e9:.2f}B") if big else ("none", "-")
        lines.append(f"| {c['mode']} | {cap} | {ratio} | {width} | {params} | {c['stopped_by'][:80]} |")
    return lines


def _markdown(prov: dict, record: dict) -> str:
    title = f"Largest trainable DiT ({DEPTH} layers, batch 8, fp32 + AdamW), found by trying"
    return "\n".join(common.header(title, prov, record["quick"]) + table(record)) + "\n"


def _plot(record: dict, prov: dict, out: Path) -> None:
    if "status" in record:
        common.pending_figure("bench_capacity", prov, out)
        return
    fig, ax = common.figure(6, 3.2)
    for mode in record["settings"]["modes"]:
        cs = [c for c in record["cells"] if c["mode"] == mode]
        ax.plot(
            [c["cap_gb"] or record["total_gb"] for c in cs],
            [c["largest"]["params"] / 1e9 if c["largest"] else 0 for c in cs],
            "o-",
            label=mode,
        )
    ax.set_xlabel("GPU memory (GB)")
    ax.set_ylabel("largest trainable model (B params)")
    ax.legend(fontsize=8)
    common.save_figure(fig, "bench_capacity", prov, out)


if __name__ == "__main__":
    main()
