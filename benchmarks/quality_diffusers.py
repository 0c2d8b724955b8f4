"""Fine-tuning a pretrained diffusers DiT with LoRA: block-wise vs end to end, at equal layer evaluations.

    python benchmarks/quality_diffusers.py            # CPU: about 15 minutes
    python benchmarks/quality_diffusers.py --quick    # a pipeline check (tiny, a minute)

1. Pretrain: a DiTTransformer2DModel (diffusers' class, 6 layers of width 64, patch 2 on the 8x8 digits) is
   trained end to end with flow matching on the digits of classes 0-8 (class 9 held back) and saved with
   save_pretrained: the "pretrained checkpoint".
2. Fine-tune it on class 9 alone, through dblocks_fast.integrations.diffusers with LoRA (rank 8 on the
   attention and feed-forward projections): end to end (B = 1) and block-wise (B = 2, 3), every block the
   same steps, so every configuration evaluates the same number of layers. Two seeds.
3. Judge the result on class 9: samples of class 9 (the package's Heun sampler, guidance 1.5) scored by the
   digits judge (sample accuracy: the share the judge reads as a 9; Frechet distance to the real test 9s in
   its features), and the flow-matching loss of the whole model on the real test 9s (velocity error at 32
   fixed levels of t, the noise and levels fixed, each level by the block that owns it).

Floors: the pretrained model before fine-tuning (it never saw a 9), and the real-data Frechet distance (real
training 9s against the test 9s). A row that does not beat the pretrained model is marked "not learned".

Writes results/quality_diffusers-<device>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import dblocks_fast as dbf  # noqa: E402
from benchmarks import common  # noqa: E402
from dblocks_fast.quality import frechet_distance, train_classifier  # noqa: E402

FACTORY = "dblocks_fast.integrations.diffusers:transformer"
HELD_BACK = 9
LORA = {"rank": 8, "targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
CONFIGS = [("LoRA, B=1 (end to end)", 1), ("LoRA, B=2", 2), ("LoRA, B=3", 3)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--steps-per-block", type=int, default=400, help="fine-tuning steps of every block")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--samples", type=int, default=100, help="samples of the held-back class")
    ap.add_argument("--num-steps", type=int, default=12)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    return ap.parse_args(argv)


def _only(data, keep) -> dbf.data.ImageData:
    return data.subset(np.flatnonzero(np.isin(data.labels.numpy(), keep)), f"{data.name}-{list(keep)}")


def _config(num_blocks, steps, seed, **kw) -> dbf.TrainConfig:
    base = dict(
        num_blocks=num_blocks, steps_per_block=steps, batch_size=32, lr=1e-3, warmup=min(50, steps // 4 or 1),
        process="flow", seed=seed, device="cpu", progress=False, out_dir=None,
    )  # fmt: skip
    return dbf.TrainConfig(**{**base, **kw})


def pretrain(folder: Path, train, steps: int) -> float:
    """A DiT trained end to end on classes 0-8, saved with save_pretrained into `folder`; returns seconds."""
    import diffusers

    torch.manual_seed(0)
    init = diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=6,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    init.save_pretrained(folder / "init")
    task = dbf.CustomTask.for_data(train, FACTORY, {"path": str(folder / "init")})
    t0 = time.perf_counter()
    model = dbf.train(task, _only(train, range(HELD_BACK)), _config(1, steps, 0, lr=1e-3, warmup=100))
    model.blocks[0].model.save_pretrained(folder / "pretrained")
    return time.perf_counter() - t0


@torch.no_grad()
def flow_loss(model, data, seed: int = 1234, levels: int = 32) -> float:
    """The velocity error of the whole model on `data` at `levels` fixed levels (the training density's
    quantiles), each by the block that owns it; the noise is fixed by `seed`."""
    process = model.schedule
    g = torch.Generator().manual_seed(seed)
    y, labels = data.images.float(), data.labels
    ts = process.icdf((torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    total = 0.0
    for t in ts:
        eps = torch.randn(y.shape, generator=g)
        level = t.expand(len(y)).clone()
        z = process.noisy(y, eps, level)
        d = model.denoise(z, level, labels)
        v_pred = (z - d) / float(t)
        total += float((v_pred - (eps - y)).square().mean())
    return total / levels


def judge_class(model, judge, real_test, real_train, n: int, args, seed: int) -> dict:
    """Samples of the held-back class: the judge's accuracy on them and their Frechet distance to the real
    test images of it (in the judge's features)."""
    labels = torch.full((n,), HELD_BACK, dtype=torch.long)
    images = dbf.sample(
        model, labels, num_steps=args.num_steps, sampler="heun", cfg_scale=args.cfg_scale, seed=seed
    )
    with torch.no_grad():
        feats = judge.features(images).numpy()
        pred = judge(images).argmax(1).numpy()
        real = judge.features(real_test.images).numpy()
        floor = frechet_distance(judge.features(real_train.images).numpy(), real)
    return {
        "sample_accuracy": float((pred == HELD_BACK).mean()),
        "frechet_distance": frechet_distance(feats, real),
        "real_frechet": floor,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps_per_block, args.seeds, args.samples = 20, 4, [0], 16
    prov = common.provenance(torch.device("cpu"))
    train, test = dbf.data.load_digits("train"), dbf.data.load_digits("test")
    train9, test9 = _only(train, [HELD_BACK]), _only(test, [HELD_BACK])
    judge = train_classifier(train, steps=50 if args.quick else 1500)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pretrain_s = pretrain(folder, train, args.pretrain_steps)
        path = str(folder / "pretrained")
        print(f"pretrained on classes 0-8: {args.pretrain_steps} steps, {pretrain_s:.0f} s", flush=True)
        # the floor: the pretrained model, never fine-tuned (every block of a B=1 run, 0 steps)
        lora_task = dbf.CustomTask.for_data(train9, FACTORY, {"path": path, "lora": LORA})
        for label, b in [("pretrained, not fine-tuned", 1), *CONFIGS]:
            for seed in args.seeds if label != "pretrained, not fine-tuned" else args.seeds[:1]:
                steps = 0 if label.startswith("pretrained") else args.steps_per_block
                t0 = time.perf_counter()
                if steps:
                    model = dbf.train(lora_task, train9, _config(b, steps, seed))
                else:
                    full = dbf.CustomTask.for_data(train9, FACTORY, {"path": path})
                    model = dbf.BlockModel.create(full, full.noise_process(_config(1, 1, 0).noise, 1), [6], 0)
                train_s = time.perf_counter() - t0
                r = judge_class(model.eval(), judge, test9, train9, args.samples, args, seed)
                r["flow_loss"] = flow_loss(model, test9)
                runs.append({"config": label, "num_blocks": b, "seed": seed, "train_s": train_s, **r})
                print(
                    f"{label:28s} seed {seed}: accuracy {r['sample_accuracy']:.3f}  Frechet "
                    f"{r['frechet_distance']:.2f} (floor {r['real_frechet']:.2f})  flow loss "
                    f"{r['flow_loss']:.4f}  train {train_s:.0f}s",
                    flush=True,
                )
    summary = _summarise(runs)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(lora=LORA, pretrain_s=pretrain_s, held_back=HELD_BACK)
    record = {"quick": args.quick, "settings": settings, "summary": summary, "runs": runs}
    md = _markdown(summary, settings, prov)
    out = common.write("quality_diffusers", prov, record, md, args.out)
    _plot(summary, prov, args.out)
    print(md)
    print(f"wrote {out}")
    return record


def _summarise(runs: list[dict]) -> list[dict]:
    out, floor = [], None
    for label in dict.fromkeys(r["config"] for r in runs):
        rs = [r for r in runs if r["config"] == label]
        row = {"config": label, "num_blocks": rs[0]["num_blocks"], "seeds": len(rs)}
        for key in ("sample_accuracy", "frechet_distance", "real_frechet", "flow_loss", "train_s"):
            vals = [r[key] for r in rs]
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        floor = floor or row
        row["learned"] = row is floor or (
            row["frechet_distance"] < floor["frechet_distance"] and row["flow_loss"] < floor["flow_loss"]
        )
        out.append(row)
    return out


def _markdown(summary: list[dict], settings: dict, prov: dict) -> str:
    lines = common.header(
        "Fine-tuning a pretrained diffusers DiT with LoRA: block-wise vs end to end", prov, settings["quick"]
    )
    return "\n".join(lines + table({"settings": settings, "summary": summary}))


def table(record: dict) -> list[str]:
    """What was run and the table (also used by the results page)."""
    summary, settings = record["summary"], record["settings"]
    lines = [
        f"DiTTransformer2DModel (6 layers, width 64) pretrained end to end with flow matching on digits 0-8 "
        f"({settings['pretrain_steps']} steps), then fine-tuned on the held-back class {HELD_BACK} with LoRA "
        f"(rank {LORA['rank']}, {', '.join(LORA['targets'])}), {settings['steps_per_block']} steps a block "
        f"(equal layer evaluations); scored on class {HELD_BACK}: {settings['samples']} samples (Heun, "
        f"{settings['num_steps']} steps, guidance {settings['cfg_scale']}); mean ± std over seeds "
        f"{settings['seeds']}.",
        "",
        "| configuration | sample accuracy (higher) | Frechet distance (lower) | real-data floor | flow loss "
        "on test 9s (lower) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        mark = "" if r["learned"] else " **not learned**"
        lines.append(
            f"| {r['config']}{mark} | {r['sample_accuracy']:.3f} ± {r['sample_accuracy_std']:.3f} | "
            f"{r['frechet_distance']:.2f} ± {r['frechet_distance_std']:.2f} | {r['real_frechet']:.2f} | "
            f"{r['flow_loss']:.4f} ± {r['flow_loss_std']:.4f} | {r['train_s']:.0f} |"
        )
    lines += [
        "",
        'The first row is the floor: the pretrained model, never shown a 9. A row is "not learned" unless '
        "it beats that floor in both Frechet distance and flow loss.",
        "",
    ]
    return lines


def _plot(summary: list[dict], prov: dict, out: Path) -> None:
    fig, (fd, loss) = common.figure(8, 3.0, ncols=2)
    y = range(len(summary))
    labels = [r["config"] for r in summary]
    fd.barh(y, [r["frechet_distance"] for r in summary], xerr=[r["frechet_distance_std"] for r in summary])
    fd.axvline(summary[0]["real_frechet"], color="grey", ls="--", label="real-data floor")
    fd.set_yticks(list(y), labels, fontsize=8)
    fd.invert_yaxis()
    fd.set_xlabel(f"Frechet distance, class {HELD_BACK} (lower is better)")
    fd.legend(fontsize=8)
    loss.barh(y, [r["flow_loss"] for r in summary], xerr=[r["flow_loss_std"] for r in summary])
    loss.set_yticks(list(y), [""] * len(summary))
    loss.invert_yaxis()
    loss.set_xlabel("flow loss on test 9s (lower is better)")
    fig.suptitle("LoRA fine-tuning of a pretrained diffusers DiT to a held-back class", fontsize=9)
    common.save_figure(fig, "quality_diffusers", prov, out)


if __name__ == "__main__":
    main()
