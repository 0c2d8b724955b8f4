"""Does block-wise training match end-to-end training for classification? The paper's ViT row (PAPER.md)
scaled to the built-in digits: a 12-layer ViT (hidden 64, 4 heads, patch 2 on 8x8 images), end to end with
plain cross-entropy against DiffusionBlocks with B = 3 blocks of 4 layers, at equal total layer evaluations
(the baseline takes steps_per_block steps of 12 layers; each block takes steps_per_block steps of 4).

    python benchmarks/quality_vit.py             # the full comparison
    python benchmarks/quality_vit.py --quick     # a smoke run of the pipeline (under 2 minutes on a CPU)

Writes results/quality_vit-<device>.json and .md: test accuracy (digits' held-out 20%), steps, layer
evaluations and wall time of both. DiffusionBlocks predicts with one denoising step per block
(tasks.classification.predict, sigmas="middle"); "boundary sigmas" is the same at each block's upper
boundary, "first block alone" block 0's argmax at sigma_max, for reference.
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
from dblocks_fast.tasks.classification import (  # noqa: E402
    ImageClassification,
    evaluate_accuracy,
    train_baseline,
)

MODEL = dict(hidden=64, heads=4, num_layers=12, patch_size=2, emb_dim=64)
TRAIN = dict(num_blocks=3, batch_size=128, lr=1e-3, warmup=100)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-per-block", type=int, default=1000, help="optimizer steps of every block")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    ap.add_argument("--max-weight", type=float, default=1e3, help="clamp of w(sigma); <= 0 means no clamp")
    ap.add_argument("--label-scale", type=float, default=1.0, help="length of the label table's rows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny run: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for the JSON and markdown")
    return ap.parse_args(argv)


def _first_block_accuracy(model, data, seed: int) -> float:
    """Block 0 alone: its argmax at sigma_max from pure noise (what the chain's first step predicts)."""
    task, dev = model.task, model.device
    g = dbf.rng.generator("cpu", seed, dbf.rng.SAMPLE)
    z = torch.randn(task.sample_shape(len(data)), generator=g) * model.schedule.sigma_max
    sigma = torch.full((len(data),), model.schedule.sigma_max, device=dev)
    with torch.no_grad():
        logits = task.logits(model.blocks[0], z.to(dev), sigma, data.images.to(dev))
    return float((logits.argmax(-1).cpu() == data.labels).float().mean())


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_cfg = dict(TRAIN)
    if args.quick:
        args.steps_per_block, args.seeds = 100, [0]
        train_cfg.update(batch_size=64, warmup=10)
        # a model this small runs several times faster on one thread than on two busy ones
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    prov = common.provenance(device)
    train_data, test_data = dbf.data.load_digits("train"), dbf.data.load_digits("test")
    max_weight = args.max_weight if args.max_weight > 0 else None
    task = ImageClassification.for_data(
        train_data, **MODEL, max_weight=max_weight, label_scale=args.label_scale
    )
    b, layers = train_cfg["num_blocks"], task.num_layers
    runs = []
    for seed in args.seeds:
        cfg = dbf.TrainConfig(
            **train_cfg,
            steps_per_block=args.steps_per_block,
            seed=seed,
            device=str(device),
            progress=False,
            out_dir=None,
        )
        t0 = time.perf_counter()
        baseline = train_baseline(task, train_data, cfg)
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = dbf.train(task, train_data, cfg)
        blocks_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = evaluate_accuracy(model, test_data, seed=seed)
        predict_s = time.perf_counter() - t0
        evals = args.steps_per_block * layers  # the same for both: the point of the comparison
        base_acc = evaluate_accuracy(baseline, test_data)
        first_acc = _first_block_accuracy(model, test_data, seed)
        boundary_acc = evaluate_accuracy(model, test_data, seed=seed, sigmas="boundary")
        runs.append(_run("end to end", seed, args.steps_per_block, evals, base_s, base_acc))
        runs.append(
            _run(
                f"DiffusionBlocks B={b}",
                seed,
                b * args.steps_per_block,
                evals,
                blocks_s,
                acc,
                predict_s=predict_s,
                first_block_accuracy=first_acc,
                boundary_accuracy=boundary_acc,
            )
        )
        for r in runs[-2:]:
            print(
                f"{r['config']:24s} seed {seed}: test accuracy {r['test_accuracy']:.3f}  "
                f"train {r['train_s']:.1f}s",
                flush=True,
            )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(model=task.to_dict(), train=train_cfg, inference_steps=b, inference_sigmas="middle")
    record = {"quick": args.quick, "settings": settings, "summary": _summarise(runs), "runs": runs}
    md = "\n".join(
        [*common.header("ViT on digits: block-wise vs end-to-end", prov, args.quick), *table(record)]
    )
    path = common.write("quality_vit", prov, record, md + "\n", args.out)
    _plot(record, prov, args.out)
    print(md)
    print(f"wrote {path}")
    return record


def _run(config, seed, steps, layer_evaluations, train_s, test_accuracy, **extra) -> dict:
    return {
        "config": config,
        "seed": seed,
        "steps": steps,
        "layer_evaluations": layer_evaluations,
        "train_s": train_s,
        "test_accuracy": test_accuracy,
        **extra,
    }


def _summarise(runs: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == name]
        row = {k: rs[0][k] for k in ("config", "steps", "layer_evaluations")}
        row["seeds"] = len(rs)
        for key in ("test_accuracy", "train_s", "first_block_accuracy", "boundary_accuracy"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = statistics.fmean(vals)
                row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def _plot(record: dict, prov: dict, out: Path) -> None:
    """Test accuracy of each configuration (mean over seeds, with the std as error bar)."""
    fig, ax = common.figure()
    rows = record["summary"]
    names = [r["config"] for r in rows]
    ax.bar(names, [r["test_accuracy"] for r in rows], yerr=[r["test_accuracy_std"] for r in rows], capsize=4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_title("ViT on digits, equal layer evaluations", fontsize=9)
    common.save_figure(fig, "quality_vit", prov, out)


def table(record: dict) -> list[str]:
    """The results as a markdown table (also used by the results page)."""
    s = record["settings"]
    cfg = s["model"]["config"]
    lines = [
        f"ViT {cfg['num_layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, patch "
        f"{cfg['patch_size']}; label table {cfg['num_classes']} x {cfg['emb_dim']}, w clamp "
        f"{cfg['max_weight']}, row length {cfg.get('label_scale', 1.0)}; every block trains "
        f"{s['steps_per_block']} steps (equal layer evaluations); "
        f"inference: one step per block at sigma_max, then each block's geometric middle ('boundary sigmas': "
        f"at the upper boundaries instead); mean ± std over seeds {s['seeds']}.",
        "",
        "| configuration | test accuracy | boundary sigmas | first block alone | optimizer steps "
        "| layer evaluations | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["summary"]:
        first, bound = (
            f"{r[k]:.3f}" if k in r else "-" for k in ("first_block_accuracy", "boundary_accuracy")
        )
        lines.append(
            f"| {r['config']} | {r['test_accuracy']:.3f} ± {r['test_accuracy_std']:.3f} | {bound} | "
            f"{first} | {r['steps']} | {r['layer_evaluations']} | {r['train_s']:.1f} |"
        )
    return lines


if __name__ == "__main__":
    main()
