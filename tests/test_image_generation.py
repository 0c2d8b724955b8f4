import pytest
import torch

from dblocks_fast import EDM, precond
from dblocks_fast.data import ImageData
from dblocks_fast.model import BlockModel, split_layers
from dblocks_fast.tasks import DiTConfig, ImageGeneration
from dblocks_fast.tasks.image_generation import patchify, unpatchify


@pytest.mark.parametrize("c,s,p", [(1, 8, 2), (3, 6, 3), (2, 5, 1)])
def test_patchify_round_trip(c, s, p):
    x = torch.randn(3, c, s, s)
    tokens = patchify(x, p)
    assert tokens.shape == (3, (s // p) ** 2, c * p * p)
    assert torch.equal(tokens[0, 0], x[0, :, :p, :p].reshape(-1))  # first patch = top-left corner
    assert torch.equal(unpatchify(tokens, p, c, s, s), x)


def test_split_layers():
    assert split_layers(6, 3) == [2, 2, 2]
    assert split_layers(6, 1) == [6]
    assert split_layers(6, 3, [1, 3, 2]) == [1, 3, 2]
    with pytest.raises(ValueError, match="larger than the number of layers"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match="sums to 5, but the model has 6 layers"):
        split_layers(6, 3, [1, 2, 2])
    with pytest.raises(ValueError, match=r"--layers 3,2,2"):
        split_layers(7, 3)
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers(4, 2, [4, 0])


def test_fresh_block_is_c_skip_times_input(tiny_task):
    block = tiny_task.build_block(0, 2)
    z = torch.randn(4, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0])
    d = tiny_task.denoise(block, z, sigma, torch.tensor([0, 3, 9, 10]), process=EDM(3))
    torch.testing.assert_close(d, precond.c_skip(sigma).view(-1, 1, 1, 1) * z)


def test_loss_is_weighted_l2_and_label_dropout_uses_the_null_label(tiny_task):
    block = tiny_task.build_block(0, 1)
    seen = []
    block.label_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    y = torch.rand(256, 1, 8, 8) * 2 - 1
    batch = {"y": y, "label": torch.zeros(256, dtype=torch.long)}
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((256,), 0.5, dtype=torch.float64)
    loss, per = tiny_task.loss(block, batch, sigma, g, process=EDM(3))
    dropped = (seen[0] == 10).float().mean().item()
    assert 0.04 < dropped < 0.17  # 10% label dropout
    assert set(seen[0].tolist()) <= {0, 10}
    # a fresh block gives F = 0: D = c_skip z, loss = w mean((c_skip z - y)^2) with z = y + sigma eps
    assert torch.isfinite(loss) and per.shape == (256,)
    c_skip, w = precond.c_skip(torch.tensor(0.5)), precond.loss_weight(torch.tensor(0.5))
    expected = w * ((c_skip - 1) ** 2 * y.square().mean() + c_skip**2 * 0.25)  # E over eps
    assert abs(loss.item() - expected.item()) / expected.item() < 0.05


def test_config_and_data_errors(digits):
    with pytest.raises(ValueError, match="patch_size 3 must divide image_size 8"):
        ImageGeneration(DiTConfig(patch_size=3))
    with pytest.raises(ValueError, match="heads 5 must divide hidden 96"):
        ImageGeneration(DiTConfig(hidden=96, heads=5))
    task = ImageGeneration(DiTConfig(image_size=8, channels=3))
    with pytest.raises(ValueError, match=r"the model expects \(3, 8, 8\)"):
        task.check_data(digits)
    with pytest.raises(ValueError, match="only square images"):
        ImageGeneration.for_data(ImageData(torch.zeros(2, 1, 8, 6), torch.zeros(2, dtype=torch.long), 1))
    with pytest.raises(ValueError, match="label 9 out of range"):
        ImageGeneration(DiTConfig(num_classes=5)).check_data(digits)


def test_block_model_routes_sigma_to_its_block(tiny_task):
    sched = EDM(3)
    model = BlockModel.create(tiny_task, sched, [1, 1, 1], seed=0)
    calls = []
    for b, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, i, o, b=b: calls.append(b))
    z, lab = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for sigma, want in [(80.0, 0), (0.505, 1), (0.3, 1), (0.1796, 2), (0.002, 2)]:
        model.denoise(z, torch.full((2,), sigma, dtype=torch.float64), lab)
        assert calls[-1] == want
    with pytest.raises(ValueError, match="span blocks 0..2"):
        model.denoise(z, torch.tensor([80.0, 0.01], dtype=torch.float64), lab)


def test_block_initialisation_depends_only_on_seed_index_and_depth(tiny_task):
    from dblocks_fast.model import build_block

    a = BlockModel.create(tiny_task, EDM(3), [1, 1, 1], seed=5)
    b = BlockModel.create(tiny_task, EDM(3), [1, 1, 1], seed=6)
    torch.manual_seed(123)  # whatever state the global RNG is in
    alone = build_block(tiny_task, 1, 1, seed=5)  # built alone, without blocks 0 and 2
    for p, q in zip(a.blocks[1].parameters(), alone.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.blocks[1].pos_embed, b.blocks[1].pos_embed)  # the seed matters
    assert not torch.equal(
        a.blocks[0].pos_embed, a.blocks[1].pos_embed
    )  # blocks are not copies of each other
