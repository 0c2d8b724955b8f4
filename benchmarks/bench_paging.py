"""How fast is block paging? Transfer bandwidth of paging against plain pinned copies, and the training step
time with paging (prefetch on and off) against every block resident.

    python benchmarks/bench_paging.py            # needs CUDA: a DiT of about 1B parameters in 8 blocks
    python benchmarks/bench_paging.py --quick    # smaller model and fewer steps

1. Bandwidth: one block's flat buffer (weights and AdamW moments) copied host-to-device and device-to-host,
   each alone and both at once on two streams, by plain pinned `copy_` and by the BlockStore's page-in and
   page-out, timed with CUDA events in the same run.
2. Step time: steps of the 8-block model with offload="none", "host" (prefetch on, off) and "disk", for the
   sequential and the random schedule; ratios to offload="none".

Without CUDA there is nothing to page between, and the record says so. Writes
results/bench_paging-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import common  # noqa: E402
from benchmarks.bench_memory import MODELS  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller model and fewer steps")
    ap.add_argument("--steps-per-block", type=int, default=20)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    return ap.parse_args(argv)


def _events_ms(fn, device) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def bandwidth(numel: int, device: torch.device) -> dict:
    """GB/s of plain pinned copies and of the BlockStore's paging, for one block of `numel` parameters."""
    from dblocks_fast.paging import BlockStore

    n = 3 * numel
    host = torch.empty(n, dtype=torch.float32, pin_memory=True)
    dev_a, dev_b = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(2))
    host_b = torch.empty(n, dtype=torch.float32, pin_memory=True)
    gb = n * 4 / 1e9
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def both():
        with torch.cuda.stream(s1):
            dev_a.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(dev_b, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(s1)
        torch.cuda.current_stream(device).wait_stream(s2)

    def rate(fn, moved_gb):  # GB/s of the best of 5 runs
        return moved_gb / (min(_events_ms(fn, device) for _ in range(5)) / 1e3)

    plain = {
        "h2d": rate(lambda: dev_a.copy_(host, non_blocking=True), gb),
        "d2h": rate(lambda: host_b.copy_(dev_b, non_blocking=True), gb),
        "both": rate(both, 2 * gb),
    }
    # the store: three blocks of this size, two slots; activating a third block pages one out and one in
    store = BlockStore("host", device)
    for b in range(3):
        blk = torch.nn.Linear(1, 1, bias=False)
        blk.weight = torch.nn.Parameter(torch.zeros(numel))
        opt = torch.optim.AdamW(blk.parameters())
        store.add(b, blk, opt)
    times = []
    for i in range(6):
        b = i % 3
        t0 = time.perf_counter()
        store.activate(b)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    swap = min(times[2:])  # from the third activation on: one page-out and one page-in per switch
    paged = {"swap_both_directions": 2 * gb / swap}
    return {
        "block_gb": gb,
        "plain_pinned_GBps": plain,
        "paging_GBps": paged,
        "paging_over_plain_both": paged["swap_both_directions"] / plain["both"],
        "pinned": store.pinned,
    }


def step_times(model_name: str, steps: int, device: torch.device) -> list[dict]:
    import dblocks_fast as dbf
    from dblocks_fast.data import ImageData
    from dblocks_fast.tasks import DiTConfig, ImageGeneration

    m = MODELS[model_name]
    gen = torch.Generator().manual_seed(0)
    n = 128
    data = ImageData(
        torch.rand(n, m["channels"], m["image_size"], m["image_size"], generator=gen) * 2 - 1,
        torch.randint(0, m["num_classes"], (n,), generator=gen),
        m["num_classes"],
        "random",
    )
    task = ImageGeneration(DiTConfig(**m))
    rows = []
    for schedule in ("sequential", "random"):
        for offload, prefetch in (("none", True), ("host", True), ("host", False), ("disk", True)):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = dbf.TrainConfig(
                    num_blocks=8,
                    steps_per_block=steps,
                    batch_size=32,
                    warmup=1,
                    schedule=schedule,
                    offload=offload,
                    prefetch=prefetch,
                    device=str(device),
                    out_dir=tmp,
                    ckpt_every=0,
                    progress=False,
                )
                trainer = dbf.Trainer(task, data, cfg)
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                trainer.fit()  # includes the final checkpoint
                torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
            rows.append(
                {
                    "schedule": schedule,
                    "offload": offload,
                    "prefetch": prefetch,
                    "step_ms": 1000 * seconds / (8 * steps),
                }
            )
    for r in rows:
        base = next(x for x in rows if x["schedule"] == r["schedule"] and x["offload"] == "none")
        r["over_resident"] = r["step_ms"] / base["step_ms"]
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    prov = common.provenance(device)
    model = "dit-118m" if args.quick else "dit-1b"
    record = {
        "quick": args.quick,
        "settings": {
            "model": model,
            "num_blocks": 8,
            "steps_per_block": 3 if args.quick else args.steps_per_block,
        },
    }
    if not cuda:
        record["status"] = "not applicable without CUDA: paging moves blocks between host memory and a GPU"
    else:
        from dblocks_fast.tasks import DiTConfig, ImageGeneration

        task = ImageGeneration(DiTConfig(**MODELS[model]))
        with torch.device("meta"):
            numel = sum(p.numel() for p in task.build_block(0, MODELS[model]["num_layers"] // 8).parameters())
        record["bandwidth"] = bandwidth(numel, device)
        record["steps"] = step_times(model, record["settings"]["steps_per_block"], device)
    common.write("bench_paging", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    if "status" in record:
        return [f"**GPU figures pending**: {record['status']}."]
    bw = record["bandwidth"]
    lines = [
        f"Block of {bw['block_gb']:.2f} GB. Paging swap (one block out, one in, at once): "
        f"{bw['paging_GBps']['swap_both_directions']:.1f} GB/s = {bw['paging_over_plain_both']:.2f} of plain "
        f"pinned copies both ways ({bw['plain_pinned_GBps']['both']:.1f} GB/s; H2D alone "
        f"{bw['plain_pinned_GBps']['h2d']:.1f}, D2H alone {bw['plain_pinned_GBps']['d2h']:.1f}).",
        "",
        "| schedule | offload | prefetch | step time / resident | step ms |",
        "|---|---|---|---|---|",
    ]
    for r in record["steps"]:
        lines.append(
            f"| {r['schedule']} | {r['offload']} | {'on' if r['prefetch'] else 'off'} | "
            f"{r['over_resident']:.2f} | {r['step_ms']:.1f} |"
        )
    return lines


def _markdown(prov: dict, record: dict) -> str:
    s = record["settings"]
    title = f"Block paging: bandwidth and step time ({s['model']}, B={s['num_blocks']})"
    return "\n".join(common.header(title, prov, record["quick"]) + table(record)) + "\n"


def _plot(record: dict, prov: dict, out: Path) -> None:
    if "status" in record:
        common.pending_figure("bench_paging", prov, out)
        return
    fig, ax = common.figure(6, 3.2)
    rows = record["steps"]
    names = [f"{r['schedule']}\n{r['offload']}{'' if r['prefetch'] else ' (no prefetch)'}" for r in rows]
    ax.bar(range(len(rows)), [r["over_resident"] for r in rows])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(rows)), names, fontsize=6)
    ax.set_ylabel("step time / resident")
    common.save_figure(fig, "bench_paging", prov, out)


if __name__ == "__main__":
    main()
