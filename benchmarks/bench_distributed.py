"""How does block-parallel training scale? Steps per second of the whole model against the world size.

    python benchmarks/bench_distributed.py                    # CPU processes, world sizes 1, 2, 4 (B = 4)
    python benchmarks/bench_distributed.py --device cuda      # one process per GPU, up to the GPUs present
    python benchmarks/bench_distributed.py --quick            # tiny sizes: checks the pipeline

Every world size W trains the same B-block DiT (the digits-dit preset) for the same steps, started by
torchrun (`python -m torch.distributed.run --standalone`): W = 1 trains all blocks on one process, W = B
gives each rank one block. Each process uses one CPU thread (or one GPU), so W processes use W cores: on a
machine with fewer cores than W the speed-up is capped by the cores, and the record says how many there
were. Also recorded: the bytes each rank sent, by kind, as counted at the package's only calls into
torch.distributed (gradients inside a block's group, tensors between groups, checkpoint metadata).

Writes results/bench_distributed-<device>.json, .md and .png.
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4, help="B, the number of blocks")
    ap.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default 1 2 4)")
    ap.add_argument("--steps-per-block", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5, help="runs per world size, interleaved; median kept")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one training process (JSON settings)
    return ap.parse_args(argv)


# --- one training process (started by torchrun) -------------------------------------------------------------
def worker(spec: dict) -> None:
    import torch.distributed as dist

    import dblocks_fast as dbf

    torch.set_num_threads(1)
    data = dbf.data.load_digits("train")
    if spec["quick"]:
        task = dbf.tasks.ImageGeneration.for_data(
            data, hidden=16, heads=2, num_layers=spec["blocks"], patch_size=4
        )
    else:
        task = dbf.tasks.PRESETS["digits-dit"].make_task(data)
    config = dbf.TrainConfig(
        num_blocks=spec["blocks"],
        steps_per_block=spec["steps_per_block"],
        batch_size=spec["batch_size"],
        warmup=min(10, spec["steps_per_block"]),
        device=spec["device"],
        out_dir=spec["out_dir"],
        ckpt_every=0,  # one checkpoint, at the end
        progress=False,
    )
    trainer = dbf.Trainer(task, data, config)
    if dist.is_initialized():
        dist.barrier()  # start the clocks together
    start = time.perf_counter()
    trainer.fit()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rank = trainer.comm.rank
    out = {"rank": rank, "blocks": trainer.owned, "seconds": seconds, "sent": trainer.comm.sent}
    Path(spec["report"], f"rank{rank}.json").write_text(json.dumps(out))


def run_world(world: int, args, tmp: Path, repeat: int) -> dict:
    report = tmp / f"w{world}-{repeat}"
    report.mkdir()
    spec = {
        "blocks": args.blocks,
        "steps_per_block": args.steps_per_block,
        "batch_size": args.batch_size,
        "device": args.device,
        "quick": args.quick,
        "out_dir": str(tmp / f"run{world}-{repeat}"),
        "report": str(report),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    cmd += [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    wall = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if res.returncode != 0:
        raise RuntimeError(f"world size {world} failed:\n{res.stderr[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in report.glob("rank*.json")), key=lambda r: r["rank"])
    seconds = max(r["seconds"] for r in ranks)  # the whole model is done when the slowest rank is
    total = {k: sum(r["sent"][k] for r in ranks) for k in ranks[0]["sent"]}
    return {
        "world_size": world,
        "train_s": seconds,
        "launch_wall_s": wall,  # includes process start-up and imports
        "steps_per_s": args.blocks * args.steps_per_block / seconds,
        "blocks_per_rank": [r["blocks"] for r in ranks],
        "bytes_sent": total,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    if args.quick:
        args.steps_per_block, args.batch_size, args.repeats = 3, 8, 1
        args.worlds = args.worlds or [1, 2]
    args.worlds = args.worlds or [1, 2, 4]
    device = torch.device(args.device)
    torch.set_num_threads(1)  # as in every worker, so the record's device line says so
    if device.type == "cuda" and torch.cuda.device_count() < max(args.worlds):
        have = torch.cuda.device_count()
        print(f"only {have} GPUs: world sizes above {have} are left out (recorded as pending)")
    prov = common.provenance(device)
    pending = [w for w in args.worlds if device.type == "cuda" and w > torch.cuda.device_count()]
    worlds = [w for w in args.worlds if w not in pending]
    runs = {w: [] for w in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so a slow spell of a shared machine hits every size
            for w in worlds:
                print(f"world size {w}, run {i + 1} of {args.repeats} ...", flush=True)
                runs[w].append(run_world(w, args, Path(tmp), i))
    rows = []
    for w in worlds:
        by_speed = sorted(runs[w], key=lambda r: r["steps_per_s"])
        row = dict(by_speed[len(by_speed) // 2])  # the median run
        row["steps_per_s_all"] = [r["steps_per_s"] for r in runs[w]]
        rows.append(row)
    base = next((r for r in rows if r["world_size"] == 1), None)
    for r in rows:
        r["speedup"] = r["steps_per_s"] / base["steps_per_s"] if base else None
        r["efficiency"] = r["speedup"] / r["world_size"] if base else None
    record = {
        "quick": args.quick,
        "cpu_cores": os.cpu_count(),
        "settings": {
            "blocks": args.blocks,
            "steps_per_block": args.steps_per_block,
            "batch_size": args.batch_size,
            "model": "digits-dit preset" + (" (tiny in --quick)" if args.quick else ""),
            "threads_per_process": 1,
            "repeats": args.repeats,
        },
        "rows": rows,
        "pending_world_sizes": pending,
    }
    common.write("bench_distributed", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    return record


def table(record: dict) -> list[str]:
    """The results as a markdown table, ratios first (also used by the results page)."""
    lines = [
        "| world size | speed-up / W | speed-up | steps/s (whole model, median) | all runs | blocks per rank "
        "| bytes between groups | gradient bytes in groups | checkpoint metadata bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        per = "/".join(str(len(b)) for b in r["blocks_per_rank"])
        b = r["bytes_sent"]
        lines.append(
            f"| {r['world_size']} | {r['efficiency']:.2f} | {r['speedup']:.2f}x | {r['steps_per_s']:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in r['steps_per_s_all'])} | {per} | {b['between_groups']} | "
            f"{b['group']} | {b['control']} |"
        )
    lines += [f"| {w} | pending: needs {w} GPUs | | | | | | | |" for w in record["pending_world_sizes"]]
    return lines + [
        "",
        f"{record['cpu_cores']} CPU cores; one thread or GPU per process. Speed-up = steps/s over the world "
        "size 1 run; the whole model is done when its slowest rank is. Bytes are counted at the package's "
        "calls into torch.distributed.",
    ]


def _markdown(prov: dict, record: dict) -> str:
    s = record["settings"]
    title = f"Block-parallel training: B={s['blocks']}, {s['steps_per_block']} steps per block, batch "
    title += str(s["batch_size"])
    return "\n".join(common.header(title, prov, record["quick"]) + table(record)) + "\n"


def _plot(record: dict, prov: dict, out: Path) -> None:
    series = {"measured": [(r["world_size"], r["speedup"]) for r in record["rows"]]}
    common.speedup_plot(series, "world size (processes)", "speed-up over 1 process",
                        f"B={record['settings']['blocks']} blocks, one per rank at W=B", "bench_distributed",
                        prov, out, cores=record["cpu_cores"])  # fmt: skip


if __name__ == "__main__":
    main()
