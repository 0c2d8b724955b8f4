"""How fast is block paging? Transfer bandwidth of paging against plain pinned copies, and the training step
time with paging (prefetch on and off) against every block resident.

    python benchmarks/bench_paging.py            # needs CUDA: a DiT of about 1B parameters in 8 blocks
    python benchmarks/bench_paging.py --quick    # smaller model and fewer steps

1. Bandwidth: one block's flat buffer (weights and AdamW moments) copied host-to-device and device-to-host
   (each alone, and both at once on two streams) by plain pinned `copy_`, against the host storage's page-in,
   page-out and swap (a write-back, then a page-in into the same slot), in the same run.
2. Step time: steps of the 8-block model with offload="none", "host" (prefetch on, off) and "disk", for the
   sequential and the random schedule; ratios to offload="none". One untimed run first compiles the
   kernels; no checkpoint is written. The record is rewritten after every run, so a run stopped by a time
   limit keeps what it measured ("complete": false).

Without CUDA there is nothing to page between, and the record says so. Writes
results/bench_paging-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import common  # noqa: E402
from benchmarks.bench_memory import MODELS  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller model and fewer steps")
    ap.add_argument("--steps-per-block", type=int, default=10)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _events_ms(fn, device) -> float:
    if device.type != "cuda":  # the CPU runs only to test this script's logic: no figure comes from it
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def bandwidth(numel: int, device: torch.device) -> dict:
    """GB/s of plain pinned copies and of the host storage's paging, for one block of `numel` parameters."""
    from dblocks_fast import storage

    n, cuda = 3 * numel, device.type == "cuda"
    host = torch.empty(n, dtype=torch.float32, pin_memory=cuda)
    dev_a, dev_b = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(2))
    host_b = torch.empty(n, dtype=torch.float32, pin_memory=cuda)
    gb = n * 4 / 1e9

    def both():
        if not cuda:
            dev_a.copy_(host), host_b.copy_(dev_b)
            return
        s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
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
    # the store: three blocks of this size in two slots. Page-in alone: activate a block with every slot
    # empty (after a flush). Page-out alone: flush the one dirty block. A swap: activating a block that is in
    # no slot evicts the least recently active one, written back and then refilled (the same slot: serial).
    store = storage.create("host", device)
    for b in range(3):
        blk = torch.nn.Linear(1, 1, bias=False)
        blk.weight = torch.nn.Parameter(torch.zeros(numel))
        opt = torch.optim.AdamW(blk.parameters())
        store.add(b, blk, opt)

    def timed(fn, *args) -> tuple[float, int, int]:
        before = (store.bytes_in, store.bytes_out)
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        return time.perf_counter() - t0, store.bytes_in - before[0], store.bytes_out - before[1]

    ins, outs, swaps = [], [], []
    for i in range(5):
        store.flush()
        ins.append(timed(store.activate, i % 3))
        outs.append(timed(store.flush))
    store.activate(0)
    store.activate(1)
    for i in range(6):
        swaps.append(timed(store.activate, (i + 2) % 3))
    size = 3 * numel * 4

    def best(rows, moved_in, moved_out):  # GB/s of the fastest run that moved exactly these bytes
        ok = [t for t, i, o in rows if (i, o) == (moved_in, moved_out)]
        if not ok:
            raise RuntimeError(f"no paging run moved ({moved_in}, {moved_out}) bytes: {rows}")
        return (moved_in + moved_out) / 1e9 / min(ok)

    paged = {
        "page_in": best(ins, size, 0),
        "page_out": best(outs, 0, size),
        "swap_out_then_in": best(swaps, size, size),
    }
    serial = 2 / (1 / plain["h2d"] + 1 / plain["d2h"])  # plain copies one after the other
    return {
        "block_gb": gb,
        "plain_pinned_GBps": plain,
        "paging_GBps": paged,
        "page_in_over_plain_h2d": paged["page_in"] / plain["h2d"],
        "page_out_over_plain_d2h": paged["page_out"] / plain["d2h"],
        "swap_over_plain_serial": paged["swap_out_then_in"] / serial,
        "pinned": store.pinned,
    }


# in the order of what the targets ask: each resident baseline before its paged runs, disk last
RUNS = [
    ("sequential", "none", True),
    ("sequential", "host", True),
    ("random", "none", True),
    ("random", "host", True),
    ("random", "host", False),
    ("sequential", "host", False),
    ("sequential", "disk", True),
    ("random", "disk", True),
]


def step_times(model_name: str, steps: int, device: torch.device, on_row=None) -> list[dict]:
    """Step time of every RUNS configuration; on_row(rows so far) after each (to write partial results)."""
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

    def config(schedule, offload, prefetch, steps):
        return dbf.TrainConfig(
            num_blocks=8,
            steps_per_block=steps,
            batch_size=32,
            warmup=1,
            schedule=schedule,
            offload=offload,
            prefetch=prefetch,
            device=str(device),
            out_dir=None,  # no checkpoint in the timed region (the disk tier pages to a temporary folder)
            ckpt_every=0,
            progress=False,
        )

    # untimed: compile the kernels, create the cuBLAS handles, load the modules
    dbf.Trainer(task, data, config("sequential", "none", True, 1)).fit()
    rows = []
    for schedule, offload, prefetch in RUNS:
        trainer = dbf.Trainer(task, data, config(schedule, offload, prefetch, steps))
        _sync(device)
        t0 = time.perf_counter()
        trainer.fit()  # the steps, the first page-in and the final write-back
        _sync(device)
        seconds = time.perf_counter() - t0
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {
            "schedule": schedule,
            "offload": offload,
            "prefetch": prefetch,
            "step_ms": 1000 * seconds / (8 * steps),
        }
        base = next((x for x in rows if x["schedule"] == schedule and x["offload"] == "none"), None)
        row["over_resident"] = row["step_ms"] / base["step_ms"] if base else 1.0
        rows.append(row)
        if on_row is not None:
            on_row(rows)
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
        record["steps"], record["complete"] = [], False

        def partial(rows):
            record["steps"] = rows
            common.write("bench_paging", prov, record, _markdown(prov, record), args.out)

        partial([])
        step_times(model, record["settings"]["steps_per_block"], device, on_row=partial)
        record["complete"] = True
    common.write("bench_paging", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    if "status" in record:
        return [f"**GPU figures pending**: {record['status']}."]
    bw = record["bandwidth"]
    plain, paged = bw["plain_pinned_GBps"], bw["paging_GBps"]
    serial = 2 / (1 / plain["h2d"] + 1 / plain["d2h"])
    lines = [
        f"Block of {bw['block_gb']:.2f} GB (weights and AdamW moments), pinned: {bw['pinned']}.",
        "",
        "| transfer | paging GB/s | plain pinned copy GB/s | paging / plain |",
        "|---|---|---|---|",
        f"| host to device (page-in) | {paged['page_in']:.1f} | {plain['h2d']:.1f} | "
        f"{bw['page_in_over_plain_h2d']:.2f} |",
        f"| device to host (page-out) | {paged['page_out']:.1f} | {plain['d2h']:.1f} | "
        f"{bw['page_out_over_plain_d2h']:.2f} |",
        f"| swap: out, then in, one slot | {paged['swap_out_then_in']:.1f} | {serial:.1f} (serial) "
        f"| {bw['swap_over_plain_serial']:.2f} |",
        "",
        f"Both directions at once, plain: {plain['both']:.1f} GB/s.",
        "",
    ]
    if not record.get("complete", True):
        lines += ["**Partial**: the run stopped (a time limit?) after the rows below.", ""]
    lines += [
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
