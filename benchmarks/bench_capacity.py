"""What is the largest DiT I can train on my GPU? Found by trying: end to end against 8 blocks paged to host
memory or to disk, on the whole GPU and under memory caps of 12, 16 and 24 GB (the cards most users own).

    python benchmarks/bench_capacity.py                          # needs CUDA; tens of minutes
    python benchmarks/bench_capacity.py --caps 24 --modes disk   # one cell
    python benchmarks/bench_capacity.py --quick                  # small ladder, whole GPU only

Each try is its own process: build a DiT of 24 layers and the given width (latents 32x32x4, patch 2, batch 8,
fp32 weights and AdamW state) and take one optimizer step of every block. A try succeeds when the steps
finish; it fails on a CUDA out-of-memory error, or when the preflight refuses the tier (host memory or disk
too small), and the record says which. The width grows along a ladder until a try fails; under a smaller cap
the search starts below the largest width that fitted a larger one. The cap is
torch.cuda.set_per_process_memory_fraction. Without CUDA nothing can be tried, and the record says so.

Writes results/bench_capacity-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
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
            return {"ok": False, "why": f"took over {timeout:.0f} s", "seconds": timeout}
        out = {"seconds": time.perf_counter() - t0}
        lines = res.stdout.strip().splitlines()
        if res.returncode != 0 or not lines:
            return {**out, "ok": False, "why": f"exit {res.returncode}: {res.stderr.strip()[-300:]}"}
        return {**out, **json.loads(lines[-1])}


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
        },
    }
    if not cuda:
        record["status"] = "not applicable without CUDA: capacity is found by training on the GPU"
    else:
        record["total_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
        cells, tries = [], []
        for mode in args.modes:
            ceiling = len(widths)  # under a smaller cap, nothing larger than what fitted a larger one
            for cap in sorted(caps, key=lambda c: -c if c else -1e9):
                best, stopped = None, "nothing fitted under a larger cap"
                for w in widths[:ceiling]:
                    print(f"{mode}, cap {cap or 'none'} GB, width {w} ...", flush=True)
                    r = {"mode": mode, "cap_gb": cap, "width": w, **_try(mode, w, cap, args.timeout)}
                    tries.append(r)
                    if not r["ok"]:
                        stopped = r["why"]
                        break
                    best, stopped = r, "end of the ladder"
                ceiling = widths.index(best["width"]) + 1 if best else 0
                cells.append({"mode": mode, "cap_gb": cap, "largest": best, "stopped_by": stopped})
        record["cells"], record["tries"] = cells, tries
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
