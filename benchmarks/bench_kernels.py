"""How fast are the fused kernels? Each op at the sizes of a DiT-XL/2 layer, a DiT-S/2 layer and an LM head,
forward and forward+backward in bf16: our Triton kernel, our CUDA C++ kernel (csrc/, where the op has one),
torch eager and torch.compile of the same expression. Then the optimizer: one AdamW step over a flat fp32
buffer, our fused CUDA kernel (with and without the bf16 copy) vs torch.optim.AdamW(fused=True) and
(foreach=True) on the same buffer.

    python benchmarks/bench_kernels.py            # on a GPU: the full table
    python benchmarks/bench_kernels.py --quick    # smaller sizes; on a CPU only this runs, as a smoke test

Each case is timed twice: under CUDA graphs (triton.testing.do_bench_cudagraph: the GPU's time, what a
captured training step sees; a custom-op call costs tens of microseconds of host time against kernel floors
of 8-40 us at DiT-XL sizes) and eagerly (triton.testing.do_bench: what an uncaptured Python loop sees, launch
overhead included); medians of both. A case that cannot be captured records why. GB/s counts the bytes each
op must move at least (written next to each row) and is compared with a device-to-device copy measured in
the same run. For the cross-entropy,
the peak memory of forward+backward is reported against the unfused head (full logits). AdamW counts 16 bytes
read and 12 written per parameter (2 more with the bf16 copy). Without CUDA the Triton kernels run once under
Triton's interpreter at tiny sizes to check they work, the CUDA ones cannot run, and every figure is recorded
as pending: nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: the CPU runs kernels through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from dblocks_fast import _C_loader, cuda_ops, kernels, ops  # noqa: E402

GPU_SIZES = {
    "DiT-XL/2 layer": dict(n=32, t=256, d=1152),
    "DiT-S/2 layer": dict(n=128, t=256, d=384),
    "LM head": dict(rows=65536, d=768, v=32000),
}
QUICK_SIZES = {"DiT layer (quick)": dict(n=8, t=64, d=384), "LM head (quick)": dict(rows=4096, d=256, v=8192)}
SMOKE_SIZES = {"DiT layer (smoke)": dict(n=2, t=4, d=24), "LM head (smoke)": dict(rows=16, d=8, v=40)}
ADAMW_SIZES = {"GPU": [16 * 2**20, 256 * 2**20], "quick": [16 * 2**20], "smoke": [4099]}  # parameters


@dataclass
class Case:
    op: str
    size: str
    make: Callable  # () -> the op's inputs
    ours: Callable  # the Triton kernel
    eager: Callable  # the torch reference: the same expression, eager (and the input of torch.compile)
    bytes_fwd: int  # bytes the forward must move at least
    bytes_fb: int  # bytes forward + backward must move at least
    cuda: Callable | None = None  # the CUDA C++ kernel (dblocks_fast.cuda_ops), where there is one


def cases(sizes: dict, device: torch.device, dtype: torch.dtype) -> list[Case]:
    el = torch.finfo(dtype).bits // 8

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    out = []
    for name, s in sizes.items():
        if "rows" in s:
            r, d, v = s["rows"], s["d"], s["v"]

            def ce_inputs(r=r, d=d, v=v):
                w = (torch.randn(v, d, device=device, dtype=dtype) * d**-0.5).requires_grad_()
                return [randn(r, d, grad=True), w, torch.randint(0, v, (r,), device=device),
                        torch.rand(r, device=device)]  # fmt: skip

            hw = (r * d + v * d) * el  # h and the weight; the logits never reach memory
            # forward reads h and W twice (logits, then dh and dW) and writes dh, dW; backward scales them
            op = "weighted_linear_cross_entropy"
            ours, ref = kernels.weighted_linear_cross_entropy, ops.weighted_linear_cross_entropy_ref
            out.append(Case(op, name, ce_inputs, ours, ref, 3 * hw, 4 * hw))
            continue
        n, t, d = s["n"], s["t"], s["d"]
        act = n * t * d * el

        def dit(k, n=n, t=t, d=d):
            return [randn(n, t, d, grad=True) for _ in range(k)] + [randn(n, d, grad=True) for _ in range(3)]

        def edm_inputs(n=n, t=t, d=d):
            return [randn(n, t, d), randn(n, t, d, grad=True), randn(n, t, d),
                    torch.exp(torch.randn(n, device=device) * 1.2 - 1.2)]  # fmt: skip

        fp32 = n * t * d * 4
        # adaln: read x, write h; backward reads x and dh, writes dx
        out.append(Case("adaln_modulate", name, lambda dit=dit: dit(1)[:3], kernels.adaln_modulate,
                        ops.adaln_modulate_ref, 2 * act, 5 * act, cuda_ops.adaln_modulate))  # fmt: skip
        # gated: read x, y, write x', h; backward reads x', y, dx', dh, writes dx, dy
        out.append(Case("gated_residual_adaln", name, lambda dit=dit: dit(2), kernels.gated_residual_adaln,
                        ops.gated_residual_adaln_ref, 4 * act, 10 * act,
                        cuda_ops.gated_residual_adaln))  # fmt: skip
        # edm: read z, f, y, write the fp32 gradient; backward reads it and writes df
        out.append(Case("edm_l2_loss", name, edm_inputs, kernels.edm_l2_loss, ops.edm_l2_loss_ref,
                        3 * act + fp32, 4 * act + 2 * fp32, cuda_ops.edm_l2_loss))  # fmt: skip
    return out


def _loss(out):
    """A scalar to backpropagate from whatever the op returns."""
    first = out[0] if isinstance(out, tuple) else out
    second = out[1] if isinstance(out, tuple) and out[1].ndim > 0 else None
    return first.float().sum() + (second.float().sum() if second is not None else 0)


def runner(fn, inputs, backward: bool):
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        for x in leaves:
            x.grad = None
        out = fn(*inputs)
        if backward:
            _loss(out).backward()

    return run


def _time_gpu(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_graph(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (fn's host work, e.g. custom-op dispatch, drops out)."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _copy_bandwidth(device) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**28, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _time_gpu(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10)


def adamw_rows(sizes: list[int], device: torch.device, copy_gbs: float | None) -> list[dict]:
    """One AdamW step over a flat fp32 buffer of n parameters: ours (CUDA) vs torch.optim.AdamW."""
    rows = []
    for n in sizes:
        rows += _adamw_size(n, device, copy_gbs)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _adamw_size(n: int, device: torch.device, copy_gbs: float | None) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(n)
    p, g, m, v = (torch.randn(n, device=device, generator=gen) * s for s in (1.0, 1e-2, 1e-3, 1e-6))
    v = v.abs()
    if device.type != "cuda":  # smoke: the CPU path runs; no figure
        ops.adamw_(p, g, m, v, **ADAMW)
        return [{"parameters": n, "impl": "reference (CPU)", "status": "ran; GPU figures pending"}]
    copy = torch.empty(n, dtype=torch.bfloat16, device=device)
    impls = {}
    if cuda_ops.available(device):
        impls["ours (CUDA)"] = (lambda: ops.adamw_(p, g, m, v, **ADAMW, kernels="cuda"), 28)
        impls["ours (CUDA) + bf16 copy"] = (
            lambda: ops.adamw_(p, g, m, v, **ADAMW, param_bf16=copy, kernels="cuda"),
            30,
        )
    for name, kw in (
        ("torch AdamW(fused=True)", {"fused": True}),
        ("torch AdamW(foreach=True)", {"foreach": True}),
    ):
        param = torch.nn.Parameter(p.clone())
        param.grad = g.clone()
        opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, **kw)
        opt.step()  # creates the state
        impls[name] = (opt.step, 28)
    times = {name: _time_gpu(fn) for name, (fn, _) in impls.items()}
    rows = []
    for name, (_, per) in impls.items():
        gbps = per * n / times[name] / 1e6
        rows.append({
            "parameters": n, "impl": name, "ms": times[name], "bytes_per_parameter": per, "GBps": gbps,
            "fraction_of_copy": gbps / copy_gbs,
            "speedup_vs_torch_fused": times["torch AdamW(fused=True)"] / times[name],
        })  # fmt: skip
    if not cuda_ops.available(device):
        rows.append({"parameters": n, "impl": "ours (CUDA)", "status": f"_C: {_C_loader.why_unavailable()}"})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (always, without CUDA)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    prov = common.provenance(device)
    sizes = (QUICK_SIZES if args.quick else GPU_SIZES) if cuda else SMOKE_SIZES
    dtype = torch.bfloat16
    copy_gbs = _copy_bandwidth(device) if cuda else None
    has_cuda_ops = cuda_ops.available(device)
    # AdamW first (no compilation, seconds), then each op: the record is rewritten after every row, so a run
    # stopped by a time limit keeps what it measured ("complete": false says the table is partial)
    adamw_sizes = ADAMW_SIZES[("quick" if args.quick else "GPU") if cuda else "smoke"]
    adamw = adamw_rows(adamw_sizes, device, copy_gbs)
    rows = []

    def write(complete: bool) -> Path:
        record = {
            "dtype": "bfloat16",
            "copy_GBps": copy_gbs,
            "quick": args.quick or not cuda,
            "complete": complete,
            "cuda_ops": "built" if _C_loader.load() is not None else _C_loader.why_unavailable(),
            "rows": rows,
            "adamw": adamw,
        }
        md = _markdown(rows, adamw, prov, copy_gbs, complete)
        return common.write("bench_kernels", prov, record, md, args.out)

    for case in cases(sizes, device, dtype):
        op, make, ours, eager = case.op, case.make, case.ours, case.eager
        row = {
            "op": op,
            "size": case.size,
            "bytes_forward": case.bytes_fwd,
            "bytes_forward_backward": case.bytes_fb,
        }
        if not cuda:
            for mode in (False, True):  # does it run? (the tests check the numbers; the figures are pending)
                runner(ours, make(), mode)()
            row["status"] = "ran under the Triton interpreter; GPU figures pending (no CUDA device)"
            rows.append(row)
            continue
        compiled = torch.compile(eager)
        impls = {"ours": ours, "eager": eager, "compile": compiled}
        if case.cuda is not None and has_cuda_ops:
            impls["cuda"] = case.cuda
        for mode, key in ((False, "forward"), (True, "forward_backward")):
            inputs = make()
            for impl, fn in impls.items():
                # graph first: the figure that says what the kernels cost, then eager beside it
                try:
                    row[f"{key}_{impl}_graph_ms"] = _time_graph(runner(fn, inputs, mode))
                except Exception as e:  # noqa: BLE001 - not capturable: recorded, the eager figure still runs
                    row[f"{key}_{impl}_graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row[f"{key}_{impl}_ms"] = _time_gpu(runner(fn, inputs, mode))
            moved = case.bytes_fb if mode else case.bytes_fwd
            for impl in impls:
                if f"{key}_{impl}_graph_ms" in row:
                    row[f"{key}_{impl}_graph_GBps"] = moved / row[f"{key}_{impl}_graph_ms"] / 1e6
            if f"{key}_ours_graph_ms" in row and f"{key}_compile_graph_ms" in row:
                row[f"{key}_graph_speedup_vs_compile"] = (
                    row[f"{key}_compile_graph_ms"] / row[f"{key}_ours_graph_ms"]
                )
                row[f"{key}_graph_fraction_of_copy"] = row[f"{key}_ours_graph_GBps"] / copy_gbs
            row[f"{key}_ours_GBps"] = moved / row[f"{key}_ours_ms"] / 1e6
            row[f"{key}_fraction_of_copy"] = row[f"{key}_ours_GBps"] / copy_gbs
            row[f"{key}_speedup_vs_eager"] = row[f"{key}_eager_ms"] / row[f"{key}_ours_ms"]
            row[f"{key}_speedup_vs_compile"] = row[f"{key}_compile_ms"] / row[f"{key}_ours_ms"]
            if "cuda" in impls:
                row[f"{key}_cuda_GBps"] = moved / row[f"{key}_cuda_ms"] / 1e6
                best = min(row[f"{key}_ours_ms"], row[f"{key}_compile_ms"])
                row[f"{key}_cuda_vs_best"] = best / row[f"{key}_cuda_ms"]  # >= 0.9: within 10% of the faster
        if op == "weighted_linear_cross_entropy":
            inputs = make()
            row["peak_bytes_ours"] = _peak_bytes(runner(ours, inputs, True))
            row["peak_bytes_eager"] = _peak_bytes(runner(eager, inputs, True))
        rows.append(row)
        if cuda:
            write(complete=False)
            print(f"{op}, {case.size}: done", flush=True)
    path = write(complete=True)
    _plot(rows, prov, args.out)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path}")
    return json.loads(path.read_text())


def _plot(rows, prov, out) -> None:
    if not any("forward_ours_ms" in r for r in rows):
        common.pending_figure("bench_kernels", prov, out)
        return
    fig, ax = common.figure(6, 3.2)
    names = [f"{r['op']}\n{r['size']}" for r in rows]
    x = range(len(rows))
    for i, key in enumerate(("forward", "forward_backward")):
        vals = [r[f"{key}_speedup_vs_compile"] for r in rows]
        ax.bar([v + 0.4 * i for v in x], vals, width=0.4, label=key.replace("_", "+"))
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([v + 0.2 for v in x], names, fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("speed-up over torch.compile")
    ax.legend(fontsize=8)
    common.save_figure(fig, "bench_kernels", prov, out)


def _markdown(rows, adamw, prov, copy_gbs, complete: bool = True) -> str:
    head = [
        "# Fused kernels: Triton and CUDA C++ vs torch eager vs torch.compile (bf16), and AdamW",
        "",
        f"{prov['device']}; torch {prov['versions']['torch']}; commit {prov['commit']}; {prov['date']}.",
        f"Command: `{prov['command']}`.",
        "",
    ]
    if not complete:
        head += ["**Partial**: the run stopped (a time limit?) after the rows below.", ""]
    if copy_gbs is None:
        lines = ["No CUDA device: every Triton kernel ran once under the Triton interpreter (smoke sizes) "
                 "and the AdamW reference ran once on the CPU; the CUDA C++ kernels cannot run here. "
                 "**GPU figures are pending**; run this script on a GPU to measure them.", "",
                 "| op | size | status |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['op']} | {r['size']} | {r['status']} |" for r in rows]
        return "\n".join(head + lines) + "\n"
    lines = [
        f"Device-to-device copy: {copy_gbs:.0f} GB/s. Times are do_bench medians in ms. "
        '"vs best": the faster of Triton and torch.compile over CUDA (>= 0.90 is within 10%).',
        "",
        "| op | size | pass | Triton ms | CUDA ms | eager ms | compile ms | Triton vs compile | CUDA vs best "
        "| Triton GB/s (of copy) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            ms = [f"{r[f'{key}_{impl}_ms']:.3f}" if f"{key}_{impl}_ms" in r else "-"
                  for impl in ("ours", "cuda", "eager", "compile")]  # fmt: skip
            vs_best = f"{r[f'{key}_cuda_vs_best']:.2f}x" if f"{key}_cuda_vs_best" in r else "-"
            lines.append(
                f"| {r['op']} | {r['size']} | {label} | {' | '.join(ms)} | "
                f"{r[f'{key}_speedup_vs_compile']:.2f}x | {vs_best} | {r[f'{key}_ours_GBps']:.0f} "
                f"({100 * r[f'{key}_fraction_of_copy']:.0f}%) |"
            )
    lines += [
        "",
        "Under CUDA graphs (do_bench_cudagraph medians, ms; the GPU's time without the host's):",
        "",
        "| op | size | pass | Triton | CUDA | eager | compile | Triton vs compile | Triton GB/s (of copy) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            ms = [f"{r[f'{key}_{impl}_graph_ms']:.3f}" if f"{key}_{impl}_graph_ms" in r
                  else ("not capturable" if f"{key}_{impl}_graph_error" in r else "-")
                  for impl in ("ours", "cuda", "eager", "compile")]  # fmt: skip
            vs = r.get(f"{key}_graph_speedup_vs_compile")
            frac = r.get(f"{key}_graph_fraction_of_copy")
            gbps = r.get(f"{key}_ours_graph_GBps")
            vs_txt = f"{vs:.2f}x" if vs else "-"
            bw_txt = f"{gbps:.0f} ({100 * frac:.0f}%)" if frac else "-"
            lines.append(f"| {r['op']} | {r['size']} | {label} | {' | '.join(ms)} | {vs_txt} | {bw_txt} |")
    ce = [r for r in rows if "peak_bytes_ours" in r]
    if ce:
        lines += ["", "| cross-entropy size | peak bytes ours | peak bytes unfused | ratio |"]
        lines += ["|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['peak_bytes_ours']:,} | {r['peak_bytes_eager']:,} | "
                  f"{r['peak_bytes_ours'] / r['peak_bytes_eager']:.3f} |" for r in ce]  # fmt: skip
    lines += ["", "AdamW, one step over a flat fp32 buffer (28 bytes per parameter, 30 with the bf16 copy):",
              "", "| parameters | implementation | ms | GB/s (of copy) | vs torch fused |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in adamw:
        if "ms" not in r:
            lines.append(f"| {r['parameters']:,} | {r['impl']} | {r['status']} | | |")
            continue
        lines.append(
            f"| {r['parameters']:,} | {r['impl']} | {r['ms']:.3f} | {r['GBps']:.0f} "
            f"({100 * r['fraction_of_copy']:.0f}%) | {r['speedup_vs_torch_fused']:.2f}x |"
        )
    return "\n".join(head + lines) + "\n"


if __name__ == "__main__":
    main()
