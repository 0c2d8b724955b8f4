"""Does block-wise training match end-to-end training? DiT on the built-in digits, B = 1, 2, 3, 4 at equal
total layer evaluations (every B trains each block for the same steps, so B blocks x steps x L/B layers is
the same for all), and the equi-probability partition against the uniform one at B = 3.

    python benchmarks/quality_digits.py                      # the full comparison (CPU: about an hour)
    python benchmarks/quality_digits.py --quick              # a smoke run of the whole pipeline in a minute

Writes results/quality_digits-<device>.json and .md. Figures (dblocks_fast.quality): sample accuracy under
a fixed classifier trained on the real training digits, and the Frechet distance of its features between
generated and held-out real digits, next to the same distance for real training digits (the floor).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import dblocks_fast as dbf  # noqa: E402
from benchmarks import common  # noqa: E402
from dblocks_fast.quality import evaluate, train_classifier  # noqa: E402

CONFIGS = [  # (label, num_blocks, partition)
    ("B=1 (end to end)", 1, "equiprob"),
    ("B=2", 2, "equiprob"),
    ("B=3", 3, "equiprob"),
    ("B=4", 4, "equiprob"),
    ("B=3, uniform partition", 3, "uniform"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-per-block", type=int, default=1000, help="optimizer steps of every block")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per configuration")
    ap.add_argument("--per-class", type=int, default=50, help="generated samples per class")
    ap.add_argument("--num-steps", type=int, default=12, help="sampling steps (a multiple of 1, 2, 3 and 4)")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for the JSON and markdown")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.steps_per_block, args.seeds, args.per_class = 4, [0], 2
    preset = dbf.tasks.PRESETS["digits-dit"]
    train_data, test_data = dbf.data.load_digits("train"), dbf.data.load_digits("test")
    task = preset.make_task(train_data)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    prov = common.provenance(device)
    judge = train_classifier(train_data, steps=50 if args.quick else 1500)
    runs = []
    for label, b, partition in CONFIGS:
        for seed in args.seeds:
            cfg = dbf.TrainConfig(
                **{
                    **preset.train_defaults,
                    "num_blocks": b,
                    "partition": partition,
                    "seed": seed,
                    "steps_per_block": args.steps_per_block,
                    "device": str(device),
                    "progress": False,
                    "out_dir": None,
                },
            )
            t0 = time.perf_counter()
            model = dbf.train(task, train_data, cfg)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = evaluate(
                model,
                train_data,
                test_data,
                per_class=args.per_class,
                num_steps=args.num_steps,
                sampler=args.sampler,
                cfg_scale=args.cfg_scale,
                seed=seed,
                classifier=judge,
            )
            r.pop("samples")
            runs.append(
                {
                    "config": label,
                    "num_blocks": b,
                    "partition": partition,
                    "seed": seed,
                    "train_s": train_s,
                    "sample_s": time.perf_counter() - t0,
                    **r,
                }
            )
            print(
                f"{label:24s} seed {seed}: accuracy {r['sample_accuracy']:.3f}  Frechet "
                f"{r['frechet_distance']:.2f} (floor {r['real_frechet']:.2f})  train {train_s:.0f}s",
                flush=True,
            )
    summary = _summarise(runs)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(model=task.to_dict(), train=preset.train_defaults)
    record = {"quick": args.quick, "settings": settings, "summary": summary, "runs": runs}
    md = _markdown(summary, settings, prov)
    path = common.write("quality_digits", prov, record, md, args.out)
    _plot(summary, prov, args.out)
    print(md)
    print(f"wrote {path}")
    return record


def _summarise(runs: list[dict]) -> list[dict]:
    out = []
    for label, b, partition in CONFIGS:
        rs = [r for r in runs if r["config"] == label]
        row = {"config": label, "num_blocks": b, "partition": partition, "seeds": len(rs)}
        for key in ("sample_accuracy", "frechet_distance", "real_frechet", "train_s"):
            vals = [r[key] for r in rs]
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def _plot(summary: list[dict], prov: dict, out: Path) -> None:
    fig, (acc, fd) = common.figure(8, 3.2, ncols=2)
    labels = [r["config"].replace(" (end to end)", "\n(end to end)") for r in summary]
    y = range(len(summary))
    acc.barh(y, [r["sample_accuracy"] for r in summary], xerr=[r["sample_accuracy_std"] for r in summary])
    acc.set_yticks(list(y), labels, fontsize=8)
    acc.invert_yaxis()
    acc.set_xlim(min(r["sample_accuracy"] for r in summary) - 0.05, 1.0)
    acc.set_xlabel("sample accuracy (higher is better)")
    fd.barh(y, [r["frechet_distance"] for r in summary], xerr=[r["frechet_distance_std"] for r in summary])
    fd.axvline(summary[0]["real_frechet"], color="grey", ls="--", label="real-data floor")
    fd.set_yticks(list(y), [""] * len(summary))
    fd.invert_yaxis()
    fd.set_xlabel("Frechet distance (lower is better)")
    fd.legend(fontsize=8)
    fig.suptitle("DiT on digits: block-wise vs end to end, equal layer evaluations", fontsize=9)
    common.save_figure(fig, "quality_digits", prov, out)


def _markdown(summary: list[dict], settings: dict, prov: dict) -> str:
    lines = [
        "# DiT on digits: block-wise vs end-to-end training",
        "",
        f"{prov['device']}; torch {prov['versions']['torch']}; commit {prov['commit']}; {prov['date']}.",
        f"Command: `{prov['command']}`.",
        f"Every block trains {settings['steps_per_block']} steps (equal total layer evaluations for all B); "
        f"{settings['per_class']} samples per class, {settings['sampler']} {settings['num_steps']} steps, "
        f"guidance {settings['cfg_scale']}; mean ± std over seeds {settings['seeds']}.",
        "",
        "| configuration | sample accuracy (higher) | Frechet distance (lower) | real-data floor | train s |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['config']} | {r['sample_accuracy']:.3f} ± {r['sample_accuracy_std']:.3f} | "
            f"{r['frechet_distance']:.2f} ± {r['frechet_distance_std']:.2f} | {r['real_frechet']:.2f} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
