"""CUDA checks of the training and sampling path (skipped without a GPU; the kernels have their own)."""

import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast.train import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_sampling_run_on_cuda(tiny_task, digits, tiny_config, tmp_path, precision):
    cfg = tiny_config(device="cuda", precision=precision, out_dir=str(tmp_path / "run"))
    model = dbf.train(tiny_task, digits, cfg)
    assert all(p.is_cuda and torch.isfinite(p).all() for p in model.parameters())
    out = dbf.sample(tmp_path / "run", [0, 1, 2], num_steps=6, sampler="heun", cfg_scale=1.5, device="cuda")
    assert out.is_cuda and torch.isfinite(out).all()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all('"peak_mem_bytes"' in line for line in lines)


def test_cuda_blocks_compute_what_cpu_blocks_compute(tiny_task, digits, tiny_config):
    """Identical weights (initialised on the CPU from the block seed) and inputs: D agrees to fp32."""
    cpu, gpu = (Trainer(tiny_task, digits, tiny_config(device=d)) for d in ("cpu", "cuda"))
    z = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 11
    for b in range(3):
        for p, q in zip(cpu.model.blocks[b].parameters(), gpu.model.blocks[b].parameters()):
            assert torch.equal(p, q.cpu())
        lo, hi = cpu.schedule.interval(b)
        sigma = torch.full((16,), (lo * hi) ** 0.5, dtype=torch.float64)
        d_cpu = cpu.model.denoise(z, sigma, labels)
        d_gpu = gpu.model.denoise(z.cuda(), sigma.cuda(), labels.cuda())
        torch.testing.assert_close(d_gpu.cpu(), d_cpu, atol=1e-5, rtol=1e-5)
