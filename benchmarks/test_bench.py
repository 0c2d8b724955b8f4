"""The kernel and sampling benchmarks under pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Not part of the test run (pytest's testpaths is tests/). Save and compare runs across commits with
pytest-benchmark's own tools, e.g. `pytest benchmarks/ --benchmark-only --benchmark-autosave`, then
`pytest-benchmark compare`. On a GPU: our Triton kernels and the torch reference in bf16, and sampling of
the DiT-S/2 latent model. On a CPU: the torch reference only (timing the Triton interpreter would mean
nothing) and sampling of the digits DiT.
"""

import pytest
import torch

from benchmarks import bench_inference, bench_kernels

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CASES = bench_kernels.cases(
    bench_kernels.QUICK_SIZES if CUDA else bench_kernels.SMOKE_SIZES,
    DEVICE,
    torch.bfloat16 if CUDA else torch.float32,
)


def _synced(fn):
    if not CUDA:
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ours", "eager"] if CUDA else ["eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.size}]")
def test_kernel(benchmark, case, impl, backward):
    fn = case.ours if impl == "ours" else case.eager
    benchmark.group = f"{case.op} {case.size} {'fwd+bwd' if backward else 'fwd'}"
    benchmark(_synced(bench_kernels.runner(fn, case.make(), backward)))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("num_blocks", [1, 2, 3, 6], ids=lambda b: "end-to-end" if b == 1 else f"B={b}")
def test_sampling(benchmark, num_blocks, batch):
    model = bench_inference.build("dit-s2-latent32" if CUDA else "digits-dit", num_blocks, DEVICE)
    benchmark.group = f"sampling, batch {batch}"
    benchmark.extra_info["images"] = batch
    benchmark(bench_inference.time_sampling, model, batch, 12, DEVICE)
