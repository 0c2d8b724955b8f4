"""Streamed sampling: blocks in host memory, at most two on the device, equal to the resident model."""

import copy

import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast.model import BlockModel
from dblocks_fast.paging import StreamedBlockModel, flatten_module
from dblocks_fast.schedule import NoiseSchedule


def _model(task, layers, seed=0):
    model = BlockModel.create(task, NoiseSchedule(len(layers)), layers, seed=seed)
    with torch.no_grad():  # zero-initialised heads would make every block's output the same; perturb them
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("sampler,cfg", [("euler", 1.0), ("heun", 1.5)])
@pytest.mark.parametrize("layers", [[1, 1, 1], [1, 2]])
def test_streamed_sampling_equals_resident_bit_for_bit(tiny_task, layers, sampler, cfg):
    resident = _model(tiny_task, layers)
    streamed = StreamedBlockModel(copy.deepcopy(resident), device="cpu")
    seen = []

    def watch(info):
        seen.append(streamed.resident())

    labels = torch.tensor([0, 3, 7, 9, 1])
    steps = 2 * len(layers)
    a = dbf.sample(resident, labels, num_steps=steps, sampler=sampler, cfg_scale=cfg)
    b = dbf.sample(streamed, labels, num_steps=steps, sampler=sampler, cfg_scale=cfg, callback=watch)
    assert torch.equal(a, b)
    assert streamed.copies == len(layers)  # each block copied once: prefetch always guessed right
    # never more than two blocks of one architecture on the device (blocks of other depths have their own)
    assert all(len(r) <= 2 * len({*layers}) for r in seen)


def test_flatten_module_makes_every_tensor_a_view_of_one_buffer(tiny_task):
    block = _model(tiny_task, [3]).blocks[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    flat = flatten_module(block, "cpu")
    assert flat.numel() == sum(p.numel() for p in block.parameters())
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]) and lo <= v.data_ptr() < hi, k
    flat.zero_()
    assert all((p == 0).all() for p in block.parameters())
    mixed = torch.nn.Linear(2, 2)
    mixed.bias.data = mixed.bias.data.double()
    with pytest.raises(TypeError, match="one dtype"):
        flatten_module(mixed, "cpu")


@pytest.mark.gpu
def test_streamed_sampling_on_cuda_equals_resident(tiny_task):
    resident = _model(tiny_task, [1, 1, 1])
    streamed = StreamedBlockModel(copy.deepcopy(resident), device="cuda")
    labels = torch.arange(10)
    a = dbf.sample(resident.to("cuda"), labels, num_steps=6, sampler="heun", cfg_scale=1.5)
    b = dbf.sample(streamed, labels, num_steps=6, sampler="heun", cfg_scale=1.5)
    assert torch.equal(a, b) and streamed.copies == 3
    assert all(t.is_pinned() for t in streamed._host)
