"""How much faster is sampling with B blocks? DiT sampling throughput, DiffusionBlocks against end to end.

    python benchmarks/bench_inference.py                  # the device's sizes (CPU: digits DiT; GPU: DiT-S/2)
    python benchmarks/bench_inference.py --quick          # tiny sizes: checks the pipeline, measures nothing

Each sampling step of a B-block model runs one block of L/B layers; the end-to-end model runs all L layers
at every step. Both take the same steps with the same sampler (Euler, 12 steps) from the same noise, so the
ideal speed-up is B; every block's own stem, embeddings and head (DESIGN.md section 3) and the per-step work
outside the network keep it below that. The weights are random: speed does not depend on training.

Also on a GPU: sampling with every block in pinned host memory and two on the device (the next one copied
while the current one computes, paging.StreamedBlockModel) against all blocks resident. On a CPU the blocks
already live in host memory, so that comparison is recorded as not applicable.

CPU: fp32, the digits-dit preset (12 layers, width 64, 16 tokens). GPU: bf16 autocast, a DiT-S/2 on 32x32x4
latents (12 layers, width 384, 256 tokens, 1000 classes). Writes results/bench_inference-<device>.json, .md
and .png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import dblocks_fast as dbf  # noqa: E402
from benchmarks import common  # noqa: E402
from dblocks_fast.model import BlockModel  # noqa: E402
from dblocks_fast.paging import StreamedBlockModel  # noqa: E402
from dblocks_fast.schedule import EDM  # noqa: E402
from dblocks_fast.tasks import DiTConfig, ImageGeneration  # noqa: E402

MODELS = {
    "digits-dit": dict(
        image_size=8, channels=1, num_classes=10, hidden=64, heads=4, num_layers=12, patch_size=2
    ),
    "dit-s2-latent32": dict(
        image_size=32, channels=4, num_classes=1000, hidden=384, heads=6, num_layers=12, patch_size=2
    ),
    "tiny": dict(image_size=8, channels=1, num_classes=10, hidden=16, heads=2, num_layers=6, patch_size=4),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--model", choices=sorted(MODELS), help="default: digits-dit on CPU, dit-s2-latent32 on GPU"
    )
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 3, 4, 6])
    ap.add_argument("--batches", type=int, nargs="+", help="default: 1 64 on CPU, 1 256 on GPU")
    ap.add_argument("--num-steps", type=int, default=12, help="sampling steps, a multiple of every B")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median kept)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    return ap.parse_args(argv)


def build(model_name: str, num_blocks: int, device: torch.device) -> BlockModel:
    task = ImageGeneration(DiTConfig(**MODELS[model_name]))
    layers = [task.num_layers // num_blocks] * num_blocks
    return BlockModel.create(task, EDM(num_blocks), layers, seed=0).to(device).eval()


def time_sampling(model: BlockModel, batch: int, num_steps: int, device: torch.device) -> float:
    """Seconds for one sampling run of `batch` images (Euler, num_steps), synchronised."""
    labels = torch.arange(batch) % model.task.config.num_classes
    bf16 = device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dbf.sample(model, labels, num_steps=num_steps, sampler="euler")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.model, args.blocks, args.batches, args.num_steps, args.repeats = "tiny", [2, 3, 6], [1, 8], 6, 1
    model_name = args.model or ("dit-s2-latent32" if gpu else "digits-dit")
    batches = args.batches or ([1, 256] if gpu else [1, 64])
    for b in args.blocks:
        if args.num_steps % b:
            raise SystemExit(f"--num-steps {args.num_steps} is not a multiple of B={b}")
    prov = common.provenance(device)
    models = {b: build(model_name, b, device) for b in [1, *args.blocks]}
    streamed = {}
    if gpu:
        streamed = {b: StreamedBlockModel(copy.deepcopy(models[b]).cpu(), device) for b in args.blocks}
    # (kind, B): every configuration, timed in turn within each repeat, so drift hits all of them alike
    configs = [("resident", b) for b in models] + [("streamed", b) for b in streamed]
    times: dict = {(k, b, n): [] for k, b in configs for n in batches}
    for n in batches:
        for k, b in configs:  # warm-up: allocator, kernels' first launch, autotuning
            time_sampling(streamed[b] if k == "streamed" else models[b], n, args.num_steps, device)
        for _ in range(args.repeats):
            for k, b in configs:
                m = streamed[b] if k == "streamed" else models[b]
                times[(k, b, n)].append(time_sampling(m, n, args.num_steps, device))
    rows = []
    for n in batches:
        e2e = statistics.median(times[("resident", 1, n)])
        for b in args.blocks:
            t = statistics.median(times[("resident", b, n)])
            row = {
                "batch": n,
                "num_blocks": b,
                "end_to_end_images_per_s": n / e2e,
                "blocks_images_per_s": n / t,
                "speedup": e2e / t,
                "speedup_over_B": e2e / t / b,
                "end_to_end_s_all": times[("resident", 1, n)],
                "blocks_s_all": times[("resident", b, n)],
            }
            if gpu:
                ts = statistics.median(times[("streamed", b, n)])
                row["streamed_images_per_s"] = n / ts
                row["streamed_over_resident"] = t / ts
            rows.append(row)
    record = {
        "quick": args.quick,
        "settings": {
            "model": model_name,
            "model_config": MODELS[model_name],
            "sampler": "euler",
            "num_steps": args.num_steps,
            "precision": "bf16 autocast" if gpu else "fp32",
            "repeats": args.repeats,
            "cuda_graphs": False,
        },
        "rows": rows,
        "streamed": "measured" if gpu else "not applicable on a CPU: the blocks already live in host memory",
        "targets": {"speedup_over_B": 0.9 if gpu else 0.8, "streamed_over_resident": 0.9 if gpu else None},
    }
    common.write("bench_inference", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    """The results as a markdown table, ratios first (also used by the results page)."""
    gpu = "streamed_over_resident" in (record["rows"] or [{}])[0]
    lines = [
        "| batch | B | speed-up / B | speed-up | images/s (B blocks) | images/s (end to end) |"
        + (" streamed / resident |" if gpu else ""),
        "|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for x in record["rows"]:
        lines.append(
            f"| {x['batch']} | {x['num_blocks']} | {x['speedup_over_B']:.2f} | {x['speedup']:.2f}x | "
            f"{x['blocks_images_per_s']:.1f} | {x['end_to_end_images_per_s']:.1f} |"
            + (f" {x['streamed_over_resident']:.2f} |" if gpu else "")
        )
    t = record["targets"]
    target = f"Target: speed-up / B >= {t['speedup_over_B']} at batch >= 64"
    target += f"; streamed / resident >= {t['streamed_over_resident']}." if gpu else "."
    return [*lines, "", target, f"Streamed sampling (blocks in host memory): {record['streamed']}."]


def _markdown(prov: dict, record: dict) -> str:
    s = record["settings"]
    title = f"Sampling: B blocks against end to end ({s['model']}, {s['sampler']} {s['num_steps']} steps, "
    title += f"{s['precision']})"
    lines = common.header(title, prov, record["quick"]) + table(record)
    lines += ["", f"Median of {s['repeats']} interleaved runs of each configuration."]
    return "\n".join(lines) + "\n"


def _plot(record: dict, prov: dict, out: Path) -> None:
    series = {}
    for r in record["rows"]:
        series.setdefault(f"batch {r['batch']}", []).append((r["num_blocks"], r["speedup"]))
    s = record["settings"]
    common.speedup_plot(series, "blocks B", "sampling speed-up over end to end",
                        f"{s['model']}, {s['precision']}", "bench_inference", prov, out)  # fmt: skip


if __name__ == "__main__":
    main()
