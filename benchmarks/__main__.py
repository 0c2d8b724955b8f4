"""Run every benchmark and rewrite the results page: `python -m benchmarks [--quick] [--out DIR]`.

Each script runs in its own process (one failing does not stop the others, and none inherits another's
torch settings) and writes <name>-<device>.json, .md and .png into the output folder. The runner then
rewrites README.md there from every JSON it finds: one section per question, ratios first, and a line
saying "pending" for every figure that still needs a device nobody has run it on. Nothing is estimated.

    python -m benchmarks --quick            # CPU: every script on small sizes, a few minutes
    python -m benchmarks                    # full sizes (on a GPU machine: the GPU figures)
    python -m benchmarks --only bench_inference --out /tmp/results
    python -m benchmarks --quick --skip bench_crash   # CI: the crash harness runs as a step of its own
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import (  # noqa: E402
    bench_block_step,
    bench_capacity,
    bench_crash,
    bench_distributed,
    bench_inference,
    bench_memory,
    bench_memory_diffusers,
    bench_paging,
    bench_peers,
    common,
    kernels_compiled,
    quality,
    quality_diffusers,
    quality_digits,
    quality_vit,
)

# (script, the question it answers); the order of the results page
SCRIPTS = [
    ("quality_digits", "How good: does block-wise training match end-to-end training?"),
    ("quality_digits_flow", "How good with flow matching instead of EDM: block-wise vs end to end?"),
    ("quality_vit", "How good for classification: does a block-wise ViT match the end-to-end one?"),
    ("quality", "How good across the paper's tasks: image generation, classification, language models?"),
    ("bench_memory", "How much memory does block-wise training need?"),
    ("bench_peers", "How does it compare with checkpointing, CPU-offloaded optimizers and block swapping?"),
    ("bench_paging", "How fast is paging blocks between host and GPU?"),
    ("bench_capacity", "What is the largest model I can train on my GPU?"),
    ("bench_peers_capacity", "What is the largest model each alternative trains under 12, 16 and 24 GB?"),
    ("bench_inference", "How fast is sampling with B blocks?"),
    ("bench_distributed", "How does training scale over processes and GPUs?"),
    ("bench_kernels", "How fast are the fused kernels?"),
    ("bench_block_step", "How fast is a whole training step of a DiT-XL block with the fused kernels?"),
    ("bench_crash", "Does a run survive being killed at any moment, a full disk, a read-only folder?"),
    ("quality_diffusers", "How good is LoRA fine-tuning of a pretrained diffusers DiT, block-wise?"),
    ("bench_memory_diffusers", "How much memory does a LoRA step of a Flux-size transformer take?"),
]
# a record that one script writes under another name, with the arguments that make it
COMMANDS = {
    "quality_digits_flow": ("quality_digits", ["--flow"]),
    "bench_peers_capacity": ("bench_peers", ["--capacity"]),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: every script, a few minutes on a CPU")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="folder for the results and README.md")
    names = [s for s, _ in SCRIPTS]
    ap.add_argument("--only", nargs="+", choices=names, help="run just these scripts")
    ap.add_argument("--skip", nargs="+", choices=names, default=[], help="run all scripts but these")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from the JSON files only")
    ap.add_argument(
        "--no-emulator",
        action="store_true",
        help="leave out csrc/'s full CPU-emulator stage (`python -m tests.cpu_emu`, about 10 minutes on 2 "
        "cores), which a full run without --only runs first; --quick never runs it (CI runs the emulator's "
        "quick stage as a step of its own)",
    )
    return ap.parse_args(argv)


def run_script(name: str, quick: bool, out: Path) -> dict:
    script, extra = COMMANDS.get(name, (name, []))
    cmd = [sys.executable, str(HERE / f"{script}.py"), *extra, "--out", str(out)] + (["--quick"] * quick)
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"== {name}: FAILED (exit {res.returncode}) after {seconds:.0f} s", flush=True)
    else:
        print(f"== {name}: done in {seconds:.0f} s", flush=True)
    return {"script": name, "exit": res.returncode, "seconds": seconds, "stderr_tail": res.stderr[-2000:]}


def run_emulator(out: Path) -> dict:
    """csrc/'s full emulated stage (every build variant, every planted fault), recorded in cpu_emu.json."""
    cmd = [sys.executable, "-m", "tests.cpu_emu", "--record", str(out / "cpu_emu.json")]
    print(f"== cpu_emu: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"== cpu_emu: {'done' if res.returncode == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    if res.returncode:
        print(res.stdout[-4000:], res.stderr[-2000:], sep="\n", file=sys.stderr)
    tail = res.stdout[-2000:]
    return {"script": "cpu_emu", "exit": res.returncode, "seconds": seconds, "stderr_tail": tail}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    if not (args.report_only or args.quick or args.no_emulator or args.only):
        runs.append(run_emulator(args.out))
    if not args.report_only:
        for name, _ in SCRIPTS:
            if (args.only is None or name in args.only) and name not in args.skip:
                runs.append(run_script(name, args.quick, args.out))
    (args.out / "README.md").write_text(report(args.out, runs))
    print(f"wrote {args.out / 'README.md'}")
    return 1 if any(r["exit"] for r in runs) else 0


# --- the results page ---------------------------------------------------------------------------------------
def _records(out: Path, name: str) -> dict[str, dict]:
    found = {}
    for dev in ("cpu", "cuda"):
        path = out / f"{name}-{dev}.json"
        if path.is_file():
            found[dev] = json.loads(path.read_text())
    return found


def _where(r: dict) -> str:
    quick = " **(--quick: a pipeline check, not a measurement)**" if r.get("quick") else ""
    return f"{r['device']}; torch {r['versions']['torch']}; commit {r['commit']}; {r['date']}{quick}"


def _kernels(r: dict) -> list[str]:
    if r.get("copy_GBps") is None:
        return [f"Ran under the Triton interpreter (no CUDA device): {len(r['rows'])} op/size cases ran; "
                "**speed figures pending** until this runs on a GPU."]  # fmt: skip
    lines = common.partial(r)
    lines += [
        "| op | size | fwd vs compile | fwd+bwd vs compile | fwd vs eager | fwd+bwd vs eager "
        "| fwd GB/s (of copy) | fwd+bwd vs compile, CUDA graphs | fwd GB/s, graphs (of copy) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        vs = x.get("forward_backward_graph_speedup_vs_compile")
        frac = x.get("forward_graph_fraction_of_copy")
        graph = f"{vs:.2f}x" if vs else "-"
        graph_bw = f"{x['forward_ours_graph_GBps']:.0f} ({100 * frac:.0f}%)" if frac else "-"
        lines.append(
            f"| {x['op']} | {x['size']} | {x['forward_speedup_vs_compile']:.2f}x | "
            f"{x['forward_backward_speedup_vs_compile']:.2f}x | {x['forward_speedup_vs_eager']:.2f}x | "
            f"{x['forward_backward_speedup_vs_eager']:.2f}x | {x['forward_ours_GBps']:.0f} "
            f"({100 * x['forward_fraction_of_copy']:.0f}%) | {graph} | {graph_bw} |"
        )
    lines = [x.replace("| op |", "| op (Triton) |", 1) if x.startswith("| op |") else x for x in lines]
    cuda = [x for x in r["rows"] if "forward_cuda_vs_best" in x]
    if cuda:
        lines += [
            "",
            "| op (CUDA C++) | size | fwd vs best of Triton, compile | fwd+bwd vs best |",
            "|---|---|---|---|",
        ]
        lines += [f"| {x['op']} | {x['size']} | {x['forward_cuda_vs_best']:.2f}x | "
                  f"{x['forward_backward_cuda_vs_best']:.2f}x |" for x in cuda]  # fmt: skip
    adamw = [x for x in r.get("adamw", []) if "ms" in x]
    if adamw:
        lines += [
            "",
            "| AdamW, flat fp32 | parameters | GB/s (of copy) | vs torch fused |",
            "|---|---|---|---|",
        ]
        lines += [f"| {x['impl']} | {x['parameters']:,} | {x['GBps']:.0f} "
                  f"({100 * x['fraction_of_copy']:.0f}%) | {x['speedup_vs_torch_fused']:.2f}x |"
                  for x in adamw]  # fmt: skip
    return lines


TABLES = {
    "quality_digits": quality_digits.table,
    "quality_digits_flow": quality_digits.table,
    "quality_vit": quality_vit.table,
    "quality": quality.table,
    "bench_memory": bench_memory.table,
    "bench_peers": bench_peers.table,
    "bench_peers_capacity": bench_peers.capacity_table,
    "bench_paging": bench_paging.table,
    "bench_capacity": bench_capacity.table,
    "bench_inference": bench_inference.table,
    "bench_distributed": bench_distributed.table,
    "bench_kernels": _kernels,
    "bench_block_step": bench_block_step.table,
    "bench_crash": bench_crash.table,
    "quality_diffusers": quality_diffusers.table,
    "bench_memory_diffusers": bench_memory_diffusers.table,
}


def _record_section(path: Path, question: str, command: str) -> tuple[list[str], dict | None]:
    """A section whose record needs no device (one JSON, never pending): its heading lines and the record,
    or the lines saying there is none yet."""
    lines = [f"## {question}", "", command, ""]
    if not path.is_file():
        return lines + ["No record here yet: run the command above (no GPU needed).", ""], None
    return lines, json.loads(path.read_text())


def _emulator_section(out: Path) -> list[str]:
    """csrc/'s CUDA kernels on the CPU emulator (tests/cpu_emu): one record (cpu_emu.json), no device."""
    lines, r = _record_section(
        out / "cpu_emu.json",
        "Do csrc/'s CUDA kernels compute the right thing? On a CPU emulator, under sanitizers",
        "`python -m tests.cpu_emu --record benchmarks/results/cpu_emu.json` (the full stage; `python -m "
        "benchmarks` runs it; CI runs `--quick` on every change)",
    )
    if r is None:
        return lines
    verdict = "**passed**" if r["ok"] else f"**FAILED**: {r.get('failure', '?')}"
    lines += [
        f"{r['mode']} stage {verdict} in {r['seconds']:.0f} s; {r['cpu_count']} CPU cores; "
        f"Python {r['python']}; commit {r['commit']}; {r['date']}",
        "",
        "Each build runs every entry point of `csrc/include/dblocks/ops.h` against float64 (odd shapes, "
        "every vector-width, row-cache and chunk boundary, fp32/bf16/fp16) with fresh NaN-filled shared "
        "memory a block, in the schedule named; outputs must be bit-identical across schedules.",
        "",
        "| build | thread/block schedule | options | tests passed | s |",
        "|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        opts = ", ".join(f"{k}={val}" for k, val in v["options"].items()) or "-"
        lines.append(f"| {v['name']} | {v['schedule']} | {opts} | {v['tests_passed']}"
                     f"{'' if v['ok'] else ' (FAILED)'} | {v['seconds']:.0f} |")  # fmt: skip
    if r["faults"]:
        lines += ["", f"Planted faults, each caught: {len(r['faults'])}", "",
                  "| fault | build | caught as |", "|---|---|---|"]  # fmt: skip
        for f in r["faults"]:
            # build paths cut to the source file or library: ".../src/csrc/x.cu:107" -> "csrc/x.cu:107"
            short = [re.sub(r"/\S*/(src/)?(csrc/|libdblocks)", r"\2", x) for x in f["caught"][:2]]
            said = " / ".join(x.replace("|", "/").strip()[:160] for x in short) or "-"
            lines.append(f"| {f['name']} | {f['variant']} | {said} |")
    return lines + [""]


def _compiled_section(out: Path) -> list[str]:
    """The sm_90 compile table: no device needed, so one record (kernels_compiled.json), never pending."""
    lines, r = _record_section(
        out / "kernels_compiled.json",
        "Are the kernels compiled well for Hopper (sm_90)? Registers, spills, occupancy",
        "`python benchmarks/kernels_compiled.py` (CI runs it; it fails on a compile error or a spill)",
    )
    if r is None:
        return lines
    try:
        lines += [f"{r['device']}; triton {r['triton_version']}; commit {r['commit']}; {r['date']}", "",
                  *kernels_compiled.table(r)]  # fmt: skip
    except (KeyError, TypeError) as e:
        lines += [f"(this record does not have the fields this page reads: {e!r}; rerun the script)"]
    return lines + ["", "Details: [kernels_compiled.md](kernels_compiled.md)", ""]


def report(out: Path, runs: list[dict]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks` from the JSON records in this folder (each holds the device, "
        "versions, commit, date, command and every figure). Ratios come first; a figure that needs a device "
        "no one has run it on yet says **pending**.",
        "",
    ]
    failed = [r["script"] for r in runs if r["exit"]]
    if failed:
        lines += [f"**These scripts failed in the last run: {', '.join(failed)}** (their older records, if "
                  "any, are shown).", ""]  # fmt: skip
    lines += _compiled_section(out)
    lines += _emulator_section(out)
    for name, question in SCRIPTS:
        script, extra = COMMANDS.get(name, (name, []))
        lines += [f"## {question}", "", f"`{' '.join(['python', f'benchmarks/{script}.py', *extra])}`", ""]
        recs = _records(out, name)
        for dev in ("cpu", "cuda"):
            label = "CPU" if dev == "cpu" else "GPU"
            if dev not in recs:
                lines += [f"**{label}: pending** (no record yet: run `python -m benchmarks` on a "
                          f"{'GPU' if dev == 'cuda' else 'CPU-only'} machine).", ""]  # fmt: skip
                continue
            r = recs[dev]
            try:
                lines += [f"**{label}**: {_where(r)}", "", *TABLES[name](r)]
            except (KeyError, StopIteration, TypeError) as e:
                lines += [f"(this record does not have the fields this page reads: {e!r}; rerun the script)"]
            png = out / f"{name}-{dev}.png"
            if png.is_file():
                lines += ["", f"![{name} {dev}]({png.name})"]
            lines += ["", f"Details: [{name}-{dev}.md]({name}-{dev}.md)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
