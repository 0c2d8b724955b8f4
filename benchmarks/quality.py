"""Does block-wise training match end-to-end training across the paper's transformer families? One table,
one row per task: the end-to-end baseline against DiffusionBlocks at equal total layer evaluations (every
block takes as many optimizer steps as the baseline takes in all), on built-in data, scaled to a CPU.

    python benchmarks/quality.py --task ar mdm recurrent   # train and score them (minutes each on a CPU)
    python benchmarks/quality.py --quick                   # a smoke run of the pipeline (about a minute)

Tasks trained here:
  ar   byte-level autoregressive LM on the Python standard library (preset pystdlib-ar, B = 4, gamma 0.1):
       validation bits per byte of block 0 alone at sigma_max (lower is better; a likelihood from 1/B of
       the layers), against the same transformer trained as a plain causal LM, and beside it a causal LM of
       block 0's layers; the last denoising step's cross-entropy (a sampler's, no likelihood) and argmax
       accuracies; plus a generative score: bits per byte of continuations under the baseline and under a
       trigram model of the training text, and the fraction of prompt + continuation that tokenize reads.
  mdm  byte-level masked diffusion LM (MD4, alpha(t) = 1 - t; preset pystdlib-mdm, B = 3): the validation
       ELBO in bits per byte (lower), against the same model trained end to end (B = 1).
  recurrent  recurrent depth (preset pystdlib-recurrent): 2 + 4 + 2 layers trained as one denoiser (B = 1)
       against a Huginn-style recurrent LM (core applied K times, mean 8, truncated backprop); validation bits
       per byte (the denoiser's one-step prediction vs the recurrent LM at K = 8) and training compute.
Rows read from the other quality scripts' records in the same folder (run those scripts to refresh them):
  vit  quality_vit: test accuracy of the ViT classifier on digits (higher is better).
  dit  quality_digits: Frechet distance of the class-conditional DiT's samples on digits (lower).

Writes results/quality-<device>.json and .md. A task's row is replaced when it is run again, the others are
kept, and every row records its own commit, date and command.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import dblocks_fast as dbf  # noqa: E402
from benchmarks import common  # noqa: E402

TRAINED = ("ar", "mdm", "recurrent")
FROM_RECORDS = {"vit": "quality_vit", "dit": "quality_digits"}
ORDER = ("dit", "vit", "ar", "mdm", "recurrent")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", nargs="+", choices=TRAINED, default=list(TRAINED), help="tasks to train")
    ap.add_argument("--steps-per-block", type=int, help="optimizer steps of every block (default: preset's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    ap.add_argument("--eval-windows", type=int, default=1024, help="validation windows scored")
    ap.add_argument(
        "--data",
        type=Path,
        help="ar, mdm: a text file or folder instead of the standard library, or the built-in pydoc-topics "
        "(English prose of Python's help() topics); rows named task@name",
    )
    ap.add_argument("--batch-size", type=int, help="sequences a step, every model (default: preset's)")
    ap.add_argument("--warmup", type=int, help="warm-up steps of every block (default: preset's)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: preset's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny run: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for the JSON and markdown")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="train nothing: rewrite the markdown and plot from the JSON record in --out",
    )
    return ap.parse_args(argv)


def _config(preset, args, seed: int, device: torch.device, quick_overrides: dict) -> dbf.TrainConfig:
    cfg = dict(preset.train_defaults)
    if args.quick:
        cfg.update(quick_overrides)
    if args.steps_per_block:
        cfg["steps_per_block"] = args.steps_per_block
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    if args.warmup is not None:
        cfg["warmup"] = args.warmup
    if args.lr is not None:
        cfg["lr"] = args.lr
    return dbf.TrainConfig(**cfg, seed=seed, device=str(device), progress=False, out_dir=None)


@torch.no_grad()
def _accuracy(data, windows, logits_of) -> float:
    """Argmax accuracy of next-byte predictions over the bytes bits_per_byte scores (s_1..s_{T-1} of each
    window); logits_of(tokens) -> (N, T - 1, 256) logits whose position i predicts tokens[:, i + 1]."""
    from dblocks_fast.tasks.text import eval_windows

    idx = eval_windows(data, windows)
    hits = total = 0
    for lo in range(0, len(idx), 64):
        tokens = data.batch(idx[lo : lo + 64])["tokens"]
        pred = logits_of(tokens).float().argmax(-1).cpu()
        hits += int((pred == tokens[:, 1:]).sum())
        total += tokens[:, 1:].numel()
    return hits / total


def _causal_logits(lm, device, tokens):
    return lm(tokens.to(device))[:, :-1]


def _chain_logits(model, sigmas, seed, tokens):
    from dblocks_fast.tasks.autoregressive import token_logits

    return token_logits(model, tokens, sigmas, seed=seed)[:, 1:]


def run_ar(args, device: torch.device) -> dict:
    from dblocks_fast.quality import NgramJudge, generative_score
    from dblocks_fast.tasks import PRESETS
    from dblocks_fast.tasks.autoregressive import baseline_bits_per_byte, bits_per_byte, train_baseline

    preset = PRESETS["pystdlib-ar"]
    train_data, val_data = preset.load_data(args.data, "train"), preset.load_data(args.data, "test")
    overrides = {}
    if args.quick:
        overrides = dict(hidden=16, heads=2, num_layers=4, emb_dim=16)
    task = preset.make_task(train_data, **overrides)
    windows = min(args.eval_windows, len(val_data))
    gen = dict(num=8, new_len=8) if args.quick else dict(num=64, new_len=32)
    judge = NgramJudge(train_data.data, order=3)  # fitted on the training text: favours neither model
    runs = []
    for seed in args.seeds:
        cfg = _config(preset, args, seed, device, dict(steps_per_block=20, batch_size=16, warmup=2))
        first_sigmas = [cfg.noise.sigma_max, 0]
        t0 = time.perf_counter()
        baseline = train_baseline(task, train_data, cfg)
        base_s = time.perf_counter() - t0
        # block 0's peer: a causal LM with block 0's layers (L/B), the same steps
        small = train_baseline(task, train_data, cfg, num_layers=task.num_layers // cfg.num_blocks)
        t0 = time.perf_counter()
        model = dbf.train(task, train_data, cfg)
        blocks_s = time.perf_counter() - t0
        base_bpb = baseline_bits_per_byte(baseline, val_data, max_windows=windows)
        small_bpb = baseline_bits_per_byte(small, val_data, max_windows=windows)
        t0 = time.perf_counter()
        last_bpb = bits_per_byte(model, val_data, max_windows=windows, seed=seed)
        eval_s = time.perf_counter() - t0
        # block 0 alone at sigma_max: its logits are a predictive distribution given the context only (a
        # likelihood); the chain's last step is a sampler's (see the markdown note), so this is the row's
        first_bpb = bits_per_byte(model, val_data, max_windows=windows, seed=seed, sigmas=first_sigmas)
        accuracy = {
            "end to end": _accuracy(val_data, windows, functools.partial(_causal_logits, baseline, device)),
            "causal LM of block 0's layers": _accuracy(
                val_data, windows, functools.partial(_causal_logits, small, device)
            ),
            "block 0 alone": _accuracy(
                val_data, windows, functools.partial(_chain_logits, model, first_sigmas, seed)
            ),
            "last step (one per block)": _accuracy(
                val_data, windows, functools.partial(_chain_logits, model, "middle", seed)
            ),
        }
        score = functools.partial(generative_score, baseline=baseline, data=val_data, seed=seed, ngram=judge,
                                  **gen)  # fmt: skip
        generative = {
            "data (reference)": score(None),
            "end to end, greedy": score(baseline),
            "end to end, temperature 1": score(baseline, temperature=1.0),
            f"DiffusionBlocks B={cfg.num_blocks}, one step per block, greedy": score(model),
            f"DiffusionBlocks B={cfg.num_blocks}, one step per block, temperature 1": score(
                model, temperature=1.0
            ),
            "DiffusionBlocks block 0 alone, temperature 1": score(
                model, temperature=1.0, sigmas=first_sigmas
            ),
        }
        runs.append(
            dict(
                seed=seed,
                baseline=base_bpb,
                blocks=first_bpb,
                blocks_first_block=first_bpb,
                blocks_last_step=last_bpb,
                baseline_block0_layers=small_bpb,
                accuracy=accuracy,
                baseline_train_s=base_s,
                blocks_train_s=blocks_s,
                blocks_eval_s=eval_s,
                generative=generative,
            )
        )
        print(
            f"ar seed {seed}: bits/byte end to end {base_bpb:.3f}, block 0 alone {first_bpb:.3f}, causal LM "
            f"of block 0's layers {small_bpb:.3f}, blocks (last step) {last_bpb:.3f}; accuracy {accuracy}",
            flush=True,
        )
    return _row(
        "ar",
        "pystdlib-ar",
        task,
        cfg,
        runs,
        "validation bits per byte (DiffusionBlocks: block 0 alone at sigma_max, 1/B of the layers)",
        "lower",
        windows,
        gen=gen,
        data=val_data,
    )


def run_recurrent(args, device: torch.device) -> dict:
    from dblocks_fast.tasks import PRESETS, RECURRENT_ITERATIONS
    from dblocks_fast.tasks.autoregressive import bits_per_byte
    from dblocks_fast.tasks.recurrent import (
        RecurrentConfig,
        diffusion_layer_evaluations,
        recurrent_bits_per_byte,
        train_recurrent_baseline,
    )

    preset = PRESETS["pystdlib-recurrent"]
    train_data, val_data = preset.load_data(None, "train"), preset.load_data(None, "test")
    width = dict(hidden=16, heads=2) if args.quick else dict(hidden=64, heads=4)
    task = preset.make_task(train_data, **width, **(dict(num_layers=3, emb_dim=16) if args.quick else {}))
    layers = (1, 1, 1) if args.quick else (2, 4, 2)
    rcfg = RecurrentConfig(
        seq_len=train_data.seq_len,
        **width,
        prelude=layers[0],
        core=layers[1],
        coda=layers[2],
        mean_iterations=RECURRENT_ITERATIONS,
        backprop_iterations=2,
    )
    windows = min(args.eval_windows, len(val_data))
    k = RECURRENT_ITERATIONS
    runs = []
    for seed in args.seeds:
        cfg = _config(preset, args, seed, device, dict(steps_per_block=20, batch_size=16, warmup=2))
        t0 = time.perf_counter()
        baseline = train_recurrent_baseline(rcfg, train_data, cfg)
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = dbf.train(task, train_data, cfg)
        blocks_s = time.perf_counter() - t0
        base_bpb = recurrent_bits_per_byte(baseline, val_data, k, max_windows=windows, seed=seed)
        # the denoiser's first step from pure noise at sigma_max is its predictive distribution given the
        # context (a likelihood); after K steps along the sigmas it is a sampler (see the ar row)
        first = bits_per_byte(
            model, val_data, max_windows=windows, seed=seed, sigmas=[cfg.noise.sigma_max, 0]
        )
        last = bits_per_byte(model, val_data, max_windows=windows, seed=seed, sigmas="boundary", num_steps=k)
        ours = diffusion_layer_evaluations(task.num_layers, cfg.steps_per_block, task.config.seq_len)
        theirs = baseline.layer_evaluations
        runs.append(
            dict(
                seed=seed,
                baseline=base_bpb,
                blocks=first,
                blocks_after_k_steps=last,
                baseline_train_s=base_s,
                blocks_train_s=blocks_s,
                # token-layer evaluations of training: layers x tokens per window, summed over steps
                baseline_token_layers_forward=theirs["forward"] * theirs["tokens_per_sequence"],
                baseline_token_layers_backprop=theirs["backprop"] * theirs["tokens_per_sequence"],
                blocks_token_layers=ours["forward"] * ours["tokens_per_sequence"],
                baseline_mean_iterations=statistics.fmean(theirs["iterations"]),
            )
        )
        print(
            f"recurrent seed {seed}: bits/byte recurrent K={k} {base_bpb:.3f}, denoiser {first:.3f}",
            flush=True,
        )
    metric = "validation bits per byte (denoiser: its one-step prediction)"
    return _row("recurrent", "pystdlib-recurrent", task, cfg, runs, metric, "lower", windows,
                data=val_data, recurrent=dict(config=vars(rcfg), iterations=k))  # fmt: skip


def run_mdm(args, device: torch.device) -> dict:
    from dblocks_fast.tasks import PRESETS
    from dblocks_fast.tasks.masked_diffusion import elbo_bits_per_byte

    preset = PRESETS["pystdlib-mdm"]
    train_data, val_data = preset.load_data(args.data, "train"), preset.load_data(args.data, "test")
    overrides = dict(hidden=16, heads=2, num_layers=3) if args.quick else {}
    task = preset.make_task(train_data, **overrides)
    windows = min(args.eval_windows, len(val_data))
    runs = []
    for seed in args.seeds:
        cfg = _config(preset, args, seed, device, dict(steps_per_block=20, batch_size=16, warmup=2))
        base_cfg = dbf.TrainConfig(**{**vars(cfg), "num_blocks": 1, "layers": None})
        t0 = time.perf_counter()
        baseline = dbf.train(task, train_data, base_cfg)
        base_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = dbf.train(task, train_data, cfg)
        blocks_s = time.perf_counter() - t0
        base_bpb = elbo_bits_per_byte(baseline, val_data, max_windows=windows, seed=seed)
        blocks_bpb = elbo_bits_per_byte(model, val_data, max_windows=windows, seed=seed)
        runs.append(dict(seed=seed, baseline=base_bpb, blocks=blocks_bpb, baseline_train_s=base_s,
                         blocks_train_s=blocks_s))  # fmt: skip
        print(
            f"mdm seed {seed}: ELBO bits/byte end to end {base_bpb:.3f}, blocks {blocks_bpb:.3f}", flush=True
        )
    metric = "validation ELBO bits per byte"
    return _row("mdm", "pystdlib-mdm", task, cfg, runs, metric, "lower", windows, data=val_data)


def _row(name, preset, task, cfg, runs, metric, better, windows, data=None, **extra) -> dict:
    """A task's row; with `data` (a language model's validation TextData) also the byte-frequency floor of
    the windows scored and whether each model learned (is more than 0.1 bits below it)."""
    from dblocks_fast.tasks.text import byte_frequency_bits, learned

    if data is not None:
        floor = byte_frequency_bits(data, windows)
        extra.update(
            data=data.name,
            floor=floor,
            baseline_learned=all(learned(r["baseline"], floor) for r in runs),
            blocks_learned=all(learned(r["blocks"], floor) for r in runs),
        )
        if not data.name.startswith("pystdlib"):
            name = f"{name}@{data.name.split('[')[0]}"

    def mean_std(key):
        vals = [r[key] for r in runs]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    (base, base_std), (blocks, blocks_std) = mean_std("baseline"), mean_std("blocks")
    return {
        "task": name,
        "preset": preset,
        "metric": metric,
        "better": better,
        "baseline": base,
        "baseline_std": base_std,
        "blocks": blocks,
        "blocks_std": blocks_std,
        "num_blocks": cfg.num_blocks,
        "steps_per_block": cfg.steps_per_block,
        "layer_evaluations": cfg.steps_per_block * task.num_layers,
        "baseline_train_s": statistics.fmean(r["baseline_train_s"] for r in runs),
        "blocks_train_s": statistics.fmean(r["blocks_train_s"] for r in runs),
        "eval_windows": windows,
        "seeds": [r["seed"] for r in runs],
        "model": task.to_dict(),
        "train": {k: v for k, v in cfg.flat().items() if k not in ("out_dir", "progress")},
        "runs": runs,
        **extra,
    }


def _rows_from_records(out: Path, quick: bool) -> list[dict]:
    """The vit and dit rows, summarised from quality_vit / quality_digits records in `out` (if present)."""
    rows = []
    for name, script in FROM_RECORDS.items():
        path = out / f"{script}-cpu.json"
        for dev in ("cuda", "cpu"):  # prefer a GPU record
            if (out / f"{script}-{dev}.json").is_file():
                path = out / f"{script}-{dev}.json"
                break
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        if bool(r.get("quick")) != quick:
            continue
        s = r["settings"]
        try:
            if name == "vit":
                base = next(x for x in r["summary"] if x["config"] == "end to end")
                blk = next(x for x in r["summary"] if x["config"] != "end to end")
                b = int(blk["config"].rsplit("=", 1)[1])
                row = dict(metric="test accuracy", better="higher", baseline=base["test_accuracy"],
                           baseline_std=base["test_accuracy_std"], blocks=blk["test_accuracy"],
                           blocks_std=blk["test_accuracy_std"], num_blocks=b,
                           steps_per_block=s["steps_per_block"], layer_evaluations=blk["layer_evaluations"],
                           baseline_train_s=base["train_s"], blocks_train_s=blk["train_s"],
                           seeds=s["seeds"])  # fmt: skip
            else:
                base = next(x for x in r["summary"] if x["num_blocks"] == 1)
                blk = next(x for x in r["summary"] if x["num_blocks"] == 3)
                row = dict(metric="Frechet distance of samples", better="lower",
                           baseline=base["frechet_distance"], baseline_std=0.0,
                           blocks=blk["frechet_distance"], blocks_std=0.0, num_blocks=3,
                           steps_per_block=s.get("steps_per_block"), layer_evaluations=None,
                           baseline_train_s=base.get("train_s"), blocks_train_s=blk.get("train_s"),
                           seeds=s.get("seeds", [s.get("seed", 0)]))  # fmt: skip
        except (KeyError, StopIteration, IndexError, ValueError):
            continue  # an older record without these fields: rerun its script
        prov = {k: r[k] for k in ("device", "commit", "date", "command", "versions")}
        rows.append({"task": name, "preset": f"digits-{name}", "source": path.name, **row, **prov})
    return rows


def render(out: Path, device_type: str = "cpu") -> dict:
    """The markdown and plot of the record out/quality-<device_type>.json rewritten from its rows (after
    rows were merged by hand, e.g. two branches' rows); the record's own provenance heads the page."""
    path = out / f"quality-{device_type}.json"
    if not path.is_file():
        raise SystemExit(f"--render-only: no record {path}; run quality.py first")
    rec = json.loads(path.read_text())
    prov = {k: v for k, v in rec.items() if k not in ("benchmark", "quick", "rows")}
    record = {"quick": rec["quick"], "rows": rec["rows"]}
    md = "\n".join([*common.header("Block-wise vs end-to-end, every task", prov, record["quick"]),
                    *table(record)])  # fmt: skip
    common.write("quality", prov, record, md + "\n", out)
    _plot(record, prov, out)
    return record


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render_only:
        return render(args.out, "cuda" if args.device == "cuda" else "cpu")
    if args.quick:
        args.seeds, args.eval_windows = [0], 32
        args.threads = args.threads or 1  # tiny models run faster on one thread than on two busy ones
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    prov = common.provenance(device)
    path = args.out / f"quality-{device.type}.json"
    rows = {}
    if path.is_file():  # keep the rows of tasks not run now (from a record of the same kind)
        old = json.loads(path.read_text())
        if bool(old.get("quick")) == args.quick:
            rows = {r["task"]: r for r in old["rows"] if r["task"].split("@")[0] in TRAINED}
    for name in args.task:
        start = time.perf_counter()
        row = {"ar": run_ar, "mdm": run_mdm, "recurrent": run_recurrent}[name](args, device)
        row.update({k: prov[k] for k in ("device", "commit", "date", "command", "versions")})
        row["wall_s"] = time.perf_counter() - start
        rows[row["task"]] = row
    rows.update({r["task"]: r for r in _rows_from_records(args.out, args.quick)})
    ordered = [rows[k] for t in ORDER for k in sorted(rows) if k.split("@")[0] == t]
    record = {"quick": args.quick, "rows": ordered}
    md = "\n".join([*common.header("Block-wise vs end-to-end, every task", prov, args.quick), *table(record)])
    out = common.write("quality", prov, record, md + "\n", args.out)
    _plot(record, prov, args.out)
    print(md)
    print(f"wrote {out}")
    return record


def _floor(r: dict) -> str:
    if "floor" in r:
        return f"{r['floor']:.3f}"
    is_lm = r["task"].split("@")[0] in TRAINED
    return "not recorded (rerun)" if is_lm else "-"


def _mark(r: dict, key: str) -> str:
    return " (not learned)" if r.get(f"{key}_learned") is False else ""


def _verdict(r: dict, fmt: str) -> str:
    """'better by' of a row, or 'not learned' when neither model is 0.1 bits below the floor."""
    if r.get("baseline_learned") is False and r.get("blocks_learned") is False:
        return "not learned"
    if "floor" not in r and r["task"].split("@")[0] in TRAINED:
        return f"{fmt.format(_gap(r))} (floor unknown)"
    return fmt.format(_gap(r))


def _batch(r: dict) -> str:
    """' (N a step)' when a row trained with another batch size than its preset's (--batch-size)."""
    from dblocks_fast.tasks import PRESETS

    preset = PRESETS.get(r["preset"])
    used = r.get("train", {}).get("batch_size")
    if preset is None or used is None or used == preset.train_defaults.get("batch_size"):
        return ""
    return f" ({used} a step)"


def _gap(r: dict) -> float:
    """DiffusionBlocks minus end to end, signed so that positive means DiffusionBlocks is better."""
    d = r["blocks"] - r["baseline"]
    return d if r["better"] == "higher" else -d


def table(record: dict) -> list[str]:
    lines = [
        "Equal total layer evaluations in training: every block takes as many optimizer steps as the "
        "end-to-end baseline takes in all. 'better by' is DiffusionBlocks' advantage (negative: it is "
        "behind). Each row has its own provenance (the JSON holds every setting).",
        "",
        "Language-model rows show the floor: the entropy of the byte frequencies of the same validation "
        "windows, what a model that knows only how often each byte occurs scores. A model within "
        "0.1 bits per byte of it has learned nothing more ('not learned'), and a row where both are is "
        "never 'equal'.",
        "",
        "| task | metric | end to end | DiffusionBlocks | B | better by | floor | steps per block | train s "
        "(e2e / blocks) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        fmt = "{:.3f}" if abs(r["baseline"]) < 100 else "{:.1f}"
        base, blocks = (
            fmt.format(r[k]) + (f" ± {fmt.format(r[k + '_std'])}" if r[k + "_std"] else "")
            for k in ("baseline", "blocks")
        )
        sign = "lower" if r["better"] == "lower" else "higher"
        train = " / ".join(
            "-" if v is None else f"{v:.0f}" for v in (r["baseline_train_s"], r["blocks_train_s"])
        )
        lines.append(
            f"| {r['task']} ({r['preset']}) | {r['metric']} ({sign} is better) | "
            f"{base}{_mark(r, 'baseline')} | {blocks}{_mark(r, 'blocks')} | {r['num_blocks']} | "
            f"{_verdict(r, fmt)} | {_floor(r)} | {r['steps_per_block']}{_batch(r)} | {train} | "
            f"{r['commit']} |"
        )
    for r in record["rows"]:
        if r["task"].split("@")[0] != "ar" or "generative" not in r["runs"][0]:
            continue
        lines += _ar_notes(r)
    for r in record["rows"]:
        if r["task"] != "recurrent":
            continue
        g, rc = r["runs"][0], r["recurrent"]
        lines += [
            "",
            f"recurrent: the baseline is a Huginn-style LM ({rc['config']['prelude']} prelude, "
            f"{rc['config']['core']} core, {rc['config']['coda']} coda layers; K drawn with mean "
            f"{rc['iterations']}, backprop through the last {rc['config']['backprop_iterations']}), scored "
            f"at K = {rc['iterations']}. DiffusionBlocks trains the same "
            f"{r['model']['config']['num_layers']} layers as one denoiser (B = 1); its row is its one-step "
            f"prediction at sigma_max, and after "
            f"K = {rc['iterations']} steps along the sampling sigmas its last logits score "
            f"{g['blocks_after_k_steps']:.3f} (a sampler, as in the ar row). Training compute in token-layer "
            f"evaluations: baseline {g['baseline_token_layers_forward']:.3g} forward, "
            f"{g['baseline_token_layers_backprop']:.3g} backward; DiffusionBlocks "
            f"{g['blocks_token_layers']:.3g} each (its sequence is doubled): "
            f"{g['baseline_token_layers_forward'] / g['blocks_token_layers']:.2f}x less forward compute.",
        ]
    return lines


def _ar_notes(r: dict) -> list[str]:
    """The notes under an ar row: what its figures are, block 0 against the causal LM of its layers, the
    argmax accuracies, and the generation table (older records: what they hold)."""
    runs, g = r["runs"], r["runs"][0]

    def mean(key, sub=None):
        vals = [(x[key] if sub is None else x[key][sub]) for x in runs]
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    def pm(v):
        return f"{v[0]:.3f}" + (f" ± {v[1]:.3f}" if v[1] else "")

    layers = r["model"]["config"]["num_layers"] // r["num_blocks"]
    lines = [""]
    if "blocks_last_step" not in g:  # a record from before the row reported block 0
        lines.append(
            f"{r['task']} (older record): its DiffusionBlocks figure is the cross-entropy of the last "
            f"denoising step's logits, a sampler's, not a likelihood. Block 0 alone at sigma_max scores "
            f"{g['blocks_first_block']:.3f} bits per byte (seed {g['seed']})"
            + (
                f", a causal LM with its {layers} layers {g['baseline_block0_layers']:.3f}."
                if "baseline_block0_layers" in g
                else "."
            )  # fmt: skip
        )
    else:
        lines.append(
            f"{r['task']}: the DiffusionBlocks figure is block 0 alone at sigma_max, where the noisy token "
            f"carries nothing: a predictive distribution of the next byte from the context, with {layers} of "
            f"the {r['model']['config']['num_layers']} layers, so a likelihood (a lower bound on what the "
            f"model can do, not its chain). A causal LM with the same {layers} layers and steps scores "
            f"{pm(mean('baseline_block0_layers'))} (its layers see the T clean bytes; block 0's see those "
            f"and T noisy tokens, twice the tokens a layer). The chain's last step (one Euler step per "
            f"block) is a sampler: one deterministic step per block sharpens D towards the byte it leans to "
            f"(with the likelihood skip its logits peak on the byte z reached), so its "
            f"cross-entropy, {pm(mean('blocks_last_step'))}, is no likelihood; its argmax accuracy is "
            f"meaningful:"
        )
        lines += ["", "| predictor | argmax accuracy of the next byte |", "|---|---|"]
        lines += [f"| {k} | {pm(mean('accuracy', k))} |" for k in g["accuracy"]]
    has_ngram = "bits_per_byte_under_ngram" in next(iter(g["generative"].values()))
    lines += [
        "",
        f"{r['task']}, generation: continuations of {r['gen']['num']} validation prompts, "
        f"{r['gen']['new_len']} new bytes each (seed {g['seed']}), scored by the end-to-end model (a greedy "
        f"generator scores low under it by construction; compare at temperature 1)"
        + (
            " and by a trigram model of the training text (Witten-Bell; it favours neither model: the "
            "closer to the data's own continuations, the closer to the text's statistics)"
            if has_ngram
            else ""
        )
        + ":",
        "",
        "| continuations from | bits per byte under the end-to-end model | "
        + ("bits per byte under the trigram model | " if has_ngram else "")
        + "fraction tokenize reads |",
        "|---|---|---|" + ("---|" if has_ngram else ""),
    ]
    for who, s in g["generative"].items():
        ngram = f" {s['bits_per_byte_under_ngram']:.3f} |" if has_ngram else ""
        base = s["bits_per_byte_under_baseline"]
        lines.append(f"| {who} | {base:.3f} |{ngram} {s['tokenize_fraction']:.2f} |")
    return lines


def _plot(record: dict, prov: dict, out: Path) -> None:
    """DiffusionBlocks relative to end to end per task (1 = equal; above 1 = DiffusionBlocks better)."""
    fig, ax = common.figure()
    rows = record["rows"]
    rel = [
        (r["blocks"] / r["baseline"]) if r["better"] == "higher" else (r["baseline"] / r["blocks"])
        for r in rows
    ]
    ax.bar([r["task"] for r in rows], [v if math.isfinite(v) else 0 for v in rel])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("DiffusionBlocks vs end to end (>1 better)")
    ax.set_title("quality at equal layer evaluations", fontsize=9)
    common.save_figure(fig, "quality", prov, out)


if __name__ == "__main__":
    main()
