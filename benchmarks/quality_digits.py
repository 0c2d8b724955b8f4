"""Does block-wise training match end-to-end training? DiT on the built-in digits, B = 1, 2, 3, 4 at equal
total layer evaluations (every B trains each block for the same steps, so B blocks x steps x L/B layers is
the same for all), and the equi-probability partition against the uniform one at B = 3. With --flow: the
same question for flow matching (rectified flow), B = 1 and 3, beside EDM's B = 1 and 3 in the same run.

    python benchmarks/quality_digits.py                      # the full comparison (CPU: about an hour)
    python benchmarks/quality_digits.py --flow               # EDM and flow, B = 1 and 3 (CPU: 30-50 min)
    python benchmarks/quality_digits.py --configs b3 flow-b3 # any configurations by name (see CONFIGS)
    python benchmarks/quality_digits.py --quick              # a smoke run of the whole pipeline in a minute

Writes results/quality_digits-<device>.json, .md and .png (--flow: quality_digits_flow-<device>.*; another
--configs list: quality_digits_subset-<device>.*, so a partial run never overwrites a full table). Figures
(dblocks_fast.quality): sample accuracy under a fixed classifier trained on the real training digits, and
the Frechet distance of its features between generated and held-out real digits, next to the same distance
for real training digits (the floor).
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

CONFIGS = {  # name: (label, num_blocks, partition, noise process)
    "b1": ("B=1 (end to end)", 1, "equiprob", "edm"),
    "b2": ("B=2", 2, "equiprob", "edm"),
    "b3": ("B=3", 3, "equiprob", "edm"),
    "b4": ("B=4", 4, "equiprob", "edm"),
    "b3-uniform": ("B=3, uniform partition", 3, "uniform", "edm"),
    "flow-b1": ("flow B=1 (end to end)", 1, "equiprob", "flow"),
    "flow-b3": ("flow B=3", 3, "equiprob", "flow"),
}
# preset: (configurations, the record's name); "edm" is the default and keeps the original table's name
PRESETS = {
    "edm": (["b1", "b2", "b3", "b4", "b3-uniform"], "quality_digits"),
    "flow": (["b1", "b3", "flow-b1", "flow-b3"], "quality_digits_flow"),
}
CHANCE_TIMES = 2  # a row whose sample accuracy is under this many times chance is marked "not learned"


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
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["edm"],
        choices=[*PRESETS, *CONFIGS],
        help="configurations to run, by name or preset (a preset expands to its list); default: edm",
    )
    ap.add_argument("--flow", action="store_true", help="same as --configs flow: EDM and flow, B = 1 and 3")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for the JSON and markdown")
    args = ap.parse_args(argv)
    if args.flow:
        args.configs = ["flow"]
    return args


def selected(names: list[str]) -> tuple[list[str], str]:
    """The configurations `names` (presets expanded, in order, each once) and the record's name."""
    if len(names) == 1 and names[0] in PRESETS:
        return PRESETS[names[0]]
    out = []
    for n in names:
        for c in PRESETS[n][0] if n in PRESETS else [n]:
            if c not in out:
                out.append(c)
    return out, "quality_digits_subset"


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
    names, record_name = selected(args.configs)
    judge = train_classifier(train_data, steps=50 if args.quick else 1500)
    runs = []
    for name in names:
        label, b, partition, process = CONFIGS[name]
        for seed in args.seeds:
            cfg = dbf.TrainConfig(
                **{
                    **preset.train_defaults,
                    "num_blocks": b,
                    "partition": partition,
                    "process": process,
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
                    "name": name,
                    "num_blocks": b,
                    "partition": partition,
                    "process": process,
                    "seed": seed,
                    "train_s": train_s,
                    "sample_s": time.perf_counter() - t0,
                    **r,
                }
            )
            print(
                f"{name:10s} {label:24s} seed {seed}: accuracy {r['sample_accuracy']:.3f}  Frechet "
                f"{r['frechet_distance']:.2f} (floor {r['real_frechet']:.2f})  train {train_s:.0f}s",
                flush=True,
            )
    summary = _summarise(runs, names, train_data.num_classes)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(model=task.to_dict(), train=preset.train_defaults, configs=names)
    record = {"quick": args.quick, "settings": settings, "summary": summary, "runs": runs}
    md = _markdown(summary, settings, prov)
    path = common.write(record_name, prov, record, md, args.out)
    _plot(summary, prov, args.out, record_name)
    print(md)
    print(f"wrote {path}")
    return record


def _summarise(runs: list[dict], names: list[str], num_classes: int) -> list[dict]:
    out = []
    for name in names:
        label, b, partition, process = CONFIGS[name]
        rs = [r for r in runs if r["name"] == name]
        row = {"config": label, "name": name, "num_blocks": b, "partition": partition, "process": process}
        row["seeds"] = len(rs)
        for key in ("sample_accuracy", "frechet_distance", "real_frechet", "train_s"):
            vals = [r[key] for r in rs]
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["learned"] = row["sample_accuracy"] >= CHANCE_TIMES / num_classes
        out.append(row)
    return out


def _plot(summary: list[dict], prov: dict, out: Path, name: str) -> None:
    fig, (acc, fd) = common.figure(8, 3.2, ncols=2)
    labels = [_label(r, summary).replace(" **not learned**", "\n(not learned)") for r in summary]
    labels = [x.replace(" (end to end)", "\n(end to end)") for x in labels]
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
    what = "EDM and flow matching" if _mixed(summary) else "block-wise vs end to end"
    fig.suptitle(f"DiT on digits: {what}, equal layer evaluations", fontsize=9)
    common.save_figure(fig, name, prov, out)


def _mixed(summary: list[dict]) -> bool:
    """Whether the rows train with more than one noise process (then every label names its process)."""
    return len({r.get("process", "edm") for r in summary}) > 1  # records before flow have no "process"


def _label(r: dict, summary: list[dict]) -> str:
    flag = "" if r.get("learned", True) else " **not learned**"
    if _mixed(summary) and r.get("process", "edm") == "edm":
        return "EDM " + r["config"] + flag
    return r["config"] + flag


def table(record: dict) -> list[str]:
    """The results page's table: each row against the end-to-end (B = 1) row of its own noise process."""
    summary = record["summary"]
    base = {r.get("process", "edm"): r["frechet_distance"] for r in summary if r["num_blocks"] == 1}
    lines = [
        "| configuration | Frechet distance / end to end | sample accuracy | Frechet distance | floor |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {_label(r, summary)} | {r['frechet_distance'] / base[r.get('process', 'edm')]:.2f} | "
            f"{r['sample_accuracy']:.3f} | {r['frechet_distance']:.2f} | {r['real_frechet']:.2f} |"
        )
    return lines


def _markdown(summary: list[dict], settings: dict, prov: dict) -> str:
    mixed = _mixed(summary)
    title = "EDM and flow matching" if mixed else "block-wise vs end-to-end training"
    lines = [
        f"# DiT on digits: {title}",
        "",
        f"{prov['device']}; torch {prov['versions']['torch']}; commit {prov['commit']}; {prov['date']}.",
        f"Command: `{prov['command']}`.",
        f"Every block trains {settings['steps_per_block']} steps (equal total layer evaluations for all B); "
        f"{settings['per_class']} samples per class, {settings['sampler']} {settings['num_steps']} steps, "
        f"guidance {settings['cfg_scale']}; mean ± std over seeds {settings['seeds']}.",
    ]
    if mixed:
        lines.append(
            "Noise process: EDM, or flow matching (rectified flow with NoiseConfig's defaults: velocity "
            "prediction, logit-normal t with mean 0 and std 1, no shift); all rows ran in this one run."
        )
    floor = summary[0]["real_frechet"]
    lines.append(
        f"Real-data floor: {floor:.2f}, the Frechet distance of as many real training digits (no generator "
        "is expected below it)."
    )
    if not all(r.get("learned", True) for r in summary):
        lines.append(
            f"**not learned**: a row whose sample accuracy is under {CHANCE_TIMES}x chance; its Frechet "
            "distance says nothing about the method."
        )
    lines += [
        "",
        "| configuration | sample accuracy (higher) | Frechet distance (lower) | real-data floor | train s |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {_label(r, summary)} | {r['sample_accuracy']:.3f} ± {r['sample_accuracy_std']:.3f} | "
            f"{r['frechet_distance']:.2f} ± {r['frechet_distance_std']:.2f} | {r['real_frechet']:.2f} | "
            f"{r['train_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
