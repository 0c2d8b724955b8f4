"""How fast is one training step of a DiT-XL/2 block? What users feel: the fused kernels inside a whole step.

One block of DiT-XL/2 split into B = 4 blocks (7 AdaLN-Zero layers of width 1152, 16 heads), batch 32 of 256
tokens, bf16 autocast over fp32 weights: forward through the layers, the EDM loss, backward and a
torch.optim.AdamW(fused=True) step (the same optimizer for every variant, so the ratios are the layers' and
the loss's). Variants, in one run:
    eager             the torch references (kernels="torch")
    torch.compile     the same, the forward and loss through torch.compile
    ours              the Triton kernels (kernels="triton")
    ours + compile    the Triton kernels inside torch.compile (they are custom ops: it fuses around them)

    python benchmarks/bench_block_step.py            # on a GPU: the DiT-XL/2 block
    python benchmarks/bench_block_step.py --quick    # a smaller block; without CUDA a tiny one, once

Times are medians of triton.testing.do_bench over whole steps, with the peak memory of a step. Without CUDA
each variant but the compiled ones runs one tiny step (the Triton kernels under the interpreter) to check the
pipeline, and every figure is recorded as pending: nothing is estimated.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: the CPU runs kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dblocks_fast import ops  # noqa: E402
from dblocks_fast.nn import AdaLNZeroLayer, set_kernels  # noqa: E402

SIZES = {
    "gpu": dict(name="DiT-XL/2, 1 of 4 blocks", hidden=1152, heads=16, layers=7, batch=32, tokens=256),
    "quick": dict(name="DiT-S/2, 1 of 4 blocks (quick)", hidden=384, heads=6, layers=3, batch=32, tokens=256),
    "smoke": dict(name="tiny (smoke)", hidden=32, heads=2, layers=2, batch=2, tokens=8),
}
VARIANTS = [("eager", "torch", False), ("torch.compile", "torch", True), ("ours", "triton", False),
            ("ours + compile", "triton", True)]  # fmt: skip


def make_step(size: dict, device: torch.device, kernels: str, compiled: bool):
    """A step function over fresh layers and inputs (seeded alike for every variant)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    d, n, t = size["hidden"], size["batch"], size["tokens"]
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([AdaLNZeroLayer(d, size["heads"]) for _ in range(size["layers"])])
    for (
        layer
    ) in layers:  # a trained-looking modulation, not the zero init (which makes each layer the identity)
        torch.nn.init.normal_(layer.modulation.weight, std=0.02, generator=gen)
    layers = set_kernels(layers.to(device), kernels)
    opt = torch.optim.AdamW(layers.parameters(), lr=1e-4, fused=device.type == "cuda")
    x, y, eps = (torch.randn(n, t, d, generator=gen).to(device) for _ in range(3))
    c = torch.randn(n, d, generator=gen).to(device)
    sigma = torch.exp(torch.randn(n, generator=gen) * 1.2 - 1.2).to(device)

    def loss_of(x, c, y, sigma):
        h = x
        for layer in layers:
            h = layer(h, c)
        return ops.edm_l2_loss(x, h, y, sigma, kernels=kernels)[0]

    forward = torch.compile(loss_of) if compiled else loss_of
    z = x + sigma[:, None, None] * eps

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(z, c, y, sigma)
        loss.backward()
        opt.step()
        return loss

    return step


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller block (without CUDA: a tiny one, always)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    prov = common.provenance(device)
    size = SIZES[("quick" if args.quick else "gpu") if cuda else "smoke"]
    rows = []

    def write(complete: bool):
        record = {"quick": args.quick or not cuda, "complete": complete, "size": size, "rows": rows}
        return common.write("bench_block_step", prov, record, _markdown(prov, record), args.out)

    for name, kernels, compiled in VARIANTS:
        if not cuda:
            if not compiled:
                make_step(size, device, kernels, compiled)()  # does it run? the figures are pending
            status = "ran once (smoke)" if not compiled else "not run without CUDA"
            rows.append({"variant": name, "status": f"{status}; GPU figures pending"})
            continue
        import triton.testing

        step = make_step(size, device, kernels, compiled)
        for _ in range(3):  # compile, autotune, cuBLAS workspaces
            step()
        row = {"variant": name, "kernels": kernels, "compiled": compiled}
        row["ms"] = float(triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median"))
        row["peak_bytes"] = _peak_bytes(step)
        rows.append(row)
        del step
        torch.cuda.empty_cache()
        for r in rows:
            r["speedup_vs_eager"] = rows[0]["ms"] / r["ms"]
            if len(rows) > 1:
                r["speedup_vs_compile"] = rows[1]["ms"] / r["ms"]
        write(complete=False)
        print(f"{name}: {row['ms']:.3f} ms", flush=True)
    path = write(complete=True)
    if cuda:
        _plot(rows, prov, args.out)
    else:
        common.pending_figure("bench_block_step", prov, args.out)
    print(path.with_suffix(".md").read_text())
    return rows


def _plot(rows, prov, out) -> None:
    fig, ax = common.figure(5, 3)
    timed = [r for r in rows if "ms" in r]
    ax.bar([r["variant"] for r in timed], [r["ms"] for r in timed])
    ax.set_ylabel("ms per training step")
    ax.tick_params(axis="x", labelsize=7)
    common.save_figure(fig, "bench_block_step", prov, out)


def table(record: dict) -> list[str]:
    size = record["size"]
    if not any("ms" in r for r in record["rows"]):
        return [f"{size['name']}: **GPU figures pending** (no CUDA device where this ran; each eager variant "
                "ran one tiny step)."]  # fmt: skip
    lines = common.partial(record)
    lines += [f"{size['name']}: {size['layers']} layers of width {size['hidden']}, batch {size['batch']} x "
              f"{size['tokens']} tokens, bf16 autocast, forward + EDM loss + backward + fused AdamW.", "",
              "| variant | ms per step | vs eager | vs torch.compile | peak memory |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in record["rows"]:
        if "ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('status', '-')} | | | |")
            continue
        vs_c = f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "-"
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {r['speedup_vs_eager']:.2f}x | {vs_c} | "
                     f"{r['peak_bytes'] / 2**30:.2f} GiB |")  # fmt: skip
    return lines


def _markdown(prov: dict, record: dict) -> str:
    title = "One training step of a DiT block: ours vs eager vs torch.compile"
    return "\n".join(common.header(title, prov, record["quick"]) + table(record)) + "\n"


if __name__ == "__main__":
    main()
