"""What would a user pick instead of DiffusionBlocks, and how do they compare?

    python benchmarks/bench_peers.py                 # GPU: the 1B DiT; CPU: the 120M one (peak RSS)
    python benchmarks/bench_peers.py --capacity      # GPU: the largest model of each method under 12/16/24 GB
    python benchmarks/bench_peers.py --quick         # tiny, all in one process: checks the pipeline only

The same DiT (the package's own, bench_memory's configurations), batch, fp32 weights and AdamW, no gradient
clipping (a method that moves gradients off the device cannot clip them there), one process per method:
  - end to end: the whole model as one block (what `Trainer` trains at B = 1), the package's AdamW;
  - + checkpointing: every transformer layer under torch.utils.checkpoint (non-reentrant): its activations
    are recomputed in the backward pass;
  - + torchao CPUOffloadOptimizer: AdamW's state and step on the host (torch's fused CPU AdamW), weights and
    gradients on the device; with gradient offload each gradient leaves the device as soon as it is made;
  - + block swapping: every layer's weights, gradients and AdamW state in (pinned) host memory; a layer's
    weights come in for its forward and again for its backward, the next layer's copied in on a side stream
    meanwhile (prefetch), its gradients go out as they are made, and AdamW steps the layers on the host.
    This is what the training tools of large DiTs do, written with plain torch (`LayerSwap`);
  - DiffusionBlocks (B blocks, sequential): resident, host-paged, disk-paged, and resident with every layer
    of the block under torch.utils.checkpoint.
Figures: peak memory (CUDA: max_memory_allocated, and the host's peak RSS beside it; CPU: the peak RSS above
the process's baseline, as bench_memory), the mean step time (after one warm-up step; a DiffusionBlocks
step is a block's, page-ins at block changes included), and the time to take the same samples through every
layer once: one end-to-end step, or B block steps. On a CPU the host is the device: offloading and swapping
cannot save memory there (their mechanism still runs, and its time is measured), and torchao's offload
needs CUDA, which the record says. With --capacity (CUDA), each method's largest trainable width of
bench_capacity's 24-layer ladder under each cap, found by trying.

Writes results/bench_peers-<device>.json, .md and .png (--capacity: bench_peers_capacity-<device>.*).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import bench_capacity, bench_memory, common  # noqa: E402

# method: (label, num_blocks: 1 or None = --blocks, how it trains)
METHODS = {
    "e2e": "end to end",
    "e2e-ckpt": "end to end + checkpointing",
    "e2e-offload": "end to end + torchao CPU-offloaded AdamW",
    "e2e-offload-grads": "end to end + torchao CPU-offloaded AdamW and gradients",
    "e2e-swap": "end to end + block swapping (prefetch)",
    "db": "DiffusionBlocks, resident",
    "db-host": "DiffusionBlocks, host-paged",
    "db-disk": "DiffusionBlocks, disk-paged",
    "db-ckpt": "DiffusionBlocks, resident + checkpointing",
}
CAPS_GB = (24, 16, 12)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", choices=sorted(bench_memory.MODELS), help="default: dit-1b GPU, dit-118m CPU")
    ap.add_argument("--blocks", type=int, default=4, help="B of the DiffusionBlocks rows")
    ap.add_argument("--steps", type=int, default=3, help="timed steps: end-to-end steps, and steps a block")
    ap.add_argument("--batch-size", type=int, help="default 32 on GPU, 8 on CPU")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--capacity", action="store_true", help="CUDA: largest width per method under the caps")
    ap.add_argument("--budget", type=float, default=0, help="--capacity: seconds for the search (0: none)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- the methods -------------------------------------------------------------------------------------------
def checkpoint_layers(block: torch.nn.Module) -> torch.nn.Module:
    """Run every layer of a DiT block under torch.utils.checkpoint (non-reentrant): its activations are
    dropped after the forward and recomputed in the backward. Parameter names and values are unchanged."""
    for layer in block.layers:
        layer.forward = functools.partial(
            torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False
        )
    return block


class CheckpointedTask:
    """A task whose blocks checkpoint every layer: DiffusionBlocks + checkpointing inside the block."""

    def __new__(cls, task):
        class Checkpointed(type(task)):
            def build_block(self, index, layers):
                return checkpoint_layers(super().build_block(index, layers))

        return Checkpointed(task.config)


class LayerSwap:
    """Block swapping: a DiT block's layers live in host memory, the rest of the block on the device.

    Each layer's device parameters keep their tensors but not their memory (storage resized to 0, as FSDP
    does) except while the layer computes: its weights are copied in before its forward (the next layer's
    copy starts meanwhile on a side stream), freed after it, copied in again when its backward starts (the
    layer before it prefetched), and freed once all its gradients exist. Each gradient is copied out to the
    host as soon as it is accumulated and freed on the device. AdamW then steps the layers on the host (the
    package's AdamW over the pinned master weights) and the rest on the device. Autograd's saved references
    to the weights see the refilled memory, so the gradients are end to end's, bit for bit. On a CPU the
    "device" copies are plain CPU tensors: the mechanism runs, and saves nothing.
    """

    def __init__(self, block: torch.nn.Module, device: torch.device, lr: float, betas, weight_decay: float):
        from dblocks_fast import optim

        self.device, self.cuda = device, device.type == "cuda"
        self.layers = list(block.layers)
        self.copy = torch.cuda.Stream(device) if self.cuda else None
        self.events: dict[int, torch.cuda.Event] = {}
        self.resident = [False] * len(self.layers)
        self.pairs: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []  # (device param, host master)
        self.pending = [0] * len(self.layers)  # gradients of the layer not yet accumulated in this backward
        for name, child in block.named_children():
            if name != "layers":
                child.to(device)
        for p in block.parameters(recurse=False):
            p.data = p.data.to(device)
        for i, layer in enumerate(self.layers):
            pairs = []
            for p in layer.parameters():
                host = p.detach().clone().pin_memory() if self.cuda else p.detach().clone()
                host = torch.nn.Parameter(host)
                host.grad = torch.empty_like(host, pin_memory=self.cuda)
                p.data = torch.empty(p.shape, dtype=p.dtype, device=device)
                p.untyped_storage().resize_(0)
                p.register_post_accumulate_grad_hook(functools.partial(self._grad_out, i, host))
                pairs.append((p, host))
            self.pairs.append(pairs)
            layer.register_forward_pre_hook(functools.partial(self._before_forward, i))
            layer.register_forward_hook(functools.partial(self._after_forward, i))
        hosts = [h for pairs in self.pairs for _, h in pairs]
        rest = [p for n, p in block.named_parameters() if not n.startswith("layers.")]
        hp = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        self.host_opt = optim.AdamW(hosts, **hp, pack=False)  # the CPU path: one parameter at a time
        self.device_opt = optim.AdamW(rest, **hp)
        self.param_groups = self.host_opt.param_groups + self.device_opt.param_groups

    def host_grads(self) -> list[torch.Tensor]:
        """The layers' gradients as they reached the host, in the layers' parameter order."""
        self.sync()
        return [h.grad for pairs in self.pairs for _, h in pairs]

    def _fetch(self, i: int) -> None:
        if i >= len(self.layers) or i < 0 or self.resident[i]:
            return
        for p, _ in self.pairs[i]:  # allocated on the compute stream, which later frees it
            p.untyped_storage().resize_(p.numel() * p.element_size())
        with torch.no_grad():
            if self.cuda:
                self.copy.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.copy):
                    for p, h in self.pairs[i]:
                        p.data.copy_(h, non_blocking=True)  # .data: autograd's version counter untouched
                self.events[i] = self.copy.record_event()
            else:
                for p, h in self.pairs[i]:
                    p.data.copy_(h)
        self.resident[i] = True

    def _ready(self, i: int) -> None:
        self._fetch(i)
        event = self.events.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _release(self, i: int) -> None:
        for p, _ in self.pairs[i]:
            p.untyped_storage().resize_(0)
        self.resident[i] = False

    def _before_forward(self, i: int, module, args) -> None:
        self._ready(i)
        self._fetch(i + 1)  # prefetch: copied in while layer i computes

    def _after_forward(self, i: int, module, args, out):
        if not torch.is_grad_enabled():
            self._release(i)
            return out
        self.pending[i] = len(self.pairs[i])
        if out.requires_grad:
            out.register_hook(functools.partial(self._before_backward, i))
        if i < len(self.layers) - 1:  # the last layer's backward comes first: it stays
            self._release(i)
        return out

    def _before_backward(self, i: int, grad):
        self._ready(i)
        self._fetch(i - 1)  # prefetch: copied in while layer i's backward computes

    def _grad_out(self, i: int, host: torch.Tensor, p: torch.Tensor) -> None:
        if self.cuda:
            self.copy.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy):
                host.grad.copy_(p.grad, non_blocking=True)
            p.grad.record_stream(self.copy)
        else:
            host.grad.copy_(p.grad)
        p.grad = None
        self.pending[i] -= 1
        if self.pending[i] == 0:  # every use of the weights in this backward is done
            self._release(i)

    def sync(self) -> None:
        if self.cuda:
            self.copy.synchronize()

    def step(self) -> None:
        self.sync()
        self.host_opt.step()
        self.device_opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.device_opt.zero_grad(set_to_none=True)  # the host gradients are overwritten each backward


class EndToEnd:
    """The whole model as one block, trained by one of the end-to-end methods, step for step as `Trainer`
    trains B = 1 (same initial weights, batches, noise, learning rate; no clipping)."""

    def __init__(self, task, data, config, method: str, device: torch.device):
        from dblocks_fast import optim
        from dblocks_fast.model import build_block

        self.task, self.data, self.config, self.method, self.device = task, data, config, method, device
        self.schedule = task.noise_process(config.noise, 1)
        block = build_block(task, 0, range(task.num_layers), config.seed)
        o = config.optimizer
        hp = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        if method == "e2e-ckpt":
            checkpoint_layers(block)
        if method == "e2e-swap":
            self.opt = LayerSwap(block, device, **hp)
        else:
            block.to(device)
            if method.startswith("e2e-offload"):
                from torchao.optim import CPUOffloadOptimizer

                grads = method == "e2e-offload-grads"
                self.opt = CPUOffloadOptimizer(block.parameters(), offload_gradients=grads, **hp)
            else:
                self.opt = optim.AdamW(block.parameters(), **hp)
        self.block = block.train()
        self.params = list(block.parameters())

    def backward(self, s: int) -> torch.Tensor:
        """Step s's forward and backward; returns the loss."""
        from dblocks_fast import rng
        from dblocks_fast.lr import lr_at

        cfg = self.config
        n, bs = len(self.data), cfg.batch_size
        epoch, j = divmod(s, n // bs)
        perm = torch.randperm(n, generator=rng.generator("cpu", cfg.seed, rng.DATA, 0, epoch))
        batch = {k: v.to(self.device) for k, v in self.data.batch(perm[j * bs : (j + 1) * bs]).items()}
        g = rng.generator(self.device, cfg.seed, rng.TRAIN, 0, s)
        level = self.schedule.sample(0, bs, g, self.device)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(s, cfg)
        loss, _ = self.task.loss(self.block, batch, level, g, process=self.schedule)
        loss.backward()
        return loss

    def step(self, s: int) -> torch.Tensor:
        loss = self.backward(s)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def grads(self) -> dict[str, torch.Tensor]:
        """The gradients of the last backward by parameter name, on the CPU, wherever the method put them."""
        names = [n for n, _ in self.block.named_parameters()]
        if self.method == "e2e-swap":
            layers = iter(self.opt.host_grads())
            return {n: (next(layers) if n.startswith("layers.") else p.grad).cpu().clone()
                    for n, p in self.block.named_parameters()}  # fmt: skip
        if self.method == "e2e-offload-grads":
            self.opt.stream.synchronize()
            host = self.opt.param_d2h_map
            return {
                n: (host[p].grad if p in host else p.grad).cpu().clone() for n, p in zip(names, self.params)
            }
        return {n: p.grad.cpu().clone() for n, p in zip(names, self.params)}


def train_config(spec: dict, num_blocks: int):
    import dblocks_fast as dbf

    return dbf.TrainConfig(
        num_blocks=num_blocks, steps_per_block=spec["steps"] + (num_blocks == 1),
        batch_size=spec["batch_size"], warmup=1, schedule="sequential",
        offload={"db-host": "host", "db-disk": "disk"}.get(spec["method"], "none"),
        device=spec["device"], out_dir=None, ckpt_every=0, progress=False, grad_clip=None,
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict) -> dict:
    """One method in its own process: train, time every step, report the peaks."""
    import dblocks_fast as dbf
    from dblocks_fast.tasks import DiTConfig, ImageGeneration

    device = torch.device(spec["device"])
    m = spec.get("model_config") or bench_memory.MODELS[spec["model"]]
    data = bench_memory.random_images(m, 4 * spec["batch_size"])
    baseline = bench_memory.warm_up(m, data, spec["batch_size"], spec["device"])
    if device.type == "cuda":
        if spec.get("cap_gb"):
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1e9 / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    task = ImageGeneration(DiTConfig(**m))
    method, times = spec["method"], []
    out = {"baseline_rss_bytes": baseline}
    try:
        if method.startswith("e2e"):
            run = EndToEnd(task, data, train_config(spec, 1), method, device)
            out["params"] = sum(p.numel() for p in run.params)
            for s in range(spec["steps"] + 1):
                t0 = time.perf_counter()
                run.step(s)
                _sync(device)
                times.append(time.perf_counter() - t0)
            passes = times[1:]  # one end-to-end step takes the batch through every layer
        else:
            if method == "db-ckpt":
                task = CheckpointedTask(task)
            # no run folder: no checkpoint is written (the disk tier pages to a temporary folder)
            trainer = dbf.Trainer(task, data, train_config(spec, spec["blocks"]))
            out["params"] = sum(p.numel() for b in trainer.model.blocks for p in b.parameters())
            inner = trainer.step

            def timed(b):
                t0 = time.perf_counter()
                loss = inner(b)
                _sync(device)
                times.append(time.perf_counter() - t0)
                return loss

            trainer.step = timed
            trainer.fit()
            passes = [spec["blocks"] * sum(times[1:]) / len(times[1:])]  # B block steps: every layer once
    except ImportError as e:
        return {**out, "status": f"not run: {e}"}
    except MemoryError as e:  # the paged tiers' preflight refused: the model does not fit
        return {**out, "status": f"preflight: {str(e)[:300]}", "fits": False}
    except (AssertionError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            return {**out, "status": "CUDA out of memory", "fits": False}
        if "CUDA" not in str(e) and "cuda" not in str(e):
            raise
        return {**out, "status": f"not applicable without CUDA: {str(e).splitlines()[0][:200]}"}
    out.update(status="ok", fits=True, step_s=times, step_mean_s=sum(times[1:]) / len(times[1:]))
    out["pass_s"] = sum(passes) / len(passes)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


# --- the driver --------------------------------------------------------------------------------------------
def _row(method: str, r: dict, e2e: dict | None, gpu: bool) -> dict:
    row = {"method": method, "config": METHODS[method], **r}
    if r.get("status") != "ok":
        return row
    row["peak_bytes"] = r["peak_device_bytes"] if gpu else r["peak_rss_bytes"] - r["baseline_rss_bytes"]
    e2e = row if method == "e2e" else e2e
    if e2e is not None and e2e.get("status") == "ok":
        # None where this row's peak is not above its baseline: --quick runs every method in one process,
        # whose peak RSS a method before it may already have set
        row["memory_e2e_over_this"] = 1.0 if e2e is row else _ratio(e2e["peak_bytes"], row["peak_bytes"])
        row["pass_time_over_e2e"] = row["pass_s"] / e2e["pass_s"]
    return row


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def measure(args, device: torch.device, model: str, batch: int, prov: dict) -> dict:
    gpu = device.type == "cuda"
    record = {
        "quick": args.quick,
        "complete": False,
        "measure": "torch.cuda.max_memory_allocated" if gpu else "peak RSS above the process's baseline",
        "settings": {
            "model": model, "model_config": bench_memory.MODELS[model], "batch_size": batch,
            "num_blocks": args.blocks, "steps": args.steps, "schedule": "sequential", "dtype": "fp32",
            "grad_clip": None, "torchao": _version("torchao"),
        },
        "rows": [],
    }  # fmt: skip
    e2e = None
    for i, method in enumerate(args.methods):
        print(f"{METHODS[method]} ...", flush=True)
        spec = dict(method=method, model=model, blocks=args.blocks, steps=args.steps, batch_size=batch,
                    device=str(device))  # fmt: skip
        # --quick checks the pipeline in seconds: every method in this process (the peaks mix)
        load = os.getloadavg()[0]
        r = worker(spec) if args.quick else bench_memory._run(spec, Path(__file__))
        row = _row(method, r, e2e, gpu)
        row["load_average_1min"] = [load, os.getloadavg()[0]]  # before and after: other work on the machine
        if method == "e2e":
            e2e = row
        record["rows"].append(row)
        record["complete"] = i == len(args.methods) - 1
        common.write("bench_peers", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    return record


def capacity(args, prov: dict) -> dict:
    """The largest width of bench_capacity's ladder each method trains under each cap (CUDA), by trying."""
    settings = {"depth": bench_capacity.DEPTH, "caps_gb": list(CAPS_GB), "methods": args.methods,
                "num_blocks": 8, "batch_size": 8, "budget_s": args.budget}  # fmt: skip
    record = {"quick": args.quick, "settings": settings}
    if not torch.cuda.is_available():
        record["status"] = "not applicable without CUDA: capacity is found by training on the GPU"
    else:
        widths = [w for w in bench_capacity.WIDTHS if w <= 1536] if args.quick else bench_capacity.WIDTHS
        deadline = time.monotonic() + args.budget if args.budget else float("inf")

        def attempt(method: str, cap: float, width: int) -> dict | None:
            if deadline - time.monotonic() < 60:
                return None
            print(f"{method}, cap {cap} GB, width {width} ...", flush=True)
            spec = dict(method=method, model_config=bench_capacity._config(width), blocks=8, steps=1,
                        batch_size=8, device="cuda", cap_gb=cap)  # fmt: skip
            try:
                r = bench_memory._run(spec, Path(__file__))
            except RuntimeError as e:
                r = {"status": f"exit: {str(e)[-200:]}"}
            ok = r.get("status") == "ok"
            why = r["status"] if not ok else ""
            return {
                "mode": method,
                "cap_gb": cap,
                "width": width,
                "ok": ok,
                "why": why,
                "params": r.get("params"),
            }

        record["cells"], record["tries"] = bench_capacity.search(attempt, widths, list(CAPS_GB), args.methods)
    title = f"Largest trainable DiT per method ({bench_capacity.DEPTH} layers, batch 8, fp32 + AdamW)"
    md = "\n".join(common.header(title, prov, args.quick) + capacity_table(record)) + "\n"
    common.write("bench_peers_capacity", prov, record, md, args.out)
    if "status" in record:
        common.pending_figure("bench_peers_capacity", prov, args.out)
    else:
        _capacity_plot(record, prov, args.out)
    return record


def _capacity_plot(record: dict, prov: dict, out: Path) -> None:
    fig, ax = common.figure(6, 3.2)
    for method in record["settings"]["methods"]:
        cs = sorted((c for c in record["cells"] if c["mode"] == method), key=lambda c: c["cap_gb"])
        ys = [c["largest"]["params"] / 1e9 if c["largest"] else 0 for c in cs]
        ax.plot([c["cap_gb"] for c in cs], ys, "o-", label=METHODS[method])
    ax.set_xlabel("GPU memory cap (GB)")
    ax.set_ylabel("largest trainable model (B params)")
    ax.legend(fontsize=6)
    common.save_figure(fig, "bench_peers_capacity", prov, out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    prov = common.provenance(device)
    if args.capacity:
        return capacity(args, prov)
    if args.quick:
        args.model, args.blocks, args.steps, args.batch_size = "tiny", 2, 1, 4
    model = args.model or ("dit-1b" if device.type == "cuda" else "dit-118m")
    record = measure(args, device, model, args.batch_size or (32 if device.type == "cuda" else 8), prov)
    print(_markdown(prov, record))
    return record


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def table(record: dict) -> list[str]:
    """The comparison as a markdown table, ratios first (also used by the results page)."""
    gpu = record["measure"].startswith("torch.cuda")
    mem = "peak device GB" if gpu else "peak GB above baseline (RSS)"
    lines = [
        "| method | end to end / this (memory) | checkpointing / this (memory) | time per pass / end to end "
        f"| {mem} | step s | pass s |" + (" host RSS GB |" if gpu else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    b = record["settings"]["num_blocks"]
    ckpt = next((r for r in record["rows"] if r["method"] == "e2e-ckpt" and r.get("status") == "ok"), None)
    for r in record["rows"]:
        label = r["config"].replace("DiffusionBlocks", f"DiffusionBlocks B={b}")
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r['status']} |" + " |" * (6 if gpu else 5))
            continue
        ratio = (
            (_fmt(r["memory_e2e_over_this"]), _fmt(r["pass_time_over_e2e"]))
            if "pass_time_over_e2e" in r
            else ("-", "-")
        )
        vs_ckpt = _fmt(_ratio(ckpt["peak_bytes"], r["peak_bytes"])) if ckpt else "-"
        cells = [
            label,
            ratio[0],
            vs_ckpt,
            ratio[1],
            f"{r['peak_bytes'] / 1e9:.2f}",
            f"{r['step_mean_s']:.3f}",
            f"{r['pass_s']:.3f}",
        ]
        if gpu:
            cells.append(f"{r['peak_rss_bytes'] / 1e9:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    params = next((r["params"] for r in record["rows"] if r.get("params")), 0)
    s = record["settings"]
    lines += [
        "",
        f"{params / 1e6:.0f}M parameters, batch {s['batch_size']}, fp32, AdamW; measured as "
        f"{record['measure']}. "
        f"A pass takes the same samples through every layer once: one end-to-end step, or {b} block steps "
        f"(mean of {s['steps']} steps a block after a warm-up step, page-ins at block changes included).",
    ]
    loads = [x for r in record["rows"] for x in r.get("load_average_1min", [])]
    if loads:
        lines += [
            "",
            f"Load average (1 min) on the machine during the run: {min(loads):.1f} to {max(loads):.1f}.",
        ]
    if not gpu:
        lines += [
            "",
            "On a CPU the host is the device: offloading and swapping move tensors within the same memory, "
            "so their device saving is a GPU figure (pending); their time is measured here.",
        ]
    return lines


def capacity_table(record: dict) -> list[str]:
    if "status" in record:
        return [f"**GPU figures pending**: {record['status']}."]
    lines = ["| method | cap | largest width | parameters | stopped by |", "|---|---|---|---|---|"]
    for c in record["cells"]:
        big = c["largest"]
        w, p = (big["width"], f"{big['params'] / 1e9:.2f}B") if big else ("none", "-")
        lines.append(f"| {METHODS[c['mode']]} | {c['cap_gb']:.0f} GB | {w} | {p} | {c['stopped_by'][:80]} |")
    return lines


def _markdown(prov: dict, record: dict) -> str:
    s = record["settings"]
    title = f"DiffusionBlocks against its alternatives ({s['model']}, batch {s['batch_size']}, fp32)"
    return common.markdown(title, prov, record, table(record))


def _plot(record: dict, prov: dict, out: Path) -> None:
    rows = [r for r in record["rows"] if r.get("status") == "ok"]
    fig, (a, b) = common.figure(9, 3.6, ncols=2)
    names = [
        r["config"].replace("end to end + ", "e2e +\n").replace("DiffusionBlocks, ", "DB\n") for r in rows
    ]
    gpu = record["measure"].startswith("torch.cuda")
    a.barh(range(len(rows)), [r["peak_bytes"] / 1e9 for r in rows])
    a.set_xlabel("peak GB " + ("(device)" if gpu else "above baseline (RSS)"))
    b.barh(range(len(rows)), [r["pass_s"] for r in rows])
    b.set_xlabel("seconds per pass through every layer")
    for ax in (a, b):
        ax.set_yticks(range(len(rows)), names, fontsize=6)
        ax.invert_yaxis()
    a.set_title(f"{record['settings']['model']}: memory", fontsize=9)
    b.set_title(f"time (B={record['settings']['num_blocks']})", fontsize=9)
    common.save_figure(fig, "bench_peers", prov, out)


if __name__ == "__main__":
    main()
