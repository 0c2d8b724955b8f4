"""How much memory does block-wise training need? Peak memory of training steps, end to end against B blocks
kept resident, paged to host memory, and paged to disk.

    python benchmarks/bench_memory.py            # GPU: a 1B-parameter DiT; CPU: a 118M one, peak RSS
    python benchmarks/bench_memory.py --quick    # tiny sizes: checks the pipeline, measures nothing

Every configuration runs in its own process, so peaks do not mix. On a GPU the figure is
torch.cuda.max_memory_allocated over the training steps. On a CPU the device memory is the host memory, so
the figure is the process's peak resident set size (ru_maxrss), shown also above the baseline of the same
process after it has imported torch, loaded the data and trained one step of a tiny model (so torch's own
lazily allocated state is in the baseline), before this configuration's model exists: that difference is
what the B-fold claim is about.
Weights, gradients and AdamW state are fp32; activations come from batch 8 (CPU) or 32 (GPU). No checkpoint
is written (writing one serializes a block's state in memory, a passing copy that is not about training).

Writes results/bench_memory-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MODELS = {  # num_layers divisible by 1, 2, 4 and 8
    "dit-1b": dict(
        image_size=32, channels=4, num_classes=1000, hidden=1536, heads=16, num_layers=24, patch_size=2
    ),
    "dit-118m": dict(
        image_size=8, channels=1, num_classes=10, hidden=640, heads=8, num_layers=16, patch_size=2
    ),
    "tiny": dict(image_size=8, channels=1, num_classes=10, hidden=32, heads=2, num_layers=8, patch_size=4),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", choices=sorted(MODELS), help="default: dit-1b on GPU, dit-118m on CPU")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps-per-block", type=int, default=2)
    ap.add_argument(
        "--offload",
        nargs="+",
        choices=("none", "host", "disk"),
        default=["none", "host", "disk"],
        help="block tiers to run at each B (none: resident)",
    )
    ap.add_argument("--batch-size", type=int, help="default 32 on GPU, 8 on CPU")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_images(m: dict, n: int):
    """n random images and labels for model config m: memory does not depend on what they show."""
    import numpy as np

    from dblocks_fast.data import ImageData

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (n, m["channels"], m["image_size"], m["image_size"])).astype(np.float32)
    labels = torch.from_numpy(rng.integers(0, m["num_classes"], n))
    return ImageData(torch.from_numpy(images), labels, m["num_classes"], "random")


def warm_up(m: dict, data, batch_size: int, device: str) -> int:
    """Train one step of a tiny model, so torch's own lazily allocated state (thread pools, kernels) is in
    the baseline; returns that baseline RSS, which holds everything but the configuration's model."""
    import dblocks_fast as dbf
    from dblocks_fast.tasks import DiTConfig, ImageGeneration

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tiny = ImageGeneration(
        DiTConfig(**{**MODELS["tiny"], **{k: m[k] for k in ("image_size", "channels", "num_classes")}})
    )
    warm = dict(steps_per_block=1, batch_size=batch_size, warmup=1, progress=False, device=device)
    dbf.Trainer(tiny, data, dbf.TrainConfig(num_blocks=1, **warm)).fit()
    return _rss_now()


def worker(spec: dict) -> dict:
    """One configuration, in its own process: train a few steps and report the peak."""
    import dblocks_fast as dbf
    from dblocks_fast.tasks import DiTConfig, ImageGeneration

    m = MODELS[spec["model"]]
    data = random_images(m, 4 * spec["batch_size"])
    task = ImageGeneration(DiTConfig(**m))
    device = torch.device(spec["device"])
    baseline = warm_up(m, data, spec["batch_size"], spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = dbf.TrainConfig(
        num_blocks=spec["blocks"],
        steps_per_block=spec["steps_per_block"],
        batch_size=spec["batch_size"],
        warmup=1,
        schedule="sequential",
        offload=spec["offload"],
        device=spec["device"],
        out_dir=spec["out_dir"],
        ckpt_every=0,
        progress=False,
    )
    trainer = dbf.Trainer(task, data, config)
    params = sum(p.numel() for b in trainer.model.blocks for p in b.parameters())
    trainer.fit()
    out = {
        "params": params,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _run(spec: dict, script: Path = Path(__file__)) -> dict:
    """Run `script --worker spec` in a process of its own (peaks do not mix) and return its JSON line."""
    cmd = [sys.executable, str(script.resolve()), "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.model, args.blocks, args.steps_per_block, args.batch_size = "tiny", [2, 4], 1, 4
    model = args.model or ("dit-1b" if gpu else "dit-118m")
    batch = args.batch_size or (32 if gpu else 8)
    prov = common.provenance(device)
    # resident first, the largest B first (the targets are at B = 4 and 8): a run stopped by a time limit
    # keeps those, and the record is rewritten after every configuration ("complete": false until the last)
    blocks = sorted(args.blocks, reverse=True)
    tiers = [t for t in ("none", "host", "disk") if t in args.offload]
    configs = [(1, "none")] + [(b, tier) for tier in tiers for b in blocks]
    key = "peak_device_bytes" if gpu else "peak_rss_bytes"
    record = {
        "quick": args.quick,
        "complete": False,
        "measure": "torch.cuda.max_memory_allocated" if gpu else "peak RSS of the process (ru_maxrss)",
        "settings": {
            "model": model,
            "model_config": MODELS[model],
            "batch_size": batch,
            "steps_per_block": args.steps_per_block,
            "schedule": "sequential",
            "dtype": "fp32",
        },
        "rows": [],
    }
    rows = []
    for i, (b, tier) in enumerate(configs):
        label = "end to end" if b == 1 else f"B={b}, {'resident' if tier == 'none' else tier + '-paged'}"
        print(f"{label} ...", flush=True)
        out_dir = None  # no checkpoint: the peak is the training steps' (the disk tier pages to a temp dir)
        spec = dict(
            model=model,
            blocks=b,
            offload=tier,
            steps_per_block=args.steps_per_block,
            batch_size=batch,
            device=str(device),
            out_dir=out_dir,
        )
        r = {"config": label, "num_blocks": b, "offload": tier, **_run(spec)}
        e2e = rows[0] if rows else r
        r["peak_bytes"] = r[key]
        r["ratio_end_to_end_over_this"] = e2e[key] / r[key]
        if not gpu:
            above = r[key] - r["baseline_rss_bytes"]
            r["peak_above_baseline_bytes"] = above
            r["ratio_above_baseline"] = (e2e[key] - e2e["baseline_rss_bytes"]) / above
        rows.append(r)
        record["rows"] = sorted(rows, key=lambda x: x["num_blocks"])  # stable: tiers keep their order
        record["complete"] = i == len(configs) - 1
        common.write("bench_memory", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    """The results as a markdown table, ratios first (also used by the results page)."""
    cpu = "ratio_above_baseline" in record["rows"][0]
    if cpu:
        head = "| configuration | end to end / this (above baseline) | end to end / this (whole process) "
        head += "| peak GB above baseline | peak RSS GB |"
    else:
        head = "| configuration | end to end / this | peak device GB |"
    lines = [head, "|---|---|---|" + ("---|---|" if cpu else "")]
    for r in record["rows"]:
        cells = [r["config"]]
        if cpu:
            cells += [f"{r['ratio_above_baseline']:.2f}", f"{r['ratio_end_to_end_over_this']:.2f}"]
            cells += [f"{r['peak_above_baseline_bytes'] / 1e9:.2f}", f"{r['peak_bytes'] / 1e9:.2f}"]
        else:
            cells += [f"{r['ratio_end_to_end_over_this']:.2f}", f"{r['peak_bytes'] / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    params = record["rows"][0]["params"]
    return lines + ["", f"{params / 1e6:.0f}M parameters; measured as {record['measure']}."]


def _markdown(prov: dict, record: dict) -> str:
    s = record["settings"]
    title = f"Peak training memory: end to end against B blocks ({s['model']}, batch {s['batch_size']}, fp32)"
    return common.markdown(title, prov, record, table(record))


def _plot(record: dict, prov: dict, out: Path) -> None:
    fig, ax = common.figure(6, 3.2)
    cpu = "peak_above_baseline_bytes" in record["rows"][0]
    key = "peak_above_baseline_bytes" if cpu else "peak_bytes"
    names = [r["config"].replace(", ", "\n") for r in record["rows"]]
    ax.bar(range(len(names)), [r[key] / 1e9 for r in record["rows"]])
    ax.set_xticks(range(len(names)), names, fontsize=6)
    ax.set_ylabel("peak GB" + (" above baseline (RSS)" if cpu else " (device)"))
    ax.set_title(f"{record['settings']['model']}: training memory", fontsize=9)
    common.save_figure(fig, "bench_memory", prov, out)


if __name__ == "__main__":
    main()
