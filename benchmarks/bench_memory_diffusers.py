"""How much memory does a LoRA step of a Flux-architecture transformer take, end to end against block-wise?

    python benchmarks/bench_memory_diffusers.py           # GPU: Flux.1's real shape; CPU: a scaled-down one
    python benchmarks/bench_memory_diffusers.py --quick   # tiny: checks the pipeline, measures nothing

The model is diffusers' FluxTransformer2DModel with random weights (the memory and speed of a step do not
depend on what the weights are, so no checkpoint is needed): at Flux.1's size built in each process
(`weights="random"`), at the smaller sizes saved once with save_pretrained and read as a user's checkpoint is
(each block reads its own tensors, so the disk tier's host saving shows); the base frozen in bfloat16,
LoRA adapters (rank 16, attention projections) in float32 with AdamW, trained through
dblocks_fast.integrations.diffusers:
  - end to end: B = 1, every layer on the device;
  - block-wise, resident: B blocks (mode "shared": one copy of the embeddings and head), all on the device;
  - block-wise, paged: the same, with the inactive blocks' frozen layers and adapter state in host memory
    (offload="host") or on disk (offload="disk").
Every configuration runs in its own process. On a GPU the figure is torch.cuda.max_memory_allocated over the
steps, and each configuration is also run under memory caps of 12, 16 and 24 GB
(torch.cuda.set_per_process_memory_fraction): fits or out of memory. On a CPU the device memory is the host
memory, so the figure is the peak resident set size above the process's baseline: it shows what the
activations and the optimizer state cost, but a paged tier cannot show its saving there (the host is where
paged blocks go).

Writes results/bench_memory_diffusers-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_memory, common  # noqa: E402

FACTORY = "dblocks_fast.integrations.diffusers:transformer"

MODELS = {  # FluxTransformer2DModel configs; tokens: (image, text) sequence lengths of one example
    "flux": dict(  # Flux.1's shape: 19 double- and 38 single-stream layers of width 3072 (12B parameters)
        config=dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=False, axes_dims_rope=[16, 56, 56],
        ),
        tokens=(4096, 512),  # a 1024 x 1024 image (128 x 128 latents, 2 x 2 packed), 512 text tokens
    ),
    "flux-small": dict(  # the CPU's: the same architecture, 2 + 6 layers of width 512
        config=dict(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=6, attention_head_dim=64,
            num_attention_heads=8, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=False,
            axes_dims_rope=[16, 24, 24],
        ),
        tokens=(256, 64),
    ),
    "tiny": dict(
        config=dict(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
            axes_dims_rope=[2, 2, 4],
        ),
        tokens=(16, 8),
    ),
}  # fmt: skip
CAPS_GB = (12, 16, 24)
LORA = {"rank": 16, "targets": ["to_q", "to_k", "to_v", "to_out.0"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", choices=sorted(MODELS), help="default: flux on GPU, flux-small on CPU")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument(
        "--weights", choices=("saved", "random"), help="saved checkpoint or built in each process (default: "
        "random for flux, whose 24 GB checkpoint would not be worth writing, saved otherwise)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class _Batches:
    """Random Flux inputs: packed latents y, text embeddings, pooled projections, positions."""

    name = "random-flux-inputs"

    def __init__(self, model: dict, n: int):
        c, (img, txt) = model["config"], model["tokens"]
        g = torch.Generator().manual_seed(0)
        self.y = torch.randn(n, img, c["in_channels"], generator=g)
        self.text = torch.randn(n, txt, c["joint_attention_dim"], generator=g)
        self.pooled = torch.randn(n, c["pooled_projection_dim"], generator=g)
        self.img_ids, self.txt_ids = torch.randn(n, img, 3, generator=g), torch.zeros(n, txt, 3)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor) -> dict:
        return {
            "y": self.y[idx], "encoder_hidden_states": self.text[idx], "pooled_projections": self.pooled[idx],
            "img_ids": self.img_ids[idx], "txt_ids": self.txt_ids[idx],
        }  # fmt: skip


def worker(spec: dict) -> dict:
    """One configuration in its own process: two LoRA steps a block; the peak (and, with a cap, whether it
    fit)."""
    import dblocks_fast as dbf

    device = torch.device(spec["device"])
    if device.type == "cuda" and spec.get("cap_gb"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 2**30 / total), device)
    m = MODELS[spec["model"]]
    data = _Batches(m, 4 * spec["batch_size"])
    cond = ["encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids"]
    weights = "random" if spec["weights"] == "random" else "pretrained"
    settings = {"path": spec["path"], "weights": weights, "dtype": "bfloat16", "lora": LORA}
    task = dbf.CustomTask.for_data(data, FACTORY, settings, cond=cond, mode="shared")
    baseline = bench_memory._rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = dbf.TrainConfig(
        num_blocks=spec["blocks"], steps_per_block=2, batch_size=spec["batch_size"], warmup=1,
        schedule="sequential", offload=spec["offload"], process="flow", device=spec["device"],
        out_dir=spec["out_dir"], ckpt_every=0, progress=False,
    )  # fmt: skip
    out = {"baseline_rss_bytes": baseline}
    try:
        trainer = dbf.Trainer(task, data, config)
        trainer.fit()
        out["fits"] = True
    except torch.OutOfMemoryError:
        out["fits"] = False
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _run(spec: dict) -> dict:
    return bench_memory._run(spec, Path(__file__))  # this script's worker, in a process of its own


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model = "tiny" if args.quick else args.model or ("flux" if device.type == "cuda" else "flux-small")
    weights = args.weights or ("random" if model == "flux" else "saved")
    prov = common.provenance(device)
    configs = [
        ("end to end (B=1)", 1, "none"),
        (f"block-wise B={args.blocks}, resident", args.blocks, "none"),
        (f"block-wise B={args.blocks}, paged to host", args.blocks, "host"),
        (f"block-wise B={args.blocks}, paged to disk", args.blocks, "disk"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import diffusers

        folder = Path(tmp) / "flux"
        folder.mkdir()
        config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__}
        (folder / "config.json").write_text(json.dumps({**config, **MODELS[model]["config"]}))
        if weights == "saved":  # a checkpoint as a user has one, read block by block in the workers
            torch.manual_seed(0)
            diffusers.FluxTransformer2DModel.from_config(MODELS[model]["config"]).to(
                torch.bfloat16
            ).save_pretrained(folder)
        for label, blocks, offload in configs:
            spec = dict(
                model=model, path=str(folder), weights=weights, blocks=blocks, offload=offload,
                device=str(device), batch_size=args.batch_size,
                out_dir=str(Path(tmp) / f"run-{blocks}-{offload}"),
            )  # fmt: skip
            r = _run(spec)
            row = {"config": label, "blocks": blocks, "offload": offload, **r}
            row["rss_above_baseline_bytes"] = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
            if device.type == "cuda":
                row["fits_under_gb"] = {cap: _run({**spec, "cap_gb": cap})["fits"] for cap in CAPS_GB}
            rows.append(row)
            print(label, json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    settings = vars(args) | {"out": None, "weights": weights}
    record = {"quick": args.quick, "model": model, "settings": settings, "rows": rows}
    record["settings"]["lora"], record["settings"]["tokens"] = LORA, MODELS[model]["tokens"]
    md = "\n".join(_markdown(prov, record)) + "\n"
    path = common.write("bench_memory_diffusers", prov, record, md, args.out)
    print(md)
    print(f"wrote {path}")
    return record


def _markdown(prov: dict, record: dict) -> list[str]:
    return common.header(
        "LoRA step memory of a Flux-architecture transformer", prov, record["quick"]
    ) + table(record)


def table(record: dict) -> list[str]:
    """What was measured and the table (also used by the results page)."""
    lines = []
    cfg = MODELS[record["model"]]["config"]
    gpu = any("peak_device_bytes" in r for r in record["rows"])
    saved = record["settings"].get("weights") == "saved"
    how = "read from a saved checkpoint" if saved else "built in each process"
    lines += [
        f"FluxTransformer2DModel `{record['model']}` ({cfg['num_layers']} double + "
        f"{cfg['num_single_layers']} single layers, width "
        f"{cfg['num_attention_heads'] * cfg['attention_head_dim']}), random weights "
        f"({how}), "
        f"base bf16, LoRA rank {LORA['rank']} on {', '.join(LORA['targets'])} (fp32, AdamW); batch "
        f"{record['settings']['batch_size']} of {record['settings']['tokens'][0]} image + "
        f'{record["settings"]["tokens"][1]} text tokens; block-wise in mode "shared".',
        "",
    ]
    head = "| configuration | peak RSS above baseline (GB) |"
    if gpu:
        head += " peak device memory (GB) | fits in 12 / 16 / 24 GB |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    e2e = record["rows"][0]
    for r in record["rows"]:
        cells = f"| {r['config']} | {r['rss_above_baseline_bytes'] / 1e9:.2f} |"
        if gpu:
            fits = " / ".join("yes" if r["fits_under_gb"][c] else "no" for c in CAPS_GB)
            ratio = e2e["peak_device_bytes"] / r["peak_device_bytes"]
            cells += f" {r['peak_device_bytes'] / 1e9:.2f} ({ratio:.2f}x less than end to end) | {fits} |"
        lines.append(cells)
    if not gpu:
        lines += [
            "",
            "The device figures are pending. On a CPU the host tier keeps blocks in the same memory the RSS "
            "measures (the disk tier does not), so only the device figures "
            "(`python benchmarks/bench_memory_diffusers.py` on a GPU machine, with diffusers, peft and "
            "accelerate installed) answer how much a paged block-wise LoRA step saves on the device.",
        ]
    return lines


if __name__ == "__main__":
    main()
